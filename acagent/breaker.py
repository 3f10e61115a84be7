"""ClassBreaker: when a whole class of AC calls must slow down, and for how long.

One failed call among successes is that call's business: it is retried on
its own schedule and slows nothing else. Only signals of overload slow a
whole class (all uploads, say):

* a 429 with a wait header pauses the class for that wait (``pause``);
* ``threshold`` failures in a row (5xx, timeouts, resets) open the breaker:
  the class pauses ``open_min`` seconds, doubling per further failure up to
  ``open_max``. Any success closes it.

Thread-safe. ``wait_closed`` is interruptible by an Event.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class ClassBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        open_min: float = 5.0,
        open_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.open_min = open_min
        self.open_max = open_max
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """The server asked the class to wait ``seconds`` (a 429's wait header)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def failure(self) -> None:
        """One call of the class failed (5xx, timeout, reset)."""
        with self._lock:
            self._failures += 1
            over = self._failures - self.threshold
            if over >= 0:
                wait = min(self.open_min * 2.0**over, self.open_max)
                self._paused_until = max(self._paused_until, self._clock() + wait)

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._paused_until = 0.0

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def remaining(self) -> float:
        """Seconds until the class may call again (0 when closed)."""
        with self._lock:
            return max(0.0, self._paused_until - self._clock())

    def wait_closed(self, stop: threading.Event, slice_: float = 0.5) -> bool:
        """Wait until the class may call; False if ``stop`` was set first."""
        while True:
            left = self.remaining()
            if left <= 0:
                return True
            if stop.wait(min(left, slice_)):
                return False
