"""The deadline watch: a response that outlives its task is shut, not waited for.

For callers: ``DeadlineWatch(abort, clock=...)``, ``watching(response, deadline)``
(a context manager that yields the ``Watch``), ``run()`` (the watch thread's
loop), ``fire_due()`` (one pass of it), ``close()``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from ..errors import TargetFailure

log = logging.getLogger("acagent.executor")  # its lines are the executor's, as they always were


class Watch:
    """One watched response: ``fired`` is set when the watch shut it (and why)."""

    def __init__(self, response: Any, deadline: float) -> None:
        self.response = response
        self.deadline = deadline
        self.fired: Optional[TargetFailure] = None


class DeadlineWatch:
    """Shuts the socket of a response that outlives its task's ``expiryTsMs``.

    A target that trickles its body (one byte a second) never trips a read
    timeout, and a read of a large piece blocks until the piece is full; so
    a deadline checked between reads is a hint, not a deadline. This watch
    runs one thread (started by the Executor) that calls
    ``HTTPResponse.shutdown()`` (urllib3 >= 2.3) when a deadline passes, or
    for every watched response when the agent's abort signal is set (stop at
    the drain deadline): the blocked read ends at once with an error that
    the executor reports as the watch's reason.

    ``clock``: the monotonic clock deadlines are read on (tests pass their
    own, and drive the watch with ``fire_due`` instead of a thread).
    """

    #: how often the thread looks at the abort signal while a response is watched
    TICK = 0.5
    #: longest sleep while nothing is watched (a new watch or close() wakes it)
    IDLE_WAIT = 60.0

    def __init__(self, abort: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self._abort = abort
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int, Watch]] = []
        self._seq = 0
        self._closed = False

    def watching(self, response: Any, deadline: float) -> Watching:
        return Watching(self, Watch(response, deadline))

    def _add(self, watch: Watch) -> None:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (watch.deadline, self._seq, watch))
            if self._heap[0][2] is watch:  # only an earlier deadline changes the thread's wait
                self._cond.notify()

    def _remove(self, watch: Watch) -> None:
        with self._cond:
            watch.response = None  # finished: the thread drops it when it comes up

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        """The watch thread's loop; ends on ``close()``."""
        while True:
            with self._cond:
                if self._closed:
                    return
                due, aborting, wait = self._take_due()
                if not due:
                    # in the same hold of the lock: a new watch's notify is never missed
                    self._cond.wait(wait)
                    continue
            for watch in due:
                self._fire(watch, aborting)

    def fire_due(self) -> float:
        """One pass of the thread's loop without its wait: shut every response
        whose deadline passed (every one, once the abort signal is set); then
        the seconds the thread would wait before it looks again."""
        with self._cond:
            due, aborting, wait = self._take_due()
        for watch in due:
            self._fire(watch, aborting)
        return wait

    def _take_due(self) -> Tuple[List[Watch], bool, float]:
        """Take the due watches off the heap (lock held): ``(due, aborting,
        wait)``, ``wait`` being how long to sleep if none was due."""
        while self._heap and self._heap[0][2].response is None:
            heapq.heappop(self._heap)  # finished in time
        now = self._clock()
        due: List[Watch] = []
        aborting = self._abort.is_set()
        while self._heap and (aborting or self._heap[0][0] <= now):
            due.append(heapq.heappop(self._heap)[2])
        wait = self.IDLE_WAIT if not self._heap else min(self.TICK, self._heap[0][0] - now)
        return due, aborting, max(0.0, wait)

    @staticmethod
    def _fire(watch: Watch, aborting: bool) -> None:
        response = watch.response
        if response is None:
            return
        watch.fired = (
            TargetFailure("agent shutting down", "shutdown")
            if aborting
            else TargetFailure("task expired while reading the response", "timeout")
        )
        try:
            response.shutdown()
        except Exception:  # best effort: the check between reads remains
            log.debug("could not shut down a response", exc_info=True)


class Watching:
    """Context manager: a response is watched for the duration of the ``with``."""

    def __init__(self, owner: DeadlineWatch, watch: Watch) -> None:
        self._owner = owner
        self._watch = watch

    def __enter__(self) -> Watch:
        self._owner._add(self._watch)
        return self._watch

    def __exit__(self, *exc: object) -> None:
        self._owner._remove(self._watch)
