"""The threaded HTTP/1.1 server machinery under both fakes.

``_Server`` is a ``ThreadingHTTPServer`` with named, tracked connection
threads, a stoppable accept loop and a listener that can go down and come
back on the same port; ``_Handler`` parses the request line and hands every
request to the owning fake. ``_BodyReader`` reads Content-Length and chunked
request bodies; the sinks and ``_parse_multipart`` stream multipart bodies
without holding them whole. ``_FakeBase`` carries what both fakes share:
lifecycle, in-flight counters, the request record and condition-based waits.

Everything with a leading underscore is private to ``acagent.testing``.
"""

from __future__ import annotations

import email.message
import email.parser
import email.utils
import hashlib
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
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, TypeVar, Union, cast
from urllib.parse import parse_qsl, urlsplit

_READ_CHUNK = 262144
_HANDLER_IDLE_TIMEOUT = 300.0

_T = TypeVar("_T", bound="_FakeBase")


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
                    if self._want_down and not self._is_down:
                        # Also before the first registration: set_down(True) may
                        # come before this loop ever ran.
                        if registered:
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
