"""The HTTP session for target requests: the target policy enforced where connections are made.

Three layers, so no URL trick, redirect or DNS answer gets around the policy
(the first two live in ``policy.py``, so the S3 upload uses them too):

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
from typing import Any, Iterable, Mapping, Optional, Tuple, Union

from requests import Request, Response

from ..envsession import EnvCachedSession
from .policy import GuardedAdapter, TargetPolicy, mark_checked

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

    def request_checked(
        self,
        method: str,
        url: str,
        host: str,
        *,
        headers: Mapping[str, str],
        data: Optional[bytes],
        timeout: Tuple[float, float],
        verify: Union[bool, str],
        proxies: Optional[Mapping[str, str]],
    ) -> Response:
        """``request(method, url, ..., stream=True)`` for a ``url`` that already
        passed ``policy.check_url`` (giving ``host``), so it is checked once:
        the adapter checks the URL it sends only if preparing changed it (a
        redirect hop is checked in ``rebuild_auth``). The steps are
        ``requests.Session.request``'s."""
        prepared = self.prepare_request(
            Request(method=method.upper(), url=url, headers=dict(headers), data=data or {})
        )
        if prepared.url == url:
            mark_checked(prepared, host)
        settings = self.merge_environment_settings(
            prepared.url, dict(proxies or {}), True, verify, None
        )
        return self.send(prepared, timeout=timeout, allow_redirects=True, **settings)

    def rebuild_auth(self, prepared_request: Any, response: Any) -> None:
        new_url = str(prepared_request.url or "")
        mark_checked(prepared_request, self.policy.check_url(new_url, redirect=True))
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
