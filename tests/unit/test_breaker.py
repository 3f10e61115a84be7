"""ClassBreaker with an injected clock: when a class of calls pauses, for how
long, and what ends the pause. Pure: no server, no sleep."""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import pytest
from helpers import FakeClock

from acagent.ac.backoff import Backoff
from acagent.ac.breaker import ClassBreaker


class ClockedStop(threading.Event):
    """A stop Event whose waits move ``clock`` instead of sleeping; set after ``set_after`` waits."""

    def __init__(self, clock: FakeClock, set_after: Optional[int] = None) -> None:
        super().__init__()
        self.clock = clock
        self.set_after = set_after
        self.waits: List[float] = []

    def wait(self, timeout: Optional[float] = None) -> bool:
        assert timeout is not None and timeout > 0  # bounded, and never a busy loop
        if self.set_after is not None and len(self.waits) >= self.set_after:
            self.set()
        if self.is_set():
            return True
        self.waits.append(timeout)
        self.clock.now += timeout
        return False


def breaker(
    threshold: int = 3, opened: Backoff = Backoff(2.0, 16.0)
) -> Tuple[ClassBreaker, FakeClock]:
    clock = FakeClock()
    return ClassBreaker(threshold=threshold, opened=opened, clock=clock), clock


def test_below_the_threshold_a_failure_pauses_nothing() -> None:
    b, _ = breaker(threshold=3)
    assert [b.failure() for _ in range(2)] == [0.0, 0.0]
    assert b.consecutive_failures == 2
    assert b.remaining() == 0.0


# (threshold, opened, pauses set by failures 1, 2, ...)
OPENED = [
    (3, Backoff(2.0, 16.0), [0.0, 0.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]),
    (1, Backoff(5.0, 20.0), [5.0, 10.0, 20.0, 20.0]),  # opens at the first failure
    (5, Backoff(5.0, 600.0), [0.0] * 4 + [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0]),
    (2, Backoff(3.0, 3.0), [0.0, 3.0, 3.0, 3.0]),
]


@pytest.mark.parametrize(("threshold", "opened", "pauses"), OPENED)
def test_once_open_each_failure_doubles_the_pause_up_to_the_cap(
    threshold: int, opened: Backoff, pauses: List[float]
) -> None:
    b, _ = breaker(threshold, opened)
    got = []
    for _ in pauses:
        got.append(b.failure())
        assert b.remaining() == got[-1]  # the clock has not moved: the whole pause is left
    assert got == pauses


def test_the_opened_pauses_follow_the_spread_of_their_backoff() -> None:
    b, _ = breaker(threshold=1, opened=Backoff(10.0, 10.0, 0.2))
    pauses = [b.failure() for _ in range(200)]
    assert all(8.0 <= p <= 10.0 for p in pauses) and len(set(pauses)) > 1


def test_the_pause_runs_out_with_the_clock() -> None:
    b, clock = breaker(threshold=1, opened=Backoff(4.0, 4.0))
    assert b.failure() == 4.0
    clock.now += 1.5
    assert b.remaining() == pytest.approx(2.5)
    clock.now += 2.5
    assert b.remaining() == 0.0
    clock.now += 100.0
    assert b.remaining() == 0.0  # never negative
    # still open: the next failure pauses again, and longer
    assert b.failure() == 4.0 and b.consecutive_failures == 2


def test_a_server_wait_pauses_the_class_without_counting_a_failure() -> None:
    b, clock = breaker(threshold=3)
    b.pause(7.0)
    assert b.remaining() == 7.0
    assert b.consecutive_failures == 0
    clock.now += 7.0
    assert b.remaining() == 0.0


def test_a_shorter_pause_never_cuts_a_longer_one() -> None:
    b, clock = breaker(threshold=1, opened=Backoff(2.0, 2.0))
    b.pause(10.0)
    assert b.failure() == 2.0  # the failure's own pause, returned as such ...
    assert b.remaining() == 10.0  # ... but the longer server wait still holds
    b.pause(1.0)
    assert b.remaining() == 10.0
    clock.now += 4.0
    b.pause(8.0)  # now longer than what is left
    assert b.remaining() == 8.0


def test_a_success_closes_the_breaker() -> None:
    b, _ = breaker(threshold=2, opened=Backoff(2.0, 16.0))
    for _ in range(4):
        b.failure()
    b.pause(30.0)
    assert b.remaining() == 30.0
    b.success()
    assert b.remaining() == 0.0 and b.consecutive_failures == 0
    # counted from zero again: below the threshold, then the first opened pause
    assert [b.failure(), b.failure()] == [0.0, 2.0]


def test_wait_closed_returns_at_once_when_closed() -> None:
    b, clock = breaker()
    stop = ClockedStop(clock)
    assert b.wait_closed(stop)
    assert stop.waits == []


def test_wait_closed_waits_out_the_pause_in_slices() -> None:
    b, clock = breaker(threshold=1, opened=Backoff(1.2, 1.2))
    b.failure()
    stop = ClockedStop(clock)
    assert b.wait_closed(stop, slice_=0.5)
    assert stop.waits == pytest.approx([0.5, 0.5, 0.2])
    assert b.remaining() == 0.0


def test_wait_closed_sees_a_pause_set_while_it_waits() -> None:
    b, clock = breaker(threshold=1, opened=Backoff(1.0, 1.0))
    b.failure()

    class Paused(ClockedStop):
        def wait(self, timeout: Optional[float] = None) -> bool:
            if not self.waits:
                b.pause(3.0)  # another thread's 429 while this one waits
            return super().wait(timeout)

    stop = Paused(clock)
    assert b.wait_closed(stop, slice_=1.0)
    assert sum(stop.waits) == pytest.approx(3.0)


def test_wait_closed_returns_false_when_stop_is_set() -> None:
    b, clock = breaker(threshold=1, opened=Backoff(60.0, 60.0))
    b.failure()
    stop = ClockedStop(clock, set_after=2)
    assert not b.wait_closed(stop, slice_=0.5)
    assert stop.waits == [0.5, 0.5]  # stopped on the third slice, long before the minute
    already = ClockedStop(clock)
    already.set()
    assert not b.wait_closed(already)


def test_wait_closed_is_bounded_by_real_time_too() -> None:
    """With the real clock and Event: a 50 ms pause ends the wait, a stop ends a long one."""
    b = ClassBreaker(threshold=1, opened=Backoff(0.05, 0.05))
    b.failure()
    assert b.wait_closed(threading.Event(), slice_=0.01)
    assert b.remaining() == 0.0
    b.pause(3600.0)
    stop = threading.Event()
    stop.set()
    assert not b.wait_closed(stop)


def test_failures_from_many_threads_are_each_counted() -> None:
    b, _ = breaker(threshold=10_000, opened=Backoff(1.0, 1.0))
    go = threading.Barrier(8)

    def fail() -> None:
        go.wait(5.0)
        for _ in range(500):
            b.failure()

    threads = [threading.Thread(target=fail) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert not any(t.is_alive() for t in threads)
    assert b.consecutive_failures == 4000
