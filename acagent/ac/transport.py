"""The AC exchange on the wire: one request sent on a kept-alive pool, its reply read (capped).

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

For callers: ``send``. The reply is read before ``send`` returns, so the
connection is back in its pool and the AC permit can be released. Nothing
the server (or a proxy on the way) sends is read without a bound: the body
is streamed and decoded ``READ_SIZE`` bytes at a time, and one that decodes
past ``MAX_REPLY_BYTES``, or that has a Content-Encoding the request did not
accept, is not read further; its connection is closed, not reused half-read,
and ``ACReply.unread`` says why.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union, cast

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connectionpool import HTTPConnectionPool

__all__ = [
    "MAX_REPLY_BYTES",
    "NETWORK_ERRORS",
    "ACReply",
    "ACTransport",
    "is_stale_reset",
    "read_capped",
    "unaccepted_codings",
]

#: the most decoded bytes of one AC reply the agent reads: a task with its
#: request body is far smaller, and every other reply is a small JSON object
#: or a body that is never parsed (put-result, upload-result, upload-logs)
MAX_REPLY_BYTES = 4 * 1024 * 1024
#: of a reply over ``MAX_REPLY_BYTES``, the first bytes kept (``ACReply.content``):
#: enough for an error message and for a get-task reply's ``taskId``
REPLY_HEAD_BYTES = 64 * 1024
#: decoded bytes asked of urllib3 per read; urllib3 >= 2.6 decodes no more
#: than that per read, so a gzip bomb never expands in memory past it
READ_SIZE = 64 * 1024

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


def unaccepted_codings(accept_encoding: str, content_encoding: str) -> List[str]:
    """The content codings of a reply that its request's Accept-Encoding did not accept.

    ``identity`` is always acceptable, ``*`` accepts any coding, one named
    with ``q=0`` is refused, and ``x-gzip`` is ``gzip`` (RFC 9110 12.5.3, 8.4.1.3).
    """

    def coding(item: str) -> str:
        name = item.strip().lower()
        return "gzip" if name == "x-gzip" else name

    accepted = {"identity"}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        quality = params.replace(" ", "").lower()
        if quality.startswith("q=") and quality[2:].strip("0.") == "":
            continue  # q=0: "not acceptable"
        accepted.add(coding(name))
    codings = [coding(item) for item in content_encoding.split(",") if item.strip()]
    return [] if "*" in accepted else [c for c in codings if c not in accepted]


def read_capped(pieces: Iterable[bytes], cap: int) -> Tuple[bytes, bool]:
    """The body from its decoded ``pieces``, and False; or, as soon as it grows
    past ``cap`` bytes, its first ``REPLY_HEAD_BYTES`` bytes and True."""
    body = bytearray()
    for piece in pieces:
        body += piece
        if len(body) > cap:
            return bytes(body[:REPLY_HEAD_BYTES]), True
    return bytes(body), False


class ACReply:
    """An AC reply: status, headers (case-insensitive) and the decoded body bytes.

    ``unread`` is None when ``content`` is the whole body. Otherwise it says
    why the body was not read whole, and ``content`` holds at most its first
    ``REPLY_HEAD_BYTES`` bytes (none when its Content-Encoding was refused).
    """

    __slots__ = ("content", "headers", "status_code", "unread")

    def __init__(
        self,
        status_code: int,
        headers: Mapping[str, str],
        content: bytes,
        unread: Optional[str] = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.unread = unread

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
        self,
        session: requests.Session,
        probe_url: str,
        proxies: Optional[Mapping[str, str]],
        *,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.session = session
        self.max_reply_bytes = max_reply_bytes
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
        Raises one of ``NETWORK_ERRORS`` when the exchange fails. A body the
        transport will not read whole (see ``ACReply.unread``) is no error here:
        the caller decides, since some replies are judged by their status alone.
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
            response = adapter.send(
                prepared, stream=True, timeout=timeout, verify=verify, proxies=proxies
            )
            with response:  # closes (never pools) a connection left half-read
                return self._read(
                    response.status_code,
                    response.headers,
                    request_headers,
                    lambda: response.iter_content(READ_SIZE),
                )
        pool = self._pool(adapter, prepared, verify, proxies)
        raw = pool.urlopen(
            method,
            adapter.request_url(prepared, proxies),
            body=data,
            headers=request_headers,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=True,
            retries=False,
            timeout=self._timeout(timeout),
            chunked=False,
        )
        whole = False
        try:
            reply = self._read(
                raw.status,
                raw.headers,
                request_headers,
                lambda: raw.stream(READ_SIZE, decode_content=True),
            )
            whole = reply.unread is None
        finally:
            if not whole:
                raw.close()  # left half-read (or the read failed): never reused
            raw.release_conn()  # the pool's slot back, the connection open only if read whole
        return reply

    def _read(
        self,
        status: int,
        headers: Mapping[str, str],
        request_headers: Mapping[str, str],
        pieces: Callable[[], Iterable[bytes]],
    ) -> ACReply:
        """The reply, its body read (decoded) from ``pieces()`` up to the cap."""
        refused = unaccepted_codings(
            request_headers.get("Accept-Encoding", ""), headers.get("Content-Encoding", "")
        )
        if refused:
            return ACReply(
                status,
                headers,
                b"",
                f"has Content-Encoding {', '.join(refused)!r}, which the agent did not ask for",
            )
        content, over = read_capped(pieces(), self.max_reply_bytes)
        if over:
            return ACReply(
                status, headers, content, f"decodes to more than {self.max_reply_bytes} bytes"
            )
        return ACReply(status, headers, content)

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
            if len(self._pools) >= 64:  # AC calls name one origin; a bound all the same
                self._pools.clear()
            self._pools[key] = pool
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
