"""Real HTTP servers for tests: a fake ArmorCode server and a fake target tool.

Both fakes are threaded HTTP/1.1 servers (keep-alive, TCP_NODELAY) on
``127.0.0.1`` with an ephemeral port. They are context managers::

    from acagent.testing import FakeACServer, FakeTarget, expected_body

    with FakeTarget() as target, FakeACServer(max_concurrent=2) as ac:
        ac.add_task({"taskId": "t1", "method": "GET", "url": target.url + "/bytes/1000?seed=7"})
        ...  # run the agent against ac.url
        assert ac.wait_for_results(1, timeout=10)
        assert ac.results["t1"][0].body == expected_body(1000, 7)

``FakeACServer`` speaks the http-teleport protocol (see PROTOCOL.md): it hands
out queued tasks, records every result it receives as a ``ReceivedResult``,
counts the requests in flight (the concurrency invariant is checked at a real
server, not at a mock) and injects faults. A second listener plays S3 so that
presigned-URL traffic is not counted as AC traffic.

``FakeTarget`` plays an internal tool: deterministic bodies of any size,
streamed and never built whole in memory (``body_chunks``), content encodings,
chunked replies, and faults (reset, short body, bad encoding, endless body).

Every thread the fakes start is named, stops on ``stop()`` and is joined with
a timeout; every blocking wait inside them is bounded.
"""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.utils
import hashlib
import json
import random
import selectors
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
    cast,
)
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = [
    "AC_ENDPOINTS",
    "FakeACServer",
    "FakeTarget",
    "ReceivedResult",
    "RecordedRequest",
    "body_chunks",
    "closed_port_url",
    "expected_body",
    "expected_sha256",
]

AC_PREFIX = "/api/http-teleport/"
AC_ENDPOINTS: Tuple[str, ...] = (
    "get-task",
    "put-result",
    "upload-result",
    "upload-url",
    "upload-logs",
)
"""The AC endpoint names used by ``inject``, ``count`` and ``RecordedRequest.endpoint``."""

_BLOCK = 65536
_READ_CHUNK = 262144
_MAX_STALL = 60.0
_FOREVER_LIMIT = 120.0
_HANDLER_IDLE_TIMEOUT = 300.0
_JSON_LIMIT = 256 * 1024 * 1024
_PART_LIMIT = 64 * 1024 * 1024
_ECHO_LIMIT = 16 * 1024 * 1024
_CONCURRENCY_BODY = b"Too many concurrent requests"

_T = TypeVar("_T", bound="_FakeBase")


# --------------------------------------------------------------------------
# Deterministic bodies
# --------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _seed_block(seed: int) -> bytes:
    """Two copies of a 64 KiB pseudo-random block derived from ``seed``."""
    block = random.Random(seed).randbytes(_BLOCK)
    return block + block


def _canonical_blocks(size: int, seed: int) -> Iterator[bytes]:
    # Block i is the seed block rotated by an index-dependent amount, with the
    # index stamped into its first 8 bytes, so every offset of the body differs.
    doubled = _seed_block(seed)
    index = 0
    left = size
    while left > 0:
        rot = (index * 40503 + 7) % _BLOCK
        n = min(left, _BLOCK)
        block = index.to_bytes(8, "big") + doubled[rot + 8 : rot + _BLOCK]
        yield block if n == _BLOCK else block[:n]
        left -= n
        index += 1


def body_chunks(size: int, seed: int, chunk: int = _BLOCK) -> Iterator[bytes]:
    """Yield the deterministic body for ``(size, seed)`` in pieces of ``chunk`` bytes.

    The bytes depend only on ``size`` and ``seed`` (a smaller size gives a
    prefix of a larger one); ``chunk`` only changes how they are cut. Nothing
    larger than one 64 KiB block plus one chunk is held in memory.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    if chunk <= 0:
        raise ValueError("chunk must be > 0")
    if chunk == _BLOCK:
        yield from _canonical_blocks(size, seed)
        return
    pending = bytearray()
    for block in _canonical_blocks(size, seed):
        pending += block
        while len(pending) >= chunk:
            yield bytes(pending[:chunk])
            del pending[:chunk]
    if pending:
        yield bytes(pending)


def expected_body(size: int, seed: int) -> bytes:
    """The whole deterministic body for ``(size, seed)`` (for small sizes in tests)."""
    return b"".join(body_chunks(size, seed))


def expected_sha256(size: int, seed: int) -> str:
    """Hex sha256 of the deterministic body, computed streaming."""
    digest = hashlib.sha256()
    for piece in body_chunks(size, seed):
        digest.update(piece)
    return digest.hexdigest()


def _encoded_chunks(size: int, seed: int, encoding: str) -> Iterator[bytes]:
    if encoding == "identity":
        yield from body_chunks(size, seed)
        return
    wbits = 31 if encoding == "gzip" else 15  # gzip wrapper / zlib wrapper ("deflate")
    comp = zlib.compressobj(1, zlib.DEFLATED, wbits)
    for piece in body_chunks(size, seed):
        out = comp.compress(piece)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail


def closed_port_url() -> str:
    """An ``http://127.0.0.1:<port>`` URL on which nothing listens (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    finally:
        sock.close()
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request a fake served.

    ``status`` is 0 when the connection was reset instead of answered;
    ``started``/``finished`` are ``time.monotonic()`` values; ``body_len`` is
    the request body length (after chunked decoding).
    """

    method: str
    path: str
    endpoint: str
    query: Dict[str, str]
    headers: Dict[str, str]
    status: int
    started: float
    finished: float
    body_len: int


@dataclass(frozen=True)
class ReceivedResult:
    """A task result the fake AC server accepted.

    ``via`` is ``"inline"`` (base64 ``output``), ``"empty"`` (no ``output``),
    ``"upload"`` (upload-result), ``"s3"`` (put-result with ``s3Url``),
    ``"error"`` (``output`` starts with ``Agent Side Error``) or ``"logs"``
    (upload-logs). ``body`` holds the decoded body bytes when at most
    ``keep_bodies_up_to`` long, else None; ``body_sha256``/``body_len`` are
    always set when there was a body. An ``"s3"`` result whose object was
    never PUT has ``body=None`` and ``body_len=0``.
    """

    task_id: str
    fields: Dict[str, Any]
    body: Optional[bytes]
    body_sha256: Optional[str]
    body_len: int
    via: str
    file_name: Optional[str] = None
    file_content_type: Optional[str] = None
    received: float = 0.0


@dataclass
class _StoredObject:
    body: Optional[bytes]
    sha256: str
    length: int


@dataclass
class _Raw:
    status: int
    body: bytes
    headers: Dict[str, str]


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: Dict[str, str] = field(default_factory=dict)
    ctype: str = "application/json"
    close: bool = False
    item: Union[Dict[str, Any], _Raw, None] = None  # a queued get-task item it delivers


@dataclass
class _Fault:
    status: Optional[int]
    body: bytes
    headers: Dict[str, str]
    reset: bool
    delay: float
    process: bool
    remaining: int


_CARRY_ON = _Reply(-1)  # a fault that only delays: go on with the normal reply


class _BadRequest(Exception):
    """The request is malformed; ``framing`` means the body can no longer be skipped."""

    def __init__(self, message: str, *, framing: bool = False) -> None:
        super().__init__(message)
        self.framing = framing


# --------------------------------------------------------------------------
# Request bodies, sinks, multipart
# --------------------------------------------------------------------------


class _BodyReader:
    """Reads a request body honouring Content-Length and chunked transfer coding."""

    def __init__(self, rfile: Any, headers: Any) -> None:
        self._rfile = rfile
        te = str(headers.get("Transfer-Encoding", "") or "").lower()
        self._chunked = "chunked" in te
        self._left = 0
        self._chunk_left = 0
        self._eof = False
        self.nread = 0
        if not self._chunked:
            raw = headers.get("Content-Length")
            if raw is not None:
                try:
                    self._left = int(raw)
                except ValueError:
                    raise _BadRequest("bad Content-Length", framing=True) from None
                if self._left < 0:
                    raise _BadRequest("bad Content-Length", framing=True)
            if self._left == 0:
                self._eof = True

    def _read_exact_upto(self, n: int) -> bytes:
        data = cast(bytes, self._rfile.read(n))
        if not data:
            raise _BadRequest("client closed the connection mid-body", framing=True)
        self.nread += len(data)
        return data

    def read(self, n: int = _READ_CHUNK) -> bytes:
        if self._eof:
            return b""
        if not self._chunked:
            data = self._read_exact_upto(min(n, self._left))
            self._left -= len(data)
            if self._left == 0:
                self._eof = True
            return data
        if self._chunk_left == 0:
            line = cast(bytes, self._rfile.readline(1024))
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size line", framing=True) from None
            if size == 0:
                for _ in range(100):  # trailers, bounded
                    trailer = cast(bytes, self._rfile.readline(8192))
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                self._eof = True
                return b""
            self._chunk_left = size
        data = self._read_exact_upto(min(n, self._chunk_left))
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            crlf = cast(bytes, self._rfile.readline(8))
            if crlf not in (b"\r\n", b"\n"):
                raise _BadRequest("chunk not followed by CRLF", framing=True)
        return data

    def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            data = self.read()
            if not data:
                return bytes(out)
            out += data
            if len(out) > limit:
                raise _BadRequest("body too large")

    def drain(self) -> None:
        while self.read():
            pass


class _Sink:
    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Called once the part ended."""


