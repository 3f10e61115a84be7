"""The target policy: which hosts and addresses a task may reach.

Two lists of entries, each a host name (``jira.corp``), a wildcard
(``*.corp``: any sub-domain, not ``corp`` itself) or an address / CIDR
(``10.0.0.0/8``):

- the **allow-list** (``--allowedTargets``); empty = every host allowed;
- the **deny-list**: the cloud metadata addresses (``DEFAULT_DENIED``) plus
  ``--deniedTargets``. It applies even without an allow-list, and it wins
  over the allow-list. The entry ``no-defaults`` drops the built-in entries.

A host named in the allow-list (by name or wildcard) is allowed by name; its
addresses are only checked against the deny-list. Any other host (an IP
literal, or a name when the allow-list has CIDRs) is allowed only if the
address the agent *connects to* lies in an allowed network.

The checks run where the connection is made. ``GuardedAdapter`` (a requests
adapter) refuses, for every request and redirect hop, a URL that
``urllib.parse`` and urllib3 read differently and a host refused by name (for
a proxied request: the target host). Its pools' connection classes resolve
the host urllib3 is about to connect to, connect only to an address the
policy allows and re-check the socket's peer, so neither a numeric or
IPv6 form nor a DNS answer that changes (rebinding) gets around them.
``UploadPolicy`` uses the same machinery for S3 upload URLs.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union
from urllib.parse import urlsplit

import urllib3.util.connection
import urllib3.util.timeout
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from ..connage import ConnectionAges
from ..errors import AgentError

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: always denied unless ``no-defaults`` is given: cloud metadata services
#: (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS IPv6: fd00:ec2::254)
#: and the rest of IPv4 link-local, where other metadata services live.
#: IPv6 link-local ``fe80::/10`` is the same kind of place as ``169.254.0.0/16``
#: (instance-local services; some clouds serve metadata there).
DEFAULT_DENIED: Tuple[str, ...] = (
    "169.254.169.254",
    "fd00:ec2::254",
    "169.254.0.0/16",
    "fe80::/10",
)

#: the deny-list entry that drops ``DEFAULT_DENIED``
NO_DEFAULTS = "no-defaults"


#: the reason of a refusal by the allow-list: first request, redirect hop
_OUTSIDE = {
    False: "target host not in the allow-list",
    True: "redirect to a host outside the allow-list",
}


class TargetDenied(AgentError):
    """The policy refuses a target; ``reason`` is safe to log and to send back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HostList:
    """Names, wildcards and networks; ``matches_name`` / ``matches_address`` test one."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.names: List[str] = []
        self.patterns: List[str] = []
        self.networks: List[_Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            if not entry:
                continue
            if "/" in entry or _ip(entry) is not None:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            elif "*" in entry or "?" in entry:
                self.patterns.append(entry)
            else:
                self.names.append(entry)

    def __bool__(self) -> bool:
        return bool(self.names or self.patterns or self.networks)

    def matches_name(self, host: str) -> bool:
        """``host`` (normalised) is listed by name or wildcard."""
        return host in self.names or any(fnmatch.fnmatchcase(host, p) for p in self.patterns)

    def matches_address(self, address: _Address) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)

    def describe(self) -> Tuple[str, ...]:
        return tuple(self.names + self.patterns + [str(n) for n in self.networks])


class TargetPolicy:
    """The allow-list and the deny-list together.

    ``check_host`` decides what can be decided from the name; ``check_address``
    decides the rest once the address to connect to is known.
    """

    def __init__(self, allowed: Iterable[str] = (), denied: Iterable[str] = ()) -> None:
        denied = [d for d in denied if d.strip()]
        keep_defaults = not any(d.strip().lower() == NO_DEFAULTS for d in denied)
        extra = [d for d in denied if d.strip().lower() != NO_DEFAULTS]
        self.allow = HostList(allowed)
        self.deny = HostList([*(DEFAULT_DENIED if keep_defaults else ()), *extra])

    @property
    def enabled(self) -> bool:
        """True when an allow-list restricts the targets."""
        return bool(self.allow)

    def check_url(self, url: str, *, redirect: bool = False) -> str:
        """Refuse a URL the parsers disagree on, a non-http(s) one, or a denied host.

        Returns the normalised host. Raises ``TargetDenied``. This is the
        check by name; the address a connection reaches is checked as it
        connects.
        """
        host = unambiguous_host(url)
        self.check_host(host, redirect=redirect)
        return host

    def check_host(self, host: str, *, redirect: bool = False) -> bool:
        """Decide by name. Returns True when the host is allowed by name (its
        addresses then only face the deny-list), False when the address it
        connects to must also lie in an allowed network. Raises ``TargetDenied``."""
        host = normalise_host(host)
        outside = _OUTSIDE[redirect]
        if self.deny.matches_name(host):
            raise TargetDenied(f"target host is denied: {host}")
        address = _ip(host)
        if address is not None:
            self.check_address(host, address, by_name=False, redirect=redirect)
            return False
        if not self.allow:
            return True
        if self.allow.matches_name(host):
            return True
        if not self.allow.networks:  # no CIDR could let this name in
            raise TargetDenied(f"{outside}: {host}")
        return False

    def check_address(
        self, host: str, address: _Address, *, by_name: bool, redirect: bool = False
    ) -> None:
        """Refuse ``address`` (what ``host`` resolved to) if denied or, for a host
        not allowed by name, outside the allowed networks."""
        for form in _forms(address):
            if self.deny.matches_address(form):
                raise TargetDenied(f"target address is denied: {host} ({address})")
        if by_name or not self.allow:
            return
        if any(self.allow.matches_address(form) for form in _forms(address)):
            return
        if str(address) in self.allow.names:
            return
        outside = _OUTSIDE[redirect]
        if _ip(normalise_host(host)) is not None:
            raise TargetDenied(f"{outside}: {normalise_host(host)}")
        raise TargetDenied(f"{outside}: {normalise_host(host)} resolves to {address}")

    def describe(self) -> Tuple[str, ...]:
        return self.allow.describe()


class UploadPolicy(TargetPolicy):
    """Where an S3 upload URL may point: public addresses only.

    Loopback, private, link-local, unspecified, multicast and reserved
    addresses are refused unless listed in ``allowed`` (``--allowedUploadHosts``:
    names, wildcards, CIDRs). The AC server's own host is accepted too: it
    receives every result anyway. The metadata deny-list always applies.
    """

    def __init__(self, allowed: Iterable[str] = (), *, server_host: str = "") -> None:
        super().__init__((), ())
        entries = [*allowed, *([server_host] if server_host else [])]
        self.internal_ok = HostList(entries)

    def check_host(self, host: str, *, redirect: bool = False) -> bool:
        host = normalise_host(host)
        if self.deny.matches_name(host):
            raise TargetDenied(f"upload host is denied: {host}")
        if self.internal_ok.matches_name(host):
            return True
        address = _ip(host)
        if address is not None:
            self.check_address(host, address, by_name=False)
        return False

    def check_address(
        self, host: str, address: _Address, *, by_name: bool, redirect: bool = False
    ) -> None:
        forms = _forms(address)
        if any(self.deny.matches_address(form) for form in forms):
            raise TargetDenied(f"upload address is denied: {normalise_host(host)} ({address})")
        if by_name or any(self.internal_ok.matches_address(form) for form in forms):
            return
        if any(_internal(form) for form in forms):
            raise TargetDenied(
                f"upload url points to an internal address: {normalise_host(host)} ({address})"
            )


def _internal(address: _Address) -> bool:
    return bool(
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def parse_entries(text: str) -> List[str]:
    """A comma-separated flag value as entries; raises ValueError for a bad CIDR."""
    entries = [part.strip() for part in text.split(",") if part.strip()]
    HostList(e for e in entries if e.lower() != NO_DEFAULTS)
    return entries


def normalise_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot, no IPv6 zone."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".").split("%", 1)[0]


#: a backslash, a space or a control character: parsers read URLs with them differently
_UNSAFE_URL_CHAR = re.compile(r"[\\ \x00-\x1f\x7f]")


def unambiguous_host(url: str) -> str:
    """The host of an http(s) ``url`` when urllib.parse and urllib3 agree on
    scheme, host and port; otherwise ``TargetDenied``.

    requests picks the connection pool with one parser and urllib3 the
    address with the other; a URL they read differently (``http://a:1\\@b/``)
    is refused rather than guessed.
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        split = urlsplit(url)
        split_port = split.port
        other = parse_url(url)
    except (ValueError, LocationParseError):
        raise TargetDenied("invalid url: it does not parse") from None
    scheme = (split.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise TargetDenied(f"url scheme must be http or https, got {scheme or 'none'!r}")
    if _UNSAFE_URL_CHAR.search(url):
        raise TargetDenied("invalid url: backslash, whitespace or control characters")
    host = split.hostname or ""
    if not host:
        raise TargetDenied("invalid url: no host")
    mine = normalise_host(_idna(host))
    theirs = normalise_host(other.host or "")
    if mine != theirs or split_port != other.port or scheme != (other.scheme or "").lower():
        raise TargetDenied("invalid url: its host is ambiguous")
    return mine


def _idna(host: str) -> str:
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _ip(text: str) -> Optional[_Address]:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forms(address: _Address) -> Tuple[_Address, ...]:
    """``address`` and, for an IPv6 address that carries an IPv4 one, that too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _IPV4_COMPATIBLE:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return (address, embedded)
    return (address,)


_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def parse_address(text: str) -> Optional[_Address]:
    """An address from ``getpeername``/``getaddrinfo`` (zone ids dropped), or None."""
    return _ip(text.split("%", 1)[0])


# ---------------------------------------------------------------------------
# enforcement where connections are made
# ---------------------------------------------------------------------------
_DEFAULT_TIMEOUT: Any = getattr(urllib3.util.timeout, "_DEFAULT_TIMEOUT", None)


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
    """Pool classes whose connections carry ``policy`` (a pool key cannot carry it).

    They keep urllib3's class names, so error messages read as before."""
    http_conn = type("HTTPConnection", (GuardedHTTPConnection,), {"policy": policy})
    https_conn = type("HTTPSConnection", (GuardedHTTPSConnection,), {"policy": policy})
    http_pool = type("HTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("HTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
    return {"http": http_pool, "https": https_pool}


# ---------------------------------------------------------------------------
# the adapter: check every request's URL, and use the guarded pools
# ---------------------------------------------------------------------------
class GuardedAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose pools (direct and through HTTP proxies) use guarded
    connections, and whose ``send`` refuses ambiguous URLs and denied hosts."""

    def __init__(
        self, policy: TargetPolicy, ages: Optional[ConnectionAges] = None, **kwargs: Any
    ) -> None:
        self.policy = policy
        classes = _pool_classes(policy)
        # given ``ages``, old connections are retired between requests (connage.py)
        self._classes = ages.pool_classes(classes) if ages is not None else classes
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
        mark = getattr(request, _CHECKED, None)
        host = mark[1] if mark is not None and mark[0] == url else self.policy.check_url(url)
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
            if by_name or not self.policy.enabled:
                # Allowed by name, or no allow-list to match an address
                # against: the proxy may know names this host cannot resolve.
                return
            raise TargetDenied(
                f"target host not in the allow-list: {host} (not resolvable here)"
            ) from None
        for *_rest, sockaddr in infos:
            address = parse_address(str(sockaddr[0]))
            if address is not None:
                self.policy.check_address(host, address, by_name=by_name)


#: the attribute of a prepared request that ``mark_checked`` sets
_CHECKED = "_acagent_checked_url"


def mark_checked(request: Any, host: str) -> None:
    """Note on a prepared request that its URL, as it is now, passed ``check_url``
    (giving ``host``): ``GuardedAdapter.send`` then does not check it again.

    The note holds the URL itself, so a URL changed after the check (requests
    prepares a new request for each redirect hop) is checked when it is sent.
    """
    setattr(request, _CHECKED, (str(request.url or ""), host))


def _proxy_for(url: str, proxies: Mapping[str, str]) -> Optional[str]:
    from requests.utils import select_proxy

    return select_proxy(url, dict(proxies))
