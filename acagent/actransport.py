"""The AC exchange on the wire: one request sent on a kept-alive pool, the whole reply read.

Every AC call has the same shape: a fixed method and URL, the same headers,
the same proxy, TLS settings and connection pool. ``requests.Session.request``
recomputes all of that on every call (merging session settings, scanning the
proxy environment, building a ``Response``), which in the benchmark was most
of the agent's CPU per task. ``ACTransport`` resolves it once and sends each
request straight to the urllib3 pool that the session's ``HTTPAdapter``
would have used, so TLS (CA bundle, ``verify``), proxies (CONNECT tunnels
for https, absolute URLs for http proxies, ``Proxy-Authorization``) and the
pool's connection classes (``abandon.py``'s tracking) are requests' own.

A session whose adapter is not an ``HTTPAdapter`` (a test's
``requests_mock.Adapter``, a caller's own transport) goes through
``adapter.send`` instead; the reply is the same ``ACReply`` either way.

For callers: ``send``. The reply is read completely before ``send`` returns,
so the connection is back in its pool and the AC permit can be released.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union, cast

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connectionpool import HTTPConnectionPool

from .boundedcache import remember

__all__ = ["NETWORK_ERRORS", "ACReply", "ACTransport", "is_stale_reset"]

#: what a failed exchange raises, whichever path sent it (urllib3 wraps socket
#: errors; a bare ``OSError`` is the agent's own, e.g. a body file it cannot read)
NETWORK_ERRORS: Tuple[Type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
)

#: what a server closing an idle kept-alive connection as we reuse it looks like: it
#: closed without a response (FIN), or before we finished sending. A reset after the
#: request went out (ECONNRESET on read) may mean the server is still working on it,
#: so that one waits for the caller's backoff instead of being re-sent at once.
_RESET_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError)

_TIMEOUTS = (requests.Timeout, urllib3.exceptions.TimeoutError)
_DECODE_ERRORS = (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)


def is_stale_reset(exc: BaseException) -> bool:
    """A reset or close of a connection that was already open (not a connect failure)."""
    if isinstance(exc, _TIMEOUTS + _DECODE_ERRORS):
        return False
    pending = [exc]
    seen = 0
    while pending and seen < 12:  # requests wraps urllib3 wraps the socket error
        current = pending.pop()
        seen += 1
        if isinstance(current, urllib3.exceptions.NewConnectionError):
            return False
        if isinstance(current, _RESET_ERRORS):
            return True
        linked = [a for a in current.args if isinstance(a, BaseException)]
        linked += [
            e
            for e in (getattr(current, "reason", None), current.__cause__, current.__context__)
            if isinstance(e, BaseException)
        ]
        pending.extend(linked)
    return False


class ACReply:
    """A complete AC reply: status, headers (case-insensitive) and body bytes."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced): for error messages."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class ACTransport:
    """Sends AC requests on a session's pools without per-call session work.

    ``session`` provides the adapters, the default headers and (read once, at
    the first call) the proxy and CA-bundle environment; ``proxies`` are the
    configured ones (``--outgoingProxy``), which win over the environment.
    """

    def __init__(
        self, session: requests.Session, probe_url: str, proxies: Optional[Mapping[str, str]]
    ) -> None:
        self.session = session
        self._probe_url = probe_url
        self._proxies = dict(proxies or {})
        self._defaults: Optional[Tuple[Dict[str, str], Dict[str, str], Union[bool, str]]] = None
        self._timeouts: Dict[Tuple[float, float], urllib3.Timeout] = {}
        #: the pool each (adapter, scheme://host:port, verify) was given last
        #: (see ``_pool``)
        self._pools: Dict[Tuple[int, str, Union[bool, str]], HTTPConnectionPool] = {}

    def _settings(self) -> Tuple[Dict[str, str], Dict[str, str], Union[bool, str]]:
        """Session headers, proxies and the CA bundle from the environment (once)."""
        defaults = self._defaults
        if defaults is None:
            merged = self.session.merge_environment_settings(
                self._probe_url, dict(self._proxies), False, True, None
            )
            headers = {k: str(v) for k, v in self.session.headers.items()}
            verify: Union[bool, str] = merged["verify"] if merged["verify"] is not None else True
            defaults = (headers, dict(merged["proxies"] or {}), verify)
            self._defaults = defaults
        return defaults

    def send(
        self,
        method: str,
        url: str,
        data: Any,
        headers: Mapping[str, str],
        timeout: Tuple[float, float],
        verify: Union[bool, str],
    ) -> ACReply:
        """Send one request (no redirect followed, no cookie kept) and read the reply.

        ``verify`` True means the CA bundle of the environment, if any.
        Raises one of ``NETWORK_ERRORS`` when the exchange fails.
        """
        base_headers, proxies, env_verify = self._settings()
        if verify is True:
            verify = env_verify
        request_headers = {**base_headers, **headers}
        if data is not None:
            request_headers["Content-Length"] = str(len(data))
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = url
        prepared.body = data
        adapter = self.session.get_adapter(url)
        if not isinstance(adapter, HTTPAdapter):
            prepared.headers = CaseInsensitiveDict(request_headers)
            reply = adapter.send(
                prepared, stream=False, timeout=timeout, verify=verify, proxies=proxies
            )
            return ACReply(reply.status_code, reply.headers, reply.content)
        pool = self._pool(adapter, prepared, verify, proxies)
        raw = pool.urlopen(
            method,
            adapter.request_url(prepared, proxies),
            body=data,
            headers=request_headers,
            redirect=False,
            assert_same_host=False,
            preload_content=True,
            decode_content=True,
            retries=False,
            timeout=self._timeout(timeout),
            chunked=False,
        )
        return ACReply(raw.status, raw.headers, raw.data)

    def _pool(
        self,
        adapter: HTTPAdapter,
        prepared: requests.PreparedRequest,
        verify: Union[bool, str],
        proxies: Dict[str, str],
    ) -> HTTPConnectionPool:
        """The adapter's pool for this origin, looked up once while it stays open.

        ``get_connection_with_tls_context`` rebuilds the pool key on every
        call (a stat of the CA bundle path, proxy selection, key
        normalisation) and returns the same pool for the same origin and
        settings; the proxies are fixed for this transport. The cache holds
        the pools open until ``close`` (urllib3 2 does not close a pool it
        drops from its PoolManager; it closes its connections when the pool
        is garbage collected); a pool closed meanwhile is looked up afresh.
        """
        url = str(prepared.url)
        scheme, _, rest = url.partition("://")
        key = (id(adapter), f"{scheme.lower()}://{rest.split('/', 1)[0]}", verify)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:
            pool = cast(
                HTTPConnectionPool,
                adapter.get_connection_with_tls_context(prepared, verify, proxies=proxies),
            )
            # AC calls name one origin; a bound all the same
            remember(self._pools, key, pool, 64)
        return pool

    def close(self) -> None:
        """Close the pools this transport looked up (their kept-alive connections)."""
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _timeout(self, timeout: Tuple[float, float]) -> urllib3.Timeout:
        cached = self._timeouts.get(timeout)
        if cached is None:
            cached = self._timeouts[timeout] = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        return cached
