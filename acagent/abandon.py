"""Shutting another thread's in-flight request: how a stop abandons a long poll.

The AC server may hold get-task open for up to the read timeout (100 s). A
stop must not wait that long, and closing the session does not help: the
connection in use is checked out of its pool. ``TrackingAdapter`` makes every
connection note, as it sends a request, which thread is using it; the
client can then ``shut`` that thread's socket from the stopping thread. The
blocked read ends at once with a connection error, and the server sees the
connection close before it hands out a task on it.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Dict, Optional, Type

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class ConnectionTracker:
    """Which HTTP connection each thread is using right now (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_thread: Dict[int, Any] = {}

    def note(self, connection: Any) -> None:
        with self._lock:
            self._by_thread[threading.get_ident()] = connection

    def clear(self) -> None:
        """The calling thread is done with its connection."""
        with self._lock:
            self._by_thread.pop(threading.get_ident(), None)

    def shut(self, thread_ident: Optional[int]) -> bool:
        """Shut the socket ``thread_ident`` is using; True if there was one."""
        with self._lock:
            connection = self._by_thread.get(thread_ident) if thread_ident is not None else None
        sock = getattr(connection, "sock", None)
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True


def _pool_classes(tracker: ConnectionTracker) -> Dict[str, Type[HTTPConnectionPool]]:
    class TrackedHTTPConnection(HTTPConnection):
        def request(self, *args: Any, **kwargs: Any) -> None:
            tracker.note(self)
            super().request(*args, **kwargs)

    class TrackedHTTPSConnection(HTTPSConnection):
        def request(self, *args: Any, **kwargs: Any) -> None:
            tracker.note(self)
            super().request(*args, **kwargs)

    class TrackedHTTPPool(HTTPConnectionPool):
        ConnectionCls = TrackedHTTPConnection

    class TrackedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = TrackedHTTPSConnection

    return {"http": TrackedHTTPPool, "https": TrackedHTTPSPool}


class TrackingAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections report to a ``ConnectionTracker``."""

    def __init__(self, tracker: ConnectionTracker, **kwargs: Any) -> None:
        self.tracker = tracker
        self._classes = _pool_classes(tracker)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = self._classes
        return manager
