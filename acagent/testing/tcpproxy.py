"""A TCP proxy on 127.0.0.1 whose link can be paused: a network that stalls.

``PausableProxy(port)`` forwards every connection made to ``proxy.port`` to
``127.0.0.1:port``. ``pause()`` stops moving bytes in both directions (the
connections stay open; new ones are accepted and wait too); ``resume()``
moves them on, as a link that stalled and recovered does. Every wait is
bounded: a pump looks at the pause and the close flags every ``SLICE`` s.
"""

from __future__ import annotations

import socket
import threading
from typing import List


class PausableProxy:
    """Forwards 127.0.0.1:``self.port`` to 127.0.0.1:``target_port``; ``pause``/``resume``."""

    #: longest single wait of a pump before it looks at the flags again
    SLICE = 0.05

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(self.SLICE)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    @property
    def url(self) -> str:
        """A ``redis://`` URL through the proxy (the target being a Redis)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PausableProxy:
        self._acceptor.start()
        return self

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._acceptor.join(5.0)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> PausableProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5.0)
            except OSError:
                client.close()  # the target is down: so is the link
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(self.SLICE)
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(self.SLICE):
                    continue  # paused: bytes wait in the kernel's buffers
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                while not self._flowing.wait(self.SLICE):
                    if self._closed.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
