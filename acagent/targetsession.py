"""The HTTP session for target requests: the target policy enforced where connections are made.

Three layers, so no URL trick, redirect or DNS answer gets around the policy
(the first two live in ``allowlist.py``, so the S3 upload uses them too):

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

``TargetSession.request`` builds the executor's plain calls (method, URL,
headers, bytes body) itself instead of going through requests'
``prepare_request``, reusing what is the same for every call; see
``TargetSession.request`` for what it covers and what falls back.
"""

from __future__ import annotations

import http.cookiejar
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Set, Tuple, cast
from urllib.parse import urlsplit

from requests.auth import HTTPBasicAuth
from requests.cookies import RequestsCookieJar
from requests.hooks import default_hooks
from requests.models import PreparedRequest, Response
from requests.sessions import merge_hooks
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity, get_auth_from_url, get_netrc_auth

from .allowlist import GuardedAdapter, TargetPolicy
from .boundedcache import remember
from .client import EnvCachedSession

if TYPE_CHECKING:  # the argument types of requests.Session.request, from types-requests
    from requests.models import _JSON as _Json
    from requests.sessions import (
        _Auth,
        _Cert,
        _Data,
        _Files,
        _HeadersUpdateMapping,
        _HooksInput,
        _Params,
        _TextMapping,
        _Timeout,
        _Verify,
    )

