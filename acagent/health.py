"""Health and metrics listener for Kubernetes and Prometheus.

``HealthServer`` serves ``/healthz`` (liveness), ``/readyz`` (readiness) and
``/metrics`` (Prometheus text format) from a small ``ThreadingHTTPServer``.
``ReadinessTracker`` turns the outcome of AC exchanges into a readiness answer.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Callable, Dict, Optional, Tuple, Type
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, generate_latest

__all__ = ["METRICS_CONTENT_TYPE", "HealthServer", "ListenError", "ReadinessTracker"]

log = logging.getLogger(__name__)

#: What ``generate_latest`` writes: the text format 0.0.4 (a literal, because
#: prometheus_client's CONTENT_TYPE_LATEST names a newer version in recent releases).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Check = Callable[[], Tuple[bool, str]]


class ListenError(OSError):
    """The listener cannot bind its address (taken, not this machine's, no right)."""

    def __init__(self, address: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}")
        self.address = address

    def __str__(self) -> str:
        return str(self.strerror)


class ReadinessTracker:
    """Ready iff the last AC exchange succeeded, less than ``window`` seconds ago.

    Not ready before the first success. The client (or pipeline) calls
    ``record_success()`` / ``record_failure()`` after each AC exchange.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._last_success: Optional[float] = None
        self._last_failed = False

    def record_success(self) -> None:
        now = self._clock()
        with self._lock:
            self._last_success = now
            self._last_failed = False

    def record_failure(self) -> None:
        with self._lock:
            self._last_failed = True

    def check(self) -> Tuple[bool, str]:
        now = self._clock()
        with self._lock:
            last_success, last_failed = self._last_success, self._last_failed
        if last_success is None:
            return False, "no successful exchange with the AC server yet"
        if last_failed:
            return False, "the last exchange with the AC server failed"
        age = now - last_success
        if age > self.window:
            return False, f"no successful exchange with the AC server for {age:.0f}s"
        return True, "ok"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "acagent-health"
    sys_version = ""
    disable_nagle_algorithm = True
    #: an idle kept-alive connection is closed after this many seconds
    timeout = 5.0

    def log_message(self, format: str, *args: object) -> None:
        return  # silenced: probes every few seconds would flood the log

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        owner = self.server.owner
        content_type = "text/plain; charset=utf-8"
        if path in ("/healthz", "/readyz"):
            check = owner.liveness if path == "/healthz" else owner.readiness
            try:
                ok, reason = check()
            except Exception as exc:  # a broken check means "not healthy"
                log.debug("health check %s raised", path, exc_info=True)
                ok, reason = False, f"check failed: {type(exc).__name__}"
            status = 200 if ok else 503
            body = reason or ("ok" if ok else "not ok")
        elif path == "/metrics":
            try:
                body = generate_latest(owner.registry).decode("utf-8")
                status = 200
                content_type = METRICS_CONTENT_TYPE
            except Exception as exc:
                log.warning("rendering /metrics failed: %s: %s", type(exc).__name__, exc)
                log.debug("rendering /metrics failed", exc_info=True)
                status, body = 500, f"metrics failed: {type(exc).__name__}"
        else:
            status, body = 404, "not found"
        data = (body if body.endswith("\n") else body + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(data)


#: a client that closed or reset its connection, or went silent
_CLIENT_GONE = (ConnectionError, TimeoutError, socket.timeout)


def _peer(client_address: object) -> str:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        return f"{client_address[0]}:{client_address[1]}"
    return str(client_address)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._conn_lock = threading.Lock()
        self._connections: Dict[threading.Thread, socket.socket] = {}
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="acagent-health-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._connections[thread] = request
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: object) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: object, client_address: object) -> None:
        # socketserver's default prints a traceback to stderr, outside logging
        # (and around --logFormat json). A client that hangs up or resets is
        # routine for probes and scrapers: DEBUG. Anything else: one line, the
        # traceback at DEBUG.
        exc = sys.exc_info()[1]
        peer = _peer(client_address)
        if isinstance(exc, _CLIENT_GONE):
            log.debug("health client %s went away: %s", peer, type(exc).__name__)
            return
        log.warning(
            "health listener: a request from %s failed: %s: %s",
            peer,
            type(exc).__name__,
            str(exc).replace("\n", " ")[:200],
        )
        log.debug("health listener error details", exc_info=True)

    def close_connections(self, deadline: float) -> None:
        """Wake every connection thread by shutting its socket, then join them."""
        with self._conn_lock:
            connections = list(self._connections.items())
        for _thread, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _sock in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


class HealthServer:
    """``GET /healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` (port 0: any free port).

    ``liveness`` and ``readiness`` return ``(ok, reason)``: 200 with the reason
    (or "ok"), or 503 with the reason. ``/metrics`` renders ``registry``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        liveness: Check,
        readiness: Check,
        registry: CollectorRegistry,
        poll_interval: float = 0.5,
    ) -> None:
        self.host = host or "127.0.0.1"  # host-less: this machine only, never every NIC
        self.port = port
        self.liveness = liveness
        self.readiness = readiness
        self.registry = registry
        self._poll_interval = poll_interval
        self._server: Optional[_Server] = None
        self._bound_port: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake: Optional[Tuple[socket.socket, socket.socket]] = None
        self._lock = threading.Lock()

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)``; after ``start()`` the port is the bound one."""
        port = self._bound_port
        return self.host, self.port if port is None else port

    @property
    def url(self) -> str:
        host, port = self.address
        if host in ("", "0.0.0.0"):  # noqa: S104 - rewriting a wildcard, not binding one
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> HealthServer:
        """Bind and serve in a background thread. Raises ListenError if the port is taken."""
        with self._lock:
            if self._server is not None:
                return self
            self._stop.clear()
            try:
                self._server = _Server((self.host, self.port), self)
            except OSError as exc:
                shown = f"[{self.host}]" if ":" in self.host else self.host
                raise ListenError(f"{shown}:{self.port}", exc) from None
            self._bound_port = int(self._server.server_address[1])
            self._wake = socket.socketpair()
            self._thread = threading.Thread(target=self._serve, name="acagent-health", daemon=True)
            self._thread.start()
        log.info("health listener on %s", self.url)
        return self

    def _serve(self) -> None:
        server, wake = self._server, self._wake
        assert server is not None and wake is not None
        server.timeout = self._poll_interval  # handle_request() waits at most this long
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(wake[0], selectors.EVENT_READ)  # stop() writes here
            while not self._stop.is_set():
                for key, _events in selector.select(self._poll_interval):
                    if key.fileobj is server.socket and not self._stop.is_set():
                        server.handle_request()  # readable: accepts without waiting

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close open connections, join the threads (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            server, thread, wake = self._server, self._thread, self._wake
            self._server = None
            self._thread = None
            self._wake = None
        if server is None:
            return
        self._stop.set()
        if wake is not None:
            with contextlib.suppress(OSError):
                wake[1].send(b"x")
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("health listener thread did not stop within %.1fs", timeout)
        server.close_connections(deadline)
        server.server_close()
        if wake is not None:
            wake[0].close()
            wake[1].close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()
