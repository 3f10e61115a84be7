"""The HTTP session for target requests: the target policy enforced where connections are made.

Three layers, so no URL trick, redirect or DNS answer gets around the policy:

1. ``GuardedAdapter.send`` refuses, before any connection, a URL that
   ``urllib.parse`` and urllib3 read differently, and a host the policy
   refuses by name. It runs for the first request and for every redirect
   hop, and for a proxied request it checks the *target* host.
2. The connection classes of its pools (``GuardedHTTPConnection``,
   ``GuardedHTTPSConnection``) resolve the host urllib3 is about to connect
   to themselves, drop every address the policy refuses, connect to an
   allowed address only, and check the peer address of the socket again.
   The address checked is the address connected: a DNS answer that changes
   between check and connect (rebinding) has nothing to switch.
3. ``TargetSession.rebuild_auth`` checks each redirect target by name and
   strips credentials (``SENSITIVE_HEADERS`` plus configured names) when a
   redirect leaves the origin. Its cookie jar keeps nothing, so one task's
   cookies never reach another task.
"""

from __future__ import annotations

import http.cookiejar
import socket
import sys
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type
from urllib.parse import urlsplit

import urllib3.util.connection
import urllib3.util.timeout
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from .allowlist import TargetDenied, TargetPolicy, normalise_host, parse_address
from .client import EnvCachedSession

__all__ = [
    "SENSITIVE_HEADERS",
    "GuardedAdapter",
    "TargetSession",
    "build_target_session",
    "is_sensitive_header",
]

#: headers removed when a redirect leaves the origin (scheme, host, port);
#: besides these, any header whose name contains one of ``SENSITIVE_PARTS``
SENSITIVE_HEADERS: Tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "x-api-key",
    "api-key",
    "apikey",
    "x-auth-token",
    "x-access-token",
    "private-token",
    "job-token",
    "x-vault-token",
    "x-jfrog-art-api",
    "x-amz-security-token",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
)
SENSITIVE_PARTS: Tuple[str, ...] = (
    "auth",
    "token",
    "secret",
    "password",
    "passwd",
    "api-key",
    "api_key",
    "apikey",
    "session",
    "cookie",
    "credential",
)

_DEFAULT_TIMEOUT: Any = getattr(urllib3.util.timeout, "_DEFAULT_TIMEOUT", None)


def is_sensitive_header(name: str, extra: Iterable[str] = ()) -> bool:
    """True for a header that must not follow a redirect to another origin."""
    lowered = name.strip().lower()
    if lowered in SENSITIVE_HEADERS or lowered in {e.strip().lower() for e in extra}:
        return True
    return any(part in lowered for part in SENSITIVE_PARTS)