__all__ = [
    "SENSITIVE_HEADERS",
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


def is_sensitive_header(name: str, extra: Iterable[str] = ()) -> bool:
    """True for a header that must not follow a redirect to another origin."""
    lowered = name.strip().lower()
    if lowered in SENSITIVE_HEADERS or lowered in {e.strip().lower() for e in extra}:
        return True
    return any(part in lowered for part in SENSITIVE_PARTS)


# ---------------------------------------------------------------------------
# the session: redirect hygiene and no shared cookies
# ---------------------------------------------------------------------------
class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Keep and send no cookie: the session serves every task of every tenant."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


#: entries kept per cache of ``TargetSession`` (prepared URLs, URL credentials,
#: netrc answers, validated default headers); a full cache is emptied, not
#: evicted entry by entry: refilling costs one slow-path step per entry
_FAST_CACHE_MAX = 256


class TargetSession(EnvCachedSession):
    """A session that checks each redirect hop and strips credentials across origins."""

    def __init__(self, policy: TargetPolicy, *, sensitive_headers: Iterable[str] = ()) -> None:
        super().__init__()
        self.policy = policy
        self.sensitive_headers = tuple(h.strip().lower() for h in sensitive_headers if h.strip())
        self.cookies.set_policy(_NoCookies())
        # Caches of the fast path in request(); each holds the result of a pure
        # function of its key (or of the key and an environment that must not
        # change while the agent runs, as for EnvCachedSession).
        self._prepared_urls: Dict[str, str] = {}
        self._url_auth: Dict[str, Tuple[str, str]] = {}
        self._netrc: Dict[Optional[str], Optional[Tuple[str, str]]] = {}
        self._valid_defaults: Set[Tuple[str, str]] = set()

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

    # -- the fast path ----------------------------------------------------
    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        params: _Params | None = None,
        data: _Data | None = None,
        headers: _HeadersUpdateMapping | None = None,
        cookies: RequestsCookieJar | _TextMapping | None = None,
        files: _Files | None = None,
        auth: _Auth | None = None,
        timeout: _Timeout | None = None,
        allow_redirects: bool = True,
        proxies: _TextMapping | None = None,
        hooks: _HooksInput | None = None,
        stream: bool | None = None,
        verify: _Verify | None = None,
        cert: _Cert | None = None,
        json: _Json | None = None,
    ) -> Response:
        """``requests.Session.request`` with the per-call session work cut down.

        The executor's call (str method and URL, a dict of headers, a bytes
        body or None, timeouts, verify, proxies, stream) is prepared here
        instead of by ``prepare_request``, to the same ``PreparedRequest``:
        the URL as ``prepare_url`` prepares it (cached per URL), the session
        headers merged with the call's like ``merge_setting`` does (same
        precedence, names case-insensitive, None removes), each header
        validated by requests' ``check_header_validity``, the body's
        Content-Length, an empty cookie jar, netrc or URL credentials as
        Basic auth, the session's hooks. What is skipped is work whose result
        is fixed: merging the session's empty cookie jar and params, the
        netrc file lookup (cached per host), validating the unchanged session
        headers again. The environment, proxies, verify and cert still go
        through ``merge_environment_settings`` (cached by EnvCachedSession),
        and ``send`` is requests' own, so redirects (with ``rebuild_auth`` and
        the response hooks on every hop), timeouts and errors are unchanged.

        Any other argument (params, cookies, files, auth, hooks, json,
        ``allow_redirects`` other than True, a body other than bytes, a
        non-str method, URL or header name) or session setting (auth, params,
        a cookie in the jar) goes to ``requests.Session.request`` unchanged.
        """
        prep: Optional[PreparedRequest] = None
        if (
            params is None
            and cookies is None
            and files is None
            and auth is None
            and hooks is None
            and json is None
            and allow_redirects is True
            and type(method) is str
            and type(url) is str
            and (data is None or type(data) is bytes)
        ):
            prep = self._prepare_fast(method, url, data, headers)
        if prep is None:
            return super().request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                cookies=cookies,
                files=files,
                auth=auth,
                timeout=timeout,
                allow_redirects=allow_redirects,
                proxies=proxies,
                hooks=hooks,
                stream=stream,
                verify=verify,
                cert=cert,
                json=json,
            )
        # As requests.Session.request from here: the same settings (this may
        # add environment proxies to a non-empty ``proxies``, as requests does).
        settings = self.merge_environment_settings(prep.url, proxies or {}, stream, verify, cert)
        return self.send(prep, timeout=timeout, allow_redirects=True, **settings)

    def _prepare_fast(
        self,
        method: str,
        url: str,
        data: Optional[bytes],
        headers: Optional[_HeadersUpdateMapping],
    ) -> Optional[PreparedRequest]:
        """The ``PreparedRequest`` ``prepare_request`` makes, or None to fall back.

        Steps in requests' order (netrc, URL, headers, cookies, body, auth,
        hooks), so an invalid request raises the same exception as there.
        """
        defaults = self.headers
        if (
            self.auth is not None
            or self.params
            or len(self.cookies)  # requests would send a cookie put in by hand
            or not isinstance(defaults, Mapping)
            or (headers is not None and not isinstance(headers, Mapping))
        ):
            return None
        # prepare_request: netrc credentials when trust_env and no auth was given
        auth = self._netrc_auth(url) if self.trust_env else None

        prep = PreparedRequest()
        prep.method = method.upper()
        prepared_url = self._prepared_urls.get(url)
        if prepared_url is None:
            # requests' own preparation (and its InvalidURL/MissingSchema);
            # the result depends on the URL string only
            prep.prepare_url(url, None)
            prepared_url = cast(str, prep.url)
            remember(self._prepared_urls, url, prepared_url, _FAST_CACHE_MAX)
        else:
            prep.url = prepared_url

        # merge_setting(headers, session headers, CaseInsensitiveDict): the
        # session's order, the call's value (and its spelling of the name)
        # for a name given in any case, a None value removes the name (from
        # the session's headers too; requests' Request turns headers=None
        # into {}, so this holds for calls without headers as well).
        merged: Dict[str, Tuple[str, Any, bool]] = {}
        for name, value in defaults.items():
            if type(name) is not str:
                return None
            merged[name.lower()] = (name, value, True)
        if headers is not None:
            for given, given_value in headers.items():
                if type(given) is not str:
                    return None
                merged[given.lower()] = (given, given_value, False)
        fields = [f for f in merged.values() if f[1] is not None]
        # prepare_headers: each header validated (InvalidHeader), in order.
        # A session header validated once is not validated again while its
        # value stays the same: the check depends on name and value only.
        valid = self._valid_defaults
        prepared: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for name, value, default in fields:
            known = default and type(value) is str
            if not (known and (name, value) in valid):
                check_header_validity((name, value))
                if known:
                    if len(valid) >= _FAST_CACHE_MAX:
                        valid.clear()
                    valid.add((name, value))
            prepared[name] = value
        prep.headers = prepared

        # prepare_cookies: the jar prepare_request merges from an empty session
        # jar and no call cookies is empty and adds no Cookie header; requests
        # copies it per redirect hop to carry cookies set along the chain.
        cast(Any, prep)._cookies = RequestsCookieJar()

        # prepare_body for bytes (b"" is no body, as ``data or {}`` in requests)
        body = data or None
        if body is not None:
            prepared["Content-Length"] = str(len(body))
        elif prep.method not in ("GET", "HEAD") and prepared.get("Content-Length") is None:
            prepared["Content-Length"] = "0"
        prep.body = body

        # prepare_auth: netrc credentials, else those in the URL, as Basic auth
        # (it recomputes Content-Length afterwards: unchanged, the body is)
        if auth is None:
            url_auth = self._url_auth.get(prepared_url)
            if url_auth is None:
                url_auth = get_auth_from_url(prepared_url)
                remember(self._url_auth, prepared_url, url_auth, _FAST_CACHE_MAX)
            if any(url_auth):
                auth = url_auth
        if auth:
            HTTPBasicAuth(*auth)(prep)

        # prepare_hooks: the session's hooks (_drop_redirect_body) as
        # merge_hooks hands them over when the call brings none
        prep.prepare_hooks(merge_hooks(default_hooks(), self.hooks))  # type: ignore[no-untyped-call]
        return prep

    def _netrc_auth(self, url: str) -> Optional[Tuple[str, str]]:
        """``get_netrc_auth(url)``, looked up once per host.

        requests looks for the netrc file and reads it on every request; its
        answer depends on the host of the URL only (and on the file, which
        must not change while the agent runs, like the environment). A URL
        whose host does not parse goes to requests every time, so it raises
        (or not) exactly as there.
        """
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return get_netrc_auth(url)
        cache = self._netrc
        if host in cache:
            return cache[host]
        found = get_netrc_auth(url)
        remember(cache, host, found, _FAST_CACHE_MAX)
        return found


def build_target_session(
    policy: TargetPolicy, pool_size: int, *, sensitive_headers: Iterable[str] = ()
) -> TargetSession:
    """A keep-alive target session with guarded pools of ``pool_size`` per host."""
    session = TargetSession(policy, sensitive_headers=sensitive_headers)
    adapter = GuardedAdapter(policy, pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.pop("User-Agent", None)  # targets see urllib3's default, as before
    session.hooks["response"].append(_drop_redirect_body)
    return session


def _drop_redirect_body(response: Any, *args: Any, **kwargs: Any) -> Any:
    """Close a redirect reply unread, so requests never decodes its body.

    Before following ``Location``, requests reads the redirect reply's whole
    body (``resp.content``) to free the connection, decoding it in memory: a
    small gzip body that expands to gigabytes would pass the response cap.
    This hook runs before the redirect is followed: it closes the connection
    (it is not reused) and marks the body as read and empty.
    """
    if response.is_redirect:
        response.raw.close()
        response._content = b""
        response._content_consumed = True
    return response
