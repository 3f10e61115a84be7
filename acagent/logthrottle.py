"""LogThrottle: say a recurring problem once per interval, not once per attempt."""

from __future__ import annotations

import threading
import time
from typing import Callable


class LogThrottle:
    """``ready()`` is True at most once per ``interval`` seconds (thread-safe)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def ready(self) -> bool:
        now = self._clock()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self.interval
            return True