class _NullSink(_Sink):
    def write(self, data: bytes) -> None:
        return None


class _BufferSink(_Sink):
    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self._limit = limit

    def write(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self._limit:
            raise _BadRequest("part too large")


class _DigestSink(_Sink):
    """Hashes and counts everything; keeps the bytes only up to ``keep_up_to``."""

    def __init__(self, keep_up_to: int) -> None:
        self._hash = hashlib.sha256()
        self.length = 0
        self._keep = keep_up_to
        self._buf: Optional[bytearray] = bytearray()

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.length += len(data)
        if self._buf is not None:
            if self.length > self._keep:
                self._buf = None
            else:
                self._buf += data

    def result(self) -> _StoredObject:
        body = bytes(self._buf) if self._buf is not None else None
        return _StoredObject(body, self._hash.hexdigest(), self.length)


class _GunzipSink(_Sink):
    """Gunzips (multi-member) into ``out`` with bounded output per step."""

    _STEP = 1 << 20

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self._dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False

    def write(self, data: bytes) -> None:
        buf = data
        while True:
            try:
                piece = self._dec.decompress(buf, self._STEP)
            except zlib.error as exc:
                raise _BadRequest(f"file part is not valid gzip: {exc}") from None
            if buf:
                self._started = True
            if piece:
                self._out.write(piece)
            if self._dec.eof:
                buf = self._dec.unused_data
                if not buf:
                    return
                self._dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                continue
            buf = self._dec.unconsumed_tail
            if not buf and len(piece) < self._STEP:
                return

    def close(self) -> None:
        if not self._started:
            raise _BadRequest("file part is empty, not gzip")
        if not self._dec.eof:
            raise _BadRequest("file part is truncated gzip")


def _param(msg: Any, name: str) -> Optional[str]:
    value = msg.get_param(name, header="content-disposition")
    if value is None:
        return None
    if isinstance(value, tuple):
        return str(email.utils.collapse_rfc2231_value(value))
    return str(value)


def _parse_multipart(
    read: Callable[[int], bytes], boundary: bytes, open_part: Callable[[Any], _Sink]
) -> None:
    """Stream a multipart/form-data body through per-part sinks (never held whole)."""
    sep = b"\r\n--" + boundary
    buf = b"\r\n"  # lets a delimiter at the very start match ``sep``

    def fill() -> None:
        nonlocal buf
        data = read(_READ_CHUNK)
        if not data:
            raise _BadRequest("multipart body ended early")
        buf += data

    while True:  # preamble
        i = buf.find(sep)
        if i >= 0:
            buf = buf[i + len(sep) :]
            break
        buf = buf[-(len(sep) - 1) :]
        fill()
    header_parser = email.parser.BytesHeaderParser()
    while True:
        while len(buf) < 2:
            fill()
        if buf.startswith(b"--"):
            return  # close delimiter; the caller drains any epilogue
        while True:
            j = buf.find(b"\r\n")
            if j >= 0:
                break
            if len(buf) > 1024:
                raise _BadRequest("bad multipart delimiter line")
            fill()
        buf = buf[j + 2 :]
        while True:
            if buf.startswith(b"\r\n"):
                head, buf = b"", buf[2:]
                break
            k = buf.find(b"\r\n\r\n")
            if k >= 0:
                head, buf = buf[:k], buf[k + 4 :]
                break
            if len(buf) > 65536:
                raise _BadRequest("multipart part headers too long")
            fill()
        sink = open_part(header_parser.parsebytes(head + b"\r\n\r\n"))
        while True:
            i = buf.find(sep)
            if i >= 0:
                sink.write(buf[:i])
                buf = buf[i + len(sep) :]
                break
            safe = len(buf) - (len(sep) - 1)
            if safe > 0:
                sink.write(buf[:safe])
                buf = buf[safe:]
            fill()
        sink.close()


def _boundary(content_type: str) -> Optional[bytes]:
    msg = email.message.Message()
    msg["Content-Type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        return None
    value = msg.get_param("boundary")
    if not isinstance(value, str) or not value:
        return None
    return value.encode("latin-1")


# --------------------------------------------------------------------------
# Server machinery
# --------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = _HANDLER_IDLE_TIMEOUT
    server_version = "acagent-fake/1"

    served: int = 0

    @property
    def srv(self) -> _Server:
        return cast(_Server, self.server)

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10.0)
            self.request.do_handshake()
        super().setup()
        self.served = 0

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def version_string(self) -> str:
        return self.server_version

    def _dispatch(self) -> None:
        try:
            self.srv.dispatch(self)
        finally:
            self.served += 1

    do_GET = _dispatch
    do_HEAD = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch
    do_PATCH = _dispatch
    do_OPTIONS = _dispatch

    def target(self) -> Tuple[str, Dict[str, str]]:
        parts = urlsplit(self.path)
        return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))

    def header_dict(self) -> Dict[str, str]:
        return {k: str(v) for k, v in self.headers.items()}

    def send_head(self, status: int, headers: Iterable[Tuple[str, str]]) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()

    def send_reply(self, reply: _Reply) -> None:
        bodiless = reply.status in (204, 304) or reply.status < 200
        names = {k.lower() for k in reply.headers}
        headers = list(reply.headers.items())
        if reply.body and "content-type" not in names:
            headers.append(("Content-Type", reply.ctype))
        if not bodiless and "content-length" not in names:
            headers.append(("Content-Length", str(len(reply.body))))
        if reply.close:
            headers.append(("Connection", "close"))
        self.send_head(reply.status, headers)
        if reply.body and not bodiless and self.command != "HEAD":
            self.wfile.write(reply.body)

    def abort(self) -> None:
        """Close the connection at once with an RST (SO_LINGER 0), without replying."""
        self.close_connection = True
        sock = self.connection
        self.srv.forget(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()
        finally:
            sock.close()


_Dispatch = Callable[[_Handler], None]


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer with named, tracked connection threads and a stoppable loop.

    The accept loop runs in its own named thread; it can close its listener
    (``set_down``: clients get "connection refused") and re-open it on the
    same port. ``close()`` stops the loop, closes the listener, shuts down
    every open (also kept-alive) connection and joins all threads with a
    deadline.
    """

    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(
        self,
        label: str,
        dispatch: _Dispatch,
        on_connection: Callable[[], None],
        on_error: Callable[[str], None],
        ssl_context: Optional[ssl.SSLContext],
    ) -> None:
        self.label = label
        self.dispatch = dispatch
        self._on_connection = on_connection
        self._on_error = on_error
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._conns: Dict[socket.socket, int] = {}
        self._threads: Set[threading.Thread] = set()
        self._seq = 0
        self._state = threading.Condition()
        self._want_down = False
        self._is_down = False
        self._closing = False
        self._loop: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            super().__init__(("127.0.0.1", 0), _Handler)
        except OSError:
            self._wake_r.close()
            self._wake_w.close()
            raise
        self.port = int(self.server_address[1])
        self.socket = self._prepare(self.socket)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = int(self.server_address[1])

    def _prepare(self, sock: socket.socket) -> socket.socket:
        if self._ssl is not None:
            sock = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        sock.setblocking(False)
        return sock

    def _reopen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(self.request_queue_size)
        except OSError:
            sock.close()
            raise
        return self._prepare(sock)

    # -- loop ---------------------------------------------------------------

    def start_loop(self) -> None:
        self._loop = threading.Thread(target=self._serve, name=f"{self.label}-serve", daemon=True)
        self._loop.start()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        registered = False
        try:
            while True:
                with self._state:
                    if self._closing:
                        return
                    if self._want_down and registered:
                        sel.unregister(self.socket)
                        registered = False
                        self.socket.close()
                        self._is_down = True
                    elif not self._want_down and not registered:
                        if self._is_down:
                            try:
                                self.socket = self._reopen()
                            except OSError as exc:
                                self._on_error(f"{self.label}: cannot re-open port: {exc!r}")
                                self._want_down = True
                                self._state.notify_all()
                                continue
                        sel.register(self.socket, selectors.EVENT_READ)
                        registered = True
                        self._is_down = False
                    self._state.notify_all()
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        self._accept_one()
        finally:
            sel.close()

    def _accept_one(self) -> None:
        try:
            request, addr = self.get_request()
        except OSError:  # BlockingIOError when another accept raced us; aborted handshakes
            return
        if self._closing:
            request.close()
            return
        self.process_request(request, addr)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._seq += 1
            name = f"{self.label}-conn-{self._seq}"
            thread = threading.Thread(
                target=self._conn_main, args=(request, client_address), name=name, daemon=True
            )
            self._conns[request] = self._seq
            self._threads.add(thread)
        self._on_connection()
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)
            self.shutdown_request(request)

    def _conn_main(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - handler crash: record it, keep serving
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # clients going away, resets, TLS failures: normal here
        self._on_error(traceback.format_exc())

    def forget(self, request: Any) -> None:
        with self._lock:
            self._conns.pop(request, None)

    def shutdown_request(self, request: Any) -> None:
        self.forget(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection (kept-alive ones included)."""
        with self._lock:
            for sock in self._conns:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def set_down(self, down: bool, timeout: float = 5.0) -> None:
        with self._state:
            self._want_down = down
            self._wake()
            ok = self._state.wait_for(lambda: self._is_down == down or self._closing, timeout)
        if down:
            self.close_connections()
        if not ok or (not down and self._is_down):
            raise RuntimeError(f"{self.label}: could not switch down={down}")

    def close(self, deadline: float) -> None:
        with self._state:
            self._closing = True
            self._state.notify_all()
        self._wake()
        if self._loop is not None:
            self._loop.join(max(0.0, deadline - time.monotonic()))
        try:
            self.socket.close()
        except OSError:
            pass
        self.close_connections()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()


class _FakeBase:
    """Lifecycle, counters and waiting helpers shared by the two fakes."""

    _label = "Fake"

    def __init__(self, ssl_context: Optional[ssl.SSLContext]) -> None:
        self._ssl_context = ssl_context
        self._cond = threading.Condition(threading.RLock())
        self._stop_event = threading.Event()
        self._server: Optional[_Server] = None
        self._inflight = 0
        self._max_inflight = 0
        self._connections_opened = 0
        self._requests: List[RecordedRequest] = []
        self._errors: List[str] = []
        self._arrivals: Dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def _make_server(self, label: str, dispatch: _Dispatch, count: bool) -> _Server:
        return _Server(
            label,
            dispatch,
            self._on_connection if count else _noop,
            self._on_error,
            self._ssl_context,
        )

    def _on_connection(self) -> None:
        with self._cond:
            self._connections_opened += 1
            self._cond.notify_all()

    def _on_error(self, text: str) -> None:
        with self._cond:
            self._errors.append(text)

    def start(self: _T) -> _T:
        """Bind and start serving; returns self. Idempotent."""
        if self._server is None:
            self._stop_event.clear()
            self._start_servers()
        return self

    def _start_servers(self) -> None:
        raise NotImplementedError

    def _all_servers(self) -> List[_Server]:
        return [self._server] if self._server is not None else []

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: wakes waiting handlers, closes listeners and open connections.

        Joins every thread with an overall deadline of ``timeout`` seconds.
        """
        servers = self._all_servers()
        if not servers:
            return
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
        self._release_waiters()
        for server in servers:
            server.close(deadline)
        self._forget_servers()

    def _release_waiters(self) -> None:
        return None

    def _forget_servers(self) -> None:
        self._server = None

    def __enter__(self: _T) -> _T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (``https`` with an ssl_context)."""
        server = self._server
        if server is None:
            raise RuntimeError(f"{self._label} is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{server.port}"

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stop_event.wait(seconds)

    # -- counters ----------------------------------------------------------

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    @property
    def max_inflight(self) -> int:
        with self._cond:
            return self._max_inflight

    @property
    def connections_opened(self) -> int:
        with self._cond:
            return self._connections_opened

    @property
    def requests(self) -> List[RecordedRequest]:
        """A copy of the recorded requests, in completion order."""
        with self._cond:
            return list(self._requests)

    @property
    def errors(self) -> List[str]:
        """Tracebacks of unexpected handler crashes (should stay empty)."""
        with self._cond:
            return list(self._errors)

    def count(self, endpoint: str, status: Optional[int] = None) -> int:
        """Requests completed for ``endpoint`` (``"*"`` = any), optionally with ``status``."""
        with self._cond:
            return sum(
                1
                for r in self._requests
                if (endpoint == "*" or r.endpoint == endpoint)
                and (status is None or r.status == status)
            )

    def reset_counters(self) -> None:
        """Clear recorded requests and counters (``max_inflight`` restarts from ``inflight``)."""
        with self._cond:
            self._requests.clear()
            self._arrivals.clear()
            self._max_inflight = self._inflight
            self._connections_opened = 0

    def _begin(self, endpoint: str, counted: bool, limit: Optional[int] = None) -> bool:
        """Note an arriving request; returns True when it is above ``limit`` in flight.

        The limit check and the in-flight increment are one atomic step.
        """
        with self._cond:
            self._arrivals[endpoint] = self._arrivals.get(endpoint, 0) + 1
            over = False
            if counted:
                over = limit is not None and self._inflight >= limit
                self._inflight += 1
                self._max_inflight = max(self._max_inflight, self._inflight)
            self._cond.notify_all()
            return over

    def _end(self, record: RecordedRequest, counted: bool) -> None:
        self._record(record)
        if counted:
            self._end_inflight()

    def _record(self, record: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(record)
            self._after_record(record)
            self._cond.notify_all()

    def _end_inflight(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    @staticmethod
    def _recorded(
        h: _Handler,
        path: str,
        endpoint: str,
        query: Dict[str, str],
        status: int,
        started: float,
        reader: Optional[_BodyReader],
    ) -> RecordedRequest:
        return RecordedRequest(
            method=h.command,
            path=path,
            endpoint=endpoint,
            query=query,
            headers=h.header_dict(),
            status=status,
            started=started,
            finished=time.monotonic(),
            body_len=reader.nread if reader is not None else 0,
        )

    def _after_record(self, record: RecordedRequest) -> None:
        return None

    # -- waiting -----------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (condition-based) until ``predicate()`` is true; False on timeout.

        The predicate runs under the fake's lock; it may read the fake's properties.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def arrivals(self, endpoint: str) -> int:
        """Requests to ``endpoint`` (``"*"`` = any) whose request line and headers
        arrived, including ones still in flight (stalled, held, slow)."""
        with self._cond:
            if endpoint == "*":
                return sum(self._arrivals.values())
            return self._arrivals.get(endpoint, 0)

    def wait_for_requests(
        self, endpoint: str, n: int, timeout: float, *, completed: bool = False
    ) -> bool:
        """Wait until at least ``n`` requests to ``endpoint`` (``"*"`` = any) arrived.

        An arrived request may still be in flight (e.g. held by ``stall``). With
        ``completed=True`` wait until ``n`` were answered (``count(endpoint) >= n``).
        """
        if completed:
            return self.wait_for(lambda: self.count(endpoint) >= n, timeout)
        return self.wait_for(lambda: self.arrivals(endpoint) >= n, timeout)


def _noop() -> None:
    return None


# --------------------------------------------------------------------------
# FakeACServer
# --------------------------------------------------------------------------


class FakeACServer(_FakeBase):
    """A fake ArmorCode http-teleport server (plus a small fake S3) for tests.

    Options (keyword-only):

    - ``max_concurrent``: above this many AC requests in flight, answer 429
      ``Too many concurrent requests`` (None = no limit).
    - ``api_key``: if set, AC requests without ``Authorization: Bearer <key>`` get 401.
    - ``empty_reply``: ``"null"`` (200 ``{"data": null}``) or ``"204"`` for an empty get-task.
    - ``hold_poll``: long poll; an empty get-task waits up to this long for a task.
    - ``latency``: added to every AC request (it counts in flight meanwhile).
    - ``connection_cost``: delay before the first request of each new TCP
      connection (models TCP+TLS handshakes; not counted in flight).
    - ``ssl_context``: serve https (both AC and S3 listeners).
    - ``keep_bodies_up_to``: decoded bodies up to this size are kept as bytes;
      larger ones only as sha256 + length.

    ``inflight`` counts AC requests from the parsed request line until the
    reply is written, including requests answered 429 (so a client that
    breaks the limit shows ``max_inflight > max_concurrent``). S3 requests are
    recorded (endpoint ``"s3"``) but never counted in flight or as connections.

    ``set_down(True)`` closes the AC listener (new connections are *refused*)
    and resets every open AC connection; ``set_down(False)`` listens again on
    the same port.
    """

    _label = "FakeACServer"

    def __init__(
        self,
        *,
        max_concurrent: Optional[int] = 2,
        api_key: Optional[str] = None,
        empty_reply: str = "null",
        hold_poll: float = 0.0,
        latency: float = 0.0,
        connection_cost: float = 0.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        keep_bodies_up_to: int = 8 * 1024 * 1024,
    ) -> None:
        if empty_reply not in ("null", "204"):
            raise ValueError('empty_reply must be "null" or "204"')
        super().__init__(ssl_context)
        self.max_concurrent = max_concurrent
        self.api_key = api_key
        self.empty_reply = empty_reply
        self.hold_poll = hold_poll
        self.latency = latency
        self.connection_cost = connection_cost
        self.keep_bodies_up_to = keep_bodies_up_to
        self._s3: Optional[_Server] = None
        self._queue: Deque[Union[Dict[str, Any], _Raw]] = deque()
        self._results: Dict[str, List[ReceivedResult]] = {}
        self._order: List[ReceivedResult] = []
        self._objects: Dict[str, _StoredObject] = {}
        self._faults: Dict[str, Deque[_Fault]] = {}
        self._stalls: Dict[str, threading.Event] = {}
        self._count_429 = 0
        self._rejected_concurrent = 0
        self._tasks_handed_out = 0
        self._rate_p = 0.0
        self._rate_rng = random.Random(0)
        self._rate_kinds: Tuple[str, ...] = ()
        self._rate_endpoints: Tuple[str, ...] = ()
        self._rate_retry_after = 1
        self._rate_slow = 0.5

    # -- lifecycle ---------------------------------------------------------

    def _start_servers(self) -> None:
        ac = self._make_server(self._label, self._handle_ac, count=True)
        try:
            s3 = self._make_server(f"{self._label}-s3", self._handle_s3, count=False)
        except OSError:
            ac.server_close()
            raise
        self._server, self._s3 = ac, s3
        ac.start_loop()
        s3.start_loop()

    def _all_servers(self) -> List[_Server]:
        return [s for s in (self._server, self._s3) if s is not None]

    def _forget_servers(self) -> None:
        self._server = None
        self._s3 = None

    def _release_waiters(self) -> None:
        with self._cond:
            stalls = list(self._stalls.values())
        for event in stalls:
            event.set()

    @property
    def s3_url(self) -> str:
        """Base URL of the fake S3 listener."""
        if self._s3 is None:
            raise RuntimeError("FakeACServer is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._s3.port}"

    def set_down(self, down: bool) -> None:
        """While down, new AC connections are refused and open ones are reset."""
        if self._server is None:
            raise RuntimeError("FakeACServer is not started")
        self._server.set_down(down)

    # -- tasks -------------------------------------------------------------

    def add_task(self, task: Dict[str, Any]) -> None:
        """Queue a task (FIFO); a held get-task returns it at once."""
        with self._cond:
            self._queue.append(dict(task))
            self._cond.notify_all()

    def add_tasks(self, tasks: Iterable[Dict[str, Any]]) -> None:
        with self._cond:
            for task in tasks:
                self._queue.append(dict(task))
            self._cond.notify_all()

    def add_raw_reply(
        self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None
    ) -> None:
        """Queue a raw reply, served to one get-task in FIFO order with the tasks."""
        with self._cond:
            self._queue.append(_Raw(status, bytes(body), dict(headers or {})))
            self._cond.notify_all()

    def pending_tasks(self) -> int:
        """Queued items (tasks and raw replies) not yet handed out."""
        with self._cond:
            return len(self._queue)

    @property
    def tasks_handed_out(self) -> int:
        """Tasks whose get-task reply was written to the socket.

        A reply that cannot be written (the connection was closed by
        ``set_down``/``stop``) puts its task back at the front of the queue
        instead; a task lost on purpose (``inject(..., process=True)``) counts.
        """
        with self._cond:
            return self._tasks_handed_out

    # -- results -----------------------------------------------------------

    @property
    def results(self) -> Dict[str, List[ReceivedResult]]:
        """Results by task id (a list per id, so duplicates are visible)."""
        with self._cond:
            return {k: list(v) for k, v in self._results.items()}

    def all_results(self) -> List[ReceivedResult]:
        """Results in arrival order."""
        with self._cond:
            return list(self._order)

    def clear_results(self) -> None:
        with self._cond:
            self._results.clear()
            self._order.clear()

    def wait_for_results(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` distinct task ids have a result."""
        return self.wait_for(lambda: len(self._results) >= n, timeout)

    def _record_result(self, result: ReceivedResult) -> None:
        with self._cond:
            self._results.setdefault(result.task_id, []).append(result)
            self._order.append(result)
            self._cond.notify_all()

    # -- counters ----------------------------------------------------------

    @property
    def count_429(self) -> int:
        """429 replies sent (concurrency limit and injected)."""
        with self._cond:
            return self._count_429

    @property
    def rejected_concurrent(self) -> int:
        """429 replies sent because of ``max_concurrent``."""
        with self._cond:
            return self._rejected_concurrent

    def reset_counters(self) -> None:
        with self._cond:
            super().reset_counters()
            self._count_429 = 0
            self._rejected_concurrent = 0
            self._tasks_handed_out = 0

    def _after_record(self, record: RecordedRequest) -> None:
        if record.status == 429:
            self._count_429 += 1

    # -- faults ------------------------------------------------------------

    def inject(
        self,
        endpoint: str,
        *,
        status: Optional[int] = None,
        body: bytes = b"",
        headers: Optional[Dict[str, str]] = None,
        reset: bool = False,
        delay: float = 0.0,
        times: int = 1,
        process: bool = False,
    ) -> None:
        """Fault the next ``times`` requests to ``endpoint`` (an AC endpoint, ``"s3"``,
        or ``"*"`` for any AC endpoint). Faults queue FIFO per endpoint.

        ``status``: answer it (with ``body``/``headers``); ``reset``: read the
        request, then close with an RST and no reply; ``delay``: sleep first
        (alone: a slow but normal reply). ``process=True`` handles the request
        normally (records the result, pops the task) and then applies the
        fault to the reply: a lost-reply scenario.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        fault = _Fault(status, bytes(body), dict(headers or {}), reset, delay, process, times)
        with self._cond:
            self._faults.setdefault(endpoint, deque()).append(fault)

    def clear_faults(self) -> None:
        """Drop queued faults and disable ``fault_rate``."""
        with self._cond:
            self._faults.clear()
            self._rate_p = 0.0

    def fault_rate(
        self,
        p: float,
        seed: int,
        kinds: Iterable[str] = ("503", "429s", "429d", "reset", "slow"),
        *,
        endpoints: Iterable[str] = AC_ENDPOINTS,
        retry_after: int = 1,
        slow_delay: float = 0.5,
    ) -> None:
        """Fail each request to ``endpoints`` with probability ``p`` (seeded, independent
        draws per request). Kinds: a status code such as ``"503"``; ``"429s"`` (429 with
        ``X-Rate-Limit-Retry-After-Seconds: retry_after``); ``"429d"`` (429 with an
        HTTP-date ``Retry-After``); ``"429c"`` (429 ``Too many concurrent requests``);
        ``"reset"``; ``"slow"`` (``slow_delay`` seconds, then a normal reply).
        ``p=0`` disables it. Queued ``inject`` faults take precedence.
        """
        kinds_t = tuple(kinds)
        for kind in kinds_t:
            if kind not in ("429s", "429d", "429c", "reset", "slow") and not kind.isdigit():
                raise ValueError(f"unknown fault kind {kind!r}")
        if p > 0 and not kinds_t:
            raise ValueError("kinds must not be empty")
        with self._cond:
            self._rate_p = p
            self._rate_rng = random.Random(seed)
            self._rate_kinds = kinds_t
            self._rate_endpoints = tuple(endpoints)
            self._rate_retry_after = retry_after
            self._rate_slow = slow_delay

    def _rate_fault(self, kind: str) -> _Fault:
        if kind == "429s":
            hdrs = {"X-Rate-Limit-Retry-After-Seconds": str(self._rate_retry_after)}
            return _Fault(429, b"Rate limit exceeded", hdrs, False, 0.0, False, 1)
        if kind == "429d":
            when = email.utils.formatdate(time.time() + self._rate_retry_after, usegmt=True)
            return _Fault(429, b"Rate limit exceeded", {"Retry-After": when}, False, 0.0, False, 1)
        if kind == "429c":
            return _Fault(429, _CONCURRENCY_BODY, {}, False, 0.0, False, 1)
        if kind == "reset":
            return _Fault(None, b"", {}, True, 0.0, False, 1)
        if kind == "slow":
            return _Fault(None, b"", {}, False, self._rate_slow, False, 1)
        return _Fault(int(kind), b"Injected failure", {}, False, 0.0, False, 1)

    def _take_fault(self, endpoint: str) -> Optional[_Fault]:
        with self._cond:
            keys = (endpoint,) if endpoint == "s3" else (endpoint, "*")
            for key in keys:
                queue = self._faults.get(key)
                if queue:
                    fault = queue[0]
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        queue.popleft()
                    return fault
            if self._rate_p > 0 and endpoint in self._rate_endpoints:
                if self._rate_rng.random() < self._rate_p:
                    return self._rate_fault(self._rate_rng.choice(self._rate_kinds))
            return None

    def stall(self, endpoint: str) -> threading.Event:
        """Hold requests to ``endpoint`` (in flight) until the returned event is set.

        Bounded: a stalled request waits at most 60 s; ``stop()`` releases it.
        """
        with self._cond:
            event = self._stalls.get(endpoint)
            if event is None or event.is_set():
                event = threading.Event()
                self._stalls[endpoint] = event
            return event

    def unstall(self, endpoint: str) -> None:
        with self._cond:
            event = self._stalls.pop(endpoint, None)
        if event is not None:
            event.set()

    def _wait_stall(self, endpoint: str) -> None:
        with self._cond:
            event = self._stalls.get(endpoint)
            if event is None and endpoint != "s3":
                event = self._stalls.get("*")
        if event is not None:
            event.wait(_MAX_STALL)

    # -- request handling --------------------------------------------------

    def _handle_ac(self, h: _Handler) -> None:
        if h.served == 0 and self.connection_cost > 0:
            self._sleep(self.connection_cost)
        self._handle(h, ac=True)

    def _handle_s3(self, h: _Handler) -> None:
        self._handle(h, ac=False)

    def _handle(self, h: _Handler, *, ac: bool) -> None:
        path, query = h.target()
        if ac:
            endpoint = path[len(AC_PREFIX) :] if path.startswith(AC_PREFIX) else "unknown"
            if endpoint not in AC_ENDPOINTS:
                endpoint = "unknown"
        else:
            endpoint = "s3"
        started = time.monotonic()
        rejected = self._begin(endpoint, counted=ac, limit=self.max_concurrent)
        if rejected:
            with self._cond:
                self._rejected_concurrent += 1
        status = 0
        recorded = False
        reader: Optional[_BodyReader] = None
        try:
            try:
                reader = _BodyReader(h.rfile, h.headers)
                reply = self._reply_for(h, endpoint, path, query, reader, rejected, ac)
                if reply is not None:
                    reader.drain()
            except _BadRequest as exc:
                reply = _Reply(400, str(exc).encode(), ctype="text/plain", close=exc.framing)
                if not exc.framing and reader is not None:
                    try:
                        reader.drain()
                    except _BadRequest:
                        reply.close = True
            status = reply.status if reply is not None else 0
            # Recorded before the reply is written, so a client that got its
            # reply always finds its request (and result) recorded.
            self._record(self._recorded(h, path, endpoint, query, status, started, reader))
            recorded = True
            if reply is None:
                h.abort()
            else:
                try:
                    h.send_reply(reply)
                except OSError:
                    self._undeliverable(reply.item)
                    raise
                self._delivered(reply.item)
        finally:
            if not recorded:
                self._record(self._recorded(h, path, endpoint, query, status, started, reader))
            if ac:
                self._end_inflight()

    def _fault_reply(self, fault: _Fault, reader: _BodyReader) -> Optional[_Reply]:
        self._sleep(fault.delay)
        if fault.reset:
            reader.drain()
            return None
        if fault.status is not None:
            return _Reply(fault.status, fault.body, dict(fault.headers), ctype="text/plain")
        return _CARRY_ON  # delay only: then a normal reply

    def _reply_for(
        self,
        h: _Handler,
        endpoint: str,
        path: str,
        query: Dict[str, str],
        reader: _BodyReader,
        rejected: bool,
        ac: bool,
    ) -> Optional[_Reply]:
        if rejected:
            return _Reply(429, _CONCURRENCY_BODY, ctype="text/plain")
        if ac and self.api_key is not None:
            if h.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _Reply(401, b'{"error": "unauthorized"}')
        if endpoint == "unknown":
            return _Reply(404, b'{"error": "no such endpoint"}')
        self._wait_stall(endpoint)
        fault = self._take_fault(endpoint)
        if fault is not None and not fault.process:
            early = self._fault_reply(fault, reader)
            if early is not _CARRY_ON:
                return early
        if ac:
            self._sleep(self.latency)
            reply = self._route_ac(h, endpoint, query, reader)
        else:
            reply = self._route_s3(h, path, reader)
        if fault is not None and fault.process:
            reader.drain()
            late = self._fault_reply(fault, reader)
            if late is not _CARRY_ON:
                self._delivered(reply.item)  # deliberately lost
                return late
        return reply

    # -- AC endpoints ------------------------------------------------------

    def _route_ac(
        self, h: _Handler, endpoint: str, query: Dict[str, str], reader: _BodyReader
    ) -> _Reply:
        expected = "POST"
        if endpoint in ("get-task", "upload-url"):
            expected = "GET"
        if h.command != expected:
            return _Reply(405, b'{"error": "method not allowed"}', {"Allow": expected})
        if endpoint == "get-task":
            return self._get_task(query)
        if endpoint == "put-result":
            return self._put_result(reader)
        if endpoint == "upload-url":
            name = query.get("fileName", "")
            if not name:
                return _Reply(400, b'{"error": "fileName required"}')
            put_url = f"{self.s3_url}/s3/{quote(name)}"
            data = {"data": {"putUrl": put_url, "getUrl": put_url + "?get=1"}}
            return _Reply(200, json.dumps(data).encode())
        return self._multipart_result(h, reader, logs=endpoint == "upload-logs")

    def _get_task(self, query: Dict[str, str]) -> _Reply:
        if not query.get("agentId"):
            return _Reply(400, b'{"error": "agentId required"}')
        deadline = time.monotonic() + self.hold_poll
        with self._cond:
            while not self._queue and not self._stop_event.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            item = self._queue.popleft() if self._queue else None
        if item is None:
            if self.empty_reply == "204":
                return _Reply(204)
            return _Reply(200, b'{"data": null}')
        if isinstance(item, _Raw):
            return _Reply(item.status, item.body, dict(item.headers), item=item)
        return _Reply(200, json.dumps({"data": item}).encode(), item=item)

    def _delivered(self, item: Union[Dict[str, Any], _Raw, None]) -> None:
        # A task counts as handed out once its reply was written (or deliberately lost).
        if isinstance(item, dict):
            with self._cond:
                self._tasks_handed_out += 1
                self._cond.notify_all()

    def _undeliverable(self, item: Union[Dict[str, Any], _Raw, None]) -> None:
        # The reply could not be written (connection gone): the item goes back in front.
        if item is not None:
            with self._cond:
                self._queue.appendleft(item)
                self._cond.notify_all()

    def _put_result(self, reader: _BodyReader) -> _Reply:
        raw = reader.read_all(_JSON_LIMIT)
        try:
            fields = json.loads(raw)
        except ValueError:
            raise _BadRequest("put-result body is not JSON") from None
        if not isinstance(fields, dict):
            raise _BadRequest("put-result body is not a JSON object")
        task_id = fields.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise _BadRequest("taskId missing")
        output = fields.get("output")
        body: Optional[_StoredObject] = None
        if isinstance(output, str) and output.startswith("Agent Side Error"):
            via = "error"
        elif fields.get("s3Url"):
            via = "s3"
            s3_path = urlsplit(str(fields["s3Url"])).path
            if s3_path.startswith("/s3/"):
                with self._cond:
                    body = self._objects.get(unquote(s3_path[4:]))
        elif output is None:
            via = "empty"
        else:
            via = "inline"
            if not isinstance(output, str):
                raise _BadRequest("output is not a string")
            if fields.get("responseBase64") is True:
                try:
                    data = base64.b64decode(output, validate=True)
                except ValueError:
                    raise _BadRequest("output is not valid base64") from None
            else:
                data = output.encode("utf-8", "surrogateescape")
            sink = _DigestSink(self.keep_bodies_up_to)
            sink.write(data)
            body = sink.result()
        self._record_result(
            ReceivedResult(
                task_id=task_id,
                fields=fields,
                body=body.body if body is not None else None,
                body_sha256=body.sha256 if body is not None else None,
                body_len=body.length if body is not None else 0,
                via=via,
                received=time.monotonic(),
            )
        )
        return _Reply(200, b'{"data": "ok"}')

    def _multipart_result(self, h: _Handler, reader: _BodyReader, *, logs: bool) -> _Reply:
        boundary = _boundary(str(h.headers.get("Content-Type", "")))
        if boundary is None:
            raise _BadRequest("expected multipart/form-data with a boundary")
        file_sink: Optional[_DigestSink] = None
        file_meta: Dict[str, Optional[str]] = {}
        task_sink: Optional[_BufferSink] = None

        def open_part(msg: Any) -> _Sink:
            nonlocal file_sink, task_sink
            name = _param(msg, "name")
            if name == "file" and file_sink is None:
                file_sink = _DigestSink(self.keep_bodies_up_to)
                filename = msg.get_filename()
                ctype = msg.get_content_type() if msg.get("Content-Type") else None
                file_meta["name"] = filename
                file_meta["type"] = ctype
                zipped = (filename or "").endswith(".zip") or ctype == "application/zip"
                if zipped and not logs:
                    return _GunzipSink(file_sink)
                return file_sink
            if name == "task" and task_sink is None:
                task_sink = _BufferSink(_PART_LIMIT)
                return task_sink
            return _NullSink()

        _parse_multipart(reader.read, boundary, open_part)
        if file_sink is None:
            raise _BadRequest("multipart part 'file' missing")
        if task_sink is None:
            raise _BadRequest("multipart part 'task' missing")
        try:
            fields = json.loads(bytes(task_sink.data))
        except ValueError:
            raise _BadRequest("part 'task' is not JSON") from None
        if not isinstance(fields, dict):
            raise _BadRequest("part 'task' is not a JSON object")
        task_id = fields.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise _BadRequest("taskId missing")
        stored = file_sink.result()
        self._record_result(
            ReceivedResult(
                task_id=task_id,
                fields=fields,
                body=stored.body,
                body_sha256=stored.sha256,
                body_len=stored.length,
                via="logs" if logs else "upload",
                file_name=file_meta.get("name"),
                file_content_type=file_meta.get("type"),
                received=time.monotonic(),
            )
        )
        return _Reply(200, b'{"data": "ok"}')

    # -- S3 ----------------------------------------------------------------

    def _route_s3(self, h: _Handler, path: str, reader: _BodyReader) -> _Reply:
        if not path.startswith("/s3/") or len(path) <= 4:
            return _Reply(404, b"no such key", ctype="text/plain")
        name = unquote(path[4:])
        if h.command == "PUT":
            sink = _DigestSink(self.keep_bodies_up_to)
            while True:
                data = reader.read()
                if not data:
                    break
                sink.write(data)
            stored = sink.result()
            with self._cond:
                self._objects[name] = stored
            return _Reply(200, headers={"ETag": f'"{stored.sha256[:32]}"'})
        if h.command in ("GET", "HEAD"):
            with self._cond:
                obj = self._objects.get(name)
            if obj is None or obj.body is None:
                return _Reply(404, b"no such key (or too large to keep)", ctype="text/plain")
            return _Reply(200, obj.body, ctype="application/octet-stream")
        return _Reply(405, b"method not allowed", ctype="text/plain")

    def s3_object(self, name: str) -> Optional[Tuple[Optional[bytes], str, int]]:
        """``(body or None, sha256, length)`` of a stored S3 object, or None."""
        with self._cond:
            obj = self._objects.get(name)
        return None if obj is None else (obj.body, obj.sha256, obj.length)


# --------------------------------------------------------------------------
# FakeTarget
# --------------------------------------------------------------------------


class FakeTarget(_FakeBase):
    """A fake internal tool. Routes (any method; ``latency``, ``jitter``, ``status`` apply to all):

    - ``/bytes/<size>?seed=S&encoding=identity|gzip|deflate&chunked=0|1&ctype=T``:
      the deterministic body of ``(size, seed)``, streamed; Content-Length unless chunked
      (for encoded bodies it is computed by a first compression pass).
    - ``/echo``: JSON ``{method, path, query, headers, body, body_base64, body_len}``
      (``body`` is UTF-8 decoded with ``surrogateescape``).
    - ``/reset/<size>``: headers + half the body, then RST.
    - ``/wrong-length/<size>``: declares a larger Content-Length than it sends, then closes.
    - ``/bad-encoding/<size>``: ``Content-Encoding: gzip`` over non-gzip bytes.
    - ``/forever``: chunked bytes until the client goes away (at most 120 s).
    - ``/slow-headers?latency=S``: waits, then ``ok``.
    - ``/redirect?to=URL&code=302``.
    """

    _label = "FakeTarget"

    def __init__(self, *, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        super().__init__(ssl_context)
        self._rng = random.Random()

    def _start_servers(self) -> None:
        self._server = self._make_server(self._label, self._handle, count=True)
        self._server.start_loop()

    def _handle(self, h: _Handler) -> None:
        path, query = h.target()
        segments = [s for s in path.split("/") if s]
        route = segments[0] if segments else ""
        started = time.monotonic()
        self._begin(route, counted=True)
        status = 0
        reader: Optional[_BodyReader] = None
        try:
            try:
                reader = _BodyReader(h.rfile, h.headers)
                body = reader.read_all(_ECHO_LIMIT) if route == "echo" else b""
                reader.drain()
                delay = float(query.get("latency", "0") or 0)
                jitter = float(query.get("jitter", "0") or 0)
                if jitter > 0:
                    delay += self._rng.uniform(0.0, jitter)
                self._sleep(delay)
                status = self._route(h, route, segments, query, body)
            except (_BadRequest, ValueError) as exc:
                framing = isinstance(exc, _BadRequest) and exc.framing
                h.send_reply(_Reply(400, str(exc).encode(), ctype="text/plain", close=framing))
                status = 400
        finally:
            self._end(self._recorded(h, path, route, query, status, started, reader), counted=True)

    def _route(
        self,
        h: _Handler,
        route: str,
        segments: List[str],
        query: Dict[str, str],
        body: bytes,
    ) -> int:
        status = int(query.get("status", "200") or 200)
        if status < 200 or status > 999:
            raise ValueError("status must be 200..999")
        size = int(segments[1]) if len(segments) > 1 else 0
        seed = int(query.get("seed", "0") or 0)
        if size < 0:
            raise ValueError("size must be >= 0")
        if route == "bytes":
            self._send_bytes(h, status, size, seed, query)
            return status
        if route == "echo":
            info = {
                "method": h.command,
                "path": urlsplit(h.path).path,
                "query": query,
                "headers": h.header_dict(),
                "body": body.decode("utf-8", "surrogateescape"),
                "body_base64": base64.b64encode(body).decode("ascii"),
                "body_len": len(body),
            }
            h.send_reply(_Reply(status, json.dumps(info).encode()))
            return status
        if route == "reset":
            h.send_head(
                200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
            )
            for piece in body_chunks(size // 2, seed):
                h.wfile.write(piece)
            h.abort()
            return 0
        if route == "wrong-length":
            h.close_connection = True
            h.send_head(
                200,
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(size + max(size, 1))),
                ],
            )
            for piece in body_chunks(size, seed):
                h.wfile.write(piece)
            return 200
        if route == "bad-encoding":
            h.send_head(
                200,
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Encoding", "gzip"),
                    ("Content-Length", str(size)),
                ],
            )
            for piece in body_chunks(size, seed):
                h.wfile.write(piece)
            return 200
        if route == "forever":
            self._send_forever(h, seed)
            return 200
        if route == "slow-headers":
            h.send_reply(_Reply(status, b"ok", ctype="text/plain"))
            return status
        if route == "redirect":
            code = int(query.get("code", "302") or 302)
            to = query.get("to", "")
            if not to:
                raise ValueError("to= required")
            h.send_reply(_Reply(code, headers={"Location": to}))
            return code
        h.send_reply(_Reply(404, b"no such route", ctype="text/plain"))
        return 404

    def _send_bytes(
        self, h: _Handler, status: int, size: int, seed: int, query: Dict[str, str]
    ) -> None:
        encoding = query.get("encoding", "identity") or "identity"
        if encoding not in ("identity", "gzip", "deflate"):
            raise ValueError("encoding must be identity, gzip or deflate")
        chunked = (query.get("chunked", "0") or "0") == "1"
        headers = [("Content-Type", query.get("ctype") or "application/octet-stream")]
        if status in (204, 304):
            h.send_head(status, headers)
            return
        if encoding != "identity":
            headers.append(("Content-Encoding", encoding))
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            length = size
            if encoding != "identity":
                length = sum(len(p) for p in _encoded_chunks(size, seed, encoding))
            headers.append(("Content-Length", str(length)))
        h.send_head(status, headers)
        if h.command == "HEAD":
            return
        for piece in _encoded_chunks(size, seed, encoding):
            if chunked:
                h.wfile.write(b"".join((b"%x\r\n" % len(piece), piece, b"\r\n")))
            else:
                h.wfile.write(piece)
        if chunked:
            h.wfile.write(b"0\r\n\r\n")

    def _send_forever(self, h: _Handler, seed: int) -> None:
        h.send_head(
            200,
            [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
        )
        block = next(body_chunks(_BLOCK, seed))
        frame = b"".join((b"%x\r\n" % len(block), block, b"\r\n"))
        deadline = time.monotonic() + _FOREVER_LIMIT
        while time.monotonic() < deadline and not self._stop_event.is_set():
            h.wfile.write(frame)  # raises once the client has gone away
        h.wfile.write(b"0\r\n\r\n")
