"""DueQueue: a thread-safe queue whose items become available at a due time.

The delivery side keeps one of these instead of a FIFO: a fresh result is
due at once, a result whose upload failed is put back due after its own
backoff. ``get`` hands out the item that has been due the longest, so one
failing result never delays the others (no head-of-line blocking), fresh
results are not starved by retried ones, nor retried ones by fresh ones:
both are served in order of their due times.

Locking contract: ``_cond`` guards ``_heap`` and ``_seq``; every method
takes it for its whole body, and ``put``/``close`` notify waiters.
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Callable, Generic, List, Optional, Tuple, TypeVar

T = TypeVar("T")


class DueQueue(Generic[T]):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        # (due, insertion sequence, item): the sequence keeps FIFO order
        # among equal due times and means items are never compared.
        self._heap: List[Tuple[float, int, T]] = []
        self._seq = 0
        self._closed = False

    def put(self, item: T, delay: float = 0.0) -> None:
        """Queue ``item``, due ``delay`` seconds from now."""
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (self._clock() + max(0.0, delay), self._seq, item))
            # All: a waiter with an ``accept`` filter may not want this item,
            # and must not be the only one woken for it.
            self._cond.notify_all()

    def get(self, timeout: float, accept: Optional[Callable[[T], bool]] = None) -> Optional[T]:
        """The longest-due item, waiting up to ``timeout`` for one; None if none.

        With ``accept``, the longest-due item for which ``accept(item)`` is
        true (the others stay queued, in their order).
        """
        deadline = self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                if self._heap and self._heap[0][0] <= now:
                    if accept is None:
                        return heapq.heappop(self._heap)[2]
                    found = self._take_first_due(now, accept)
                    if found is not None:
                        return found
                left = deadline - now
                if left <= 0:
                    return None
                if self._heap and self._heap[0][0] > now:
                    left = min(left, self._heap[0][0] - now)
                self._cond.wait(left)
            return None

    def _take_first_due(self, now: float, accept: Callable[[T], bool]) -> Optional[T]:
        # Lock held. A linear scan: the queue holds at most a few hundred results.
        due = sorted(entry for entry in self._heap if entry[0] <= now)
        for entry in due:
            if accept(entry[2]):
                self._heap.remove(entry)
                heapq.heapify(self._heap)
                return entry[2]
        return None

    def close(self) -> None:
        """Wake every waiter; ``get`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_all(self) -> List[T]:
        """Remove and return every item, due or not (in due order)."""
        with self._cond:
            items = [entry[2] for entry in sorted(self._heap)]
            self._heap.clear()
            return items

    def make_all_due(self) -> None:
        """Make every item due now, keeping their order (a retry that waited for
        something now fixed, such as a refused API key, need wait no more)."""
        with self._cond:
            now = self._clock()
            entries = sorted(self._heap)
            self._heap = [(now, self._seq + n, entry[2]) for n, entry in enumerate(entries, 1)]
            self._seq += len(entries)
            self._cond.notify_all()

    def count(self, predicate: Callable[[T], bool]) -> int:
        """How many queued items, due or not, ``predicate`` is true for."""
        with self._cond:
            return sum(1 for entry in self._heap if predicate(entry[2]))

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def due_now(self) -> int:
        """How many items are due (waiting for a sender) right now."""
        with self._cond:
            now = self._clock()
            return sum(1 for entry in self._heap if entry[0] <= now)