# ---------------------------------------------------------------------------
# connections: check the address actually connected
# ---------------------------------------------------------------------------
class _GuardedMixin:
    """Replaces urllib3's ``_new_conn``: resolve, filter by policy, connect, re-check."""

    policy: TargetPolicy
    # provided by urllib3's HTTPConnection
    _dns_host: str
    _tunnel_host: Optional[str]
    proxy: Any
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    host: str

    def _new_conn(self) -> socket.socket:
        if self.proxy is not None:
            # A connection to the operator's proxy. The target was checked by
            # name in GuardedAdapter.send; a CONNECT tunnel names it here too.
            if self._tunnel_host:
                self.policy.check_host(self._tunnel_host)
            return super()._new_conn()  # type: ignore[misc, no-any-return]
        host = normalise_host(self.host)
        by_name = self.policy.check_host(host)
        family = urllib3.util.connection.allowed_gai_family()  # honours --ipv4Fallback
        try:
            infos = socket.getaddrinfo(
                self._dns_host.strip("[]"), self.port, family, socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        denied: Optional[TargetDenied] = None
        error: Optional[OSError] = None
        for af, socktype, proto, _canon, sockaddr in infos:
            address = parse_address(str(sockaddr[0]))
            if address is None:
                continue
            try:
                self.policy.check_address(host, address, by_name=by_name)
            except TargetDenied as exc:
                denied = denied or exc
                continue
            sock = socket.socket(af, socktype, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if self.timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(sockaddr)
                peer = parse_address(str(sock.getpeername()[0]))
                if peer is None or peer != address:  # cannot happen; never trust it
                    raise TargetDenied(f"connected to an unexpected address: {host}")
                self.policy.check_address(host, peer, by_name=by_name)
            except socket.timeout as exc:
                sock.close()
                raise ConnectTimeoutError(
                    self,
                    f"Connection to {self.host} timed out. (connect timeout={self.timeout})",
                ) from exc
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        if error is not None:
            raise NewConnectionError(
                self,  # type: ignore[arg-type]
                f"Failed to establish a new connection: {error}",
            )
        if denied is not None:
            raise denied
        raise NewConnectionError(self, "getaddrinfo returned no address")  # type: ignore[arg-type]


class GuardedHTTPConnection(_GuardedMixin, HTTPConnection):
    """urllib3's HTTP connection, connecting only where the policy allows."""


class GuardedHTTPSConnection(_GuardedMixin, HTTPSConnection):
    """urllib3's HTTPS connection, connecting only where the policy allows."""


def _pool_classes(policy: TargetPolicy) -> Dict[str, Type[HTTPConnectionPool]]:
    """Pool classes whose connections carry ``policy`` (a pool key cannot carry it)."""
    http_conn = type("PolicyHTTPConnection", (GuardedHTTPConnection,), {"policy": policy})
    https_conn = type("PolicyHTTPSConnection", (GuardedHTTPSConnection,), {"policy": policy})
    http_pool = type(
        "PolicyHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}
    )
    https_pool = type(
        "PolicyHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}
    )
    return {"http": http_pool, "https": https_pool}


# ---------------------------------------------------------------------------
# the adapter: check every request's URL, and use the guarded pools
# ---------------------------------------------------------------------------
class GuardedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose pools (direct and through HTTP proxies) use guarded
    connections, and whose ``send`` refuses ambiguous URLs and denied hosts."""

    def __init__(self, policy: TargetPolicy, **kwargs: Any) -> None:
        self.policy = policy
        self._classes = _pool_classes(policy)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self._classes)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            # SOCKS pools have their own connection classes: the target is
            # checked by name in send() only (the proxy resolves it).
            manager.pool_classes_by_scheme = dict(self._classes)
        return manager

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        url = str(request.url or "")
        host = self.policy.check_url(url)
        proxies = kwargs.get("proxies") or (args[4] if len(args) > 4 else None)
        if proxies and _proxy_for(url, proxies):
            self._check_proxied(host, urlsplit(url).port)
        return super().send(request, *args, **kwargs)

    def _check_proxied(self, host: str, port: Optional[int]) -> None:
        """The proxy connects, not the agent: check what the name resolves to here."""
        by_name = self.policy.check_host(host)
        try:
            infos = socket.getaddrinfo(host, port or 80, 0, socket.SOCK_STREAM)
        except OSError:
            if by_name:
                return  # allowed by name; the proxy may know names we do not
            raise TargetDenied(
                f"target host not in the allow-list: {host} (not resolvable here)"
            ) from None
        for *_rest, sockaddr in infos:
            address = parse_address(str(sockaddr[0]))
            if address is not None:
                self.policy.check_address(host, address, by_name=by_name)


def _proxy_for(url: str, proxies: Mapping[str, str]) -> Optional[str]:
    from requests.utils import select_proxy

    return select_proxy(url, dict(proxies))


# ---------------------------------------------------------------------------
# the session: redirect hygiene and no shared cookies
# ---------------------------------------------------------------------------
class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keep and send no cookie: the session serves every task of every tenant."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


class TargetSession(EnvCachedSession):
    """A session that checks each redirect hop and strips credentials across origins."""

    def __init__(self, policy: TargetPolicy, *, sensitive_headers: Iterable[str] = ()) -> None:
        super().__init__()
        self.policy = policy
        self.sensitive_headers = tuple(h.strip().lower() for h in sensitive_headers if h.strip())
        self.cookies.set_policy(_NoCookies())

    # kept under its old name for code that reads ``session.allow``
    @property
    def allow(self) -> TargetPolicy:
        return self.policy

    def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
        new_url = str(prepared_request.url or "")
        self.policy.check_url(new_url, redirect=True)
        old_url = str(getattr(response.request, "url", "") or "")
        # requests' rule for Authorization, applied to every credential:
        # another host, port or scheme (but http->https on the same host) strips.
        if self.should_strip_auth(old_url, new_url):  # type: ignore[no-untyped-call]
            headers = prepared_request.headers
            for name in [n for n in headers if is_sensitive_header(n, self.sensitive_headers)]:
                del headers[name]
        super().rebuild_auth(prepared_request, response)  # type: ignore[no-untyped-call]


def build_target_session(
    policy: TargetPolicy, pool_size: int, *, sensitive_headers: Iterable[str] = ()
) -> TargetSession:
    """A keep-alive target session with guarded pools of ``pool_size`` per host."""
    session = TargetSession(policy, sensitive_headers=sensitive_headers)
    adapter = GuardedAdapter(policy, pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.pop("User-Agent", None)  # targets see urllib3's default, as before
    return session
