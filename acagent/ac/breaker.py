"""ClassBreaker: when a whole class of AC calls must slow down, and for how long.

One failed call among successes is that call's business: it is retried on
its own schedule and slows nothing else. Only signals of overload slow a
whole class (all uploads, say):

* a 429 with a wait header pauses the class for that wait (``pause``);
* ``threshold`` failures in a row (5xx, timeouts, resets) open the breaker:
  the class pauses as the ``opened`` backoff says (its first wait, doubling
  per further failure up to its cap). Any success closes it.

Thread-safe. ``wait_closed`` is interruptible by an Event.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .backoff import Backoff


class ClassBreaker:
    def __init__(
        self,
        *,
        threshold: int,
        opened: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.opened = opened
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """The server asked the class to wait ``seconds`` (a 429's wait header)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def failure(self) -> float:
        """One call of the class failed (5xx, timeout, reset); returns the pause
        this failure set (0 while fewer than ``threshold`` failed in a row)."""
        with self._lock:
            self._failures += 1
            over = self._failures - self.threshold
            if over < 0:
                return 0.0
            wait = self.opened.wait(over + 1)
            self._paused_until = max(self._paused_until, self._clock() + wait)
            return wait

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
