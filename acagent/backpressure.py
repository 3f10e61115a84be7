"""Backpressure: when the Fetcher may ask the AC server for another task.

The Fetcher asks only when a task it gets can start at once (a free executor
slot, counting the prefetch allowance) and the results waiting for upload are
below ``response_queue_threshold``. A reservation is taken *before* get-task
and given back if the server had no task, so the agent never holds a task it
has nowhere to run. A result stays counted until the Uploader is done with it
(accepted, or parked in the spool), so a stalled upload path stops fetching.

Hence the invariant the tests check: tasks fetched and not yet uploaded never
exceed ``slots + threshold``.
"""

from __future__ import annotations

import threading
from typing import Optional


class Backpressure:
    def __init__(self, slots: int, threshold: int) -> None:
        if slots < 1 or threshold < 1:
            raise ValueError("slots and threshold must be >= 1")
        self._slots = slots
        self._threshold = threshold
        # One condition guards all three counters. Invariant while the lock is
        # free: 0 <= executing <= max(slots, executing at last resize) and
        # 0 <= results; every change that can admit a fetch notifies.
        self._cond = threading.Condition()
        self._executing = 0
        self._results = 0
        self._closed = False

    # -- the Fetcher's side ----------------------------------------------
    def reserve(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for room for one more task; True = reserved."""
        with self._cond:
            ok = self._cond.wait_for(self._has_room, timeout=timeout)
            if ok and not self._closed:
                self._executing += 1
                return True
            return False

    def _has_room(self) -> bool:
        return self._closed or (self._executing < self._slots and self._results < self._threshold)

    def cancel(self) -> None:
        """The reservation was not used (no task came back)."""
        with self._cond:
            self._executing -= 1
            self._cond.notify_all()

    # -- the Executor's and Uploader's side -------------------------------
    def executed(self) -> None:
        """A task finished executing; its result now waits for upload."""
        with self._cond:
            self._executing -= 1
            self._results += 1
            self._cond.notify_all()

    def uploaded(self) -> None:
        """The Uploader is done with one result."""
        with self._cond:
            self._results -= 1
            self._cond.notify_all()

    # -- control -----------------------------------------------------------
    def resize(self, slots: int) -> None:
        with self._cond:
            self._slots = max(1, slots)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake a waiting Fetcher for good (stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def threshold(self) -> int:
        return self._threshold

    @property
    def executing(self) -> int:
        return self._executing

    @property
    def waiting_results(self) -> int:
        return self._results

    def outstanding(self) -> int:
        """Tasks fetched and not yet done with (executing + results not uploaded)."""
        with self._cond:
            return self._executing + self._results

    def wait_drained(self, timeout: Optional[float]) -> bool:
        """Wait until nothing is outstanding."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._executing + self._results == 0, timeout=timeout
            )
