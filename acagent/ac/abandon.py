"""How a stop ends fetching: ``FetchStop`` (no new get-task) and shutting a long poll.

Once a stop begins no new get-task may start: ``FetchStop`` is the flag the
client looks at right before it sends one, and it can be raised from a
signal handler (a plain attribute, no lock). A get-task already in flight is
left to end by itself: an HTTP server holding a request open does not read
its socket, so it does not see the client close it, and it may hand out a
task on that request and count it delivered after the client went away.

Only at the shutdown deadline (less the time kept to answer what the poll
brings) or on a second signal is the long poll cut. Closing the session does
not do that: the connection in use is checked out of its pool.
``TrackingAdapter`` makes every connection note, as it sends a request,
which thread is using it; the client can then ``shut`` that thread's socket
from the stopping thread, and the blocked read ends at once.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, Optional, Type

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from ..connage import ConnectionAges


class FetchStop(threading.Event):
    """Set once no new get-task may start; also set while ``abort`` is.

    ``signal()`` is for signal handlers: it sets a plain attribute, because
    ``Event.set`` takes a lock the interrupted thread may hold. ``is_set`` sees
    it at once; ``wait`` sees it within ``SLICE`` seconds. The rate limiter's
    and the permits' waits take this for their stop event, so a get-task
    waiting for a token or a permit gives up instead of being sent late.
    """

    #: longest single wait before the signal flag and ``abort`` are looked at again
    SLICE = 0.1

    def __init__(self, abort: Callable[[], bool]) -> None:
        super().__init__()
        self._abort = abort
        self._signalled = False

    def signal(self) -> None:
        """Raise the flag from a signal handler (takes no lock)."""
        self._signalled = True

    def is_set(self) -> bool:
        return self._signalled or super().is_set() or self._abort()

    def wait(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.SLICE if deadline is None else min(self.SLICE, deadline - time.monotonic())
            if left <= 0:
                return False
            super().wait(left)
        return True


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

    def shut(self, thread_ident: Optional[int], how: int = socket.SHUT_RDWR) -> bool:
        """Shut the socket ``thread_ident`` is using; True if there was one.

        ``how=socket.SHUT_WR`` only tells the server the client is gone (a
        FIN); a reply it still writes can be read."""
        with self._lock:
            connection = self._by_thread.get(thread_ident) if thread_ident is not None else None
        sock = getattr(connection, "sock", None)
        if sock is None:
            return False
        try:
            sock.shutdown(how)
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
    """An ``HTTPAdapter`` whose connections report to a ``ConnectionTracker``
    (and, given ``ages``, are retired when old: ``connage.py``)."""

    def __init__(
        self, tracker: ConnectionTracker, ages: Optional[ConnectionAges] = None, **kwargs: Any
    ) -> None:
        self.tracker = tracker
        classes = _pool_classes(tracker)
        self._classes = ages.pool_classes(classes) if ages is not None else classes
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = self._classes
        return manager
