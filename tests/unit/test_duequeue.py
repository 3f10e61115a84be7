"""The pure parts under the delivery guarantee: ``DueQueue`` and ``LogThrottle``,
with an injected clock (no sleeping), plus one real-time wake-up bound."""

from __future__ import annotations

import threading
from typing import List, Optional

from helpers import WAIT, FakeClock

from acagent.duequeue import DueQueue
from acagent.logthrottle import LogThrottle


def test_items_come_out_in_due_order_fifo_among_equals() -> None:
    clock = FakeClock()
    queue: DueQueue[str] = DueQueue(clock)
    queue.put("retry-late", delay=5.0)
    queue.put("fresh-1")
    queue.put("retry-soon", delay=1.0)
    queue.put("fresh-2")
    assert [queue.get(0.0) for _ in range(3)] == ["fresh-1", "fresh-2", None]
    clock.now += 1.0
    assert queue.get(0.0) == "retry-soon"
    assert queue.get(0.0) is None  # the late one is not due yet: no head-of-line wait either
    clock.now += 4.0
    assert queue.get(0.0) == "retry-late"
    assert len(queue) == 0


def test_a_negative_delay_is_due_now_and_does_not_jump_the_queue() -> None:
    clock = FakeClock()
    queue: DueQueue[str] = DueQueue(clock)
    queue.put("first")
    queue.put("second", delay=-10.0)
    assert [queue.get(0.0), queue.get(0.0)] == ["first", "second"]


def test_accept_takes_the_longest_due_acceptable_item_and_keeps_the_others_in_order() -> None:
    clock = FakeClock()
    queue: DueQueue[int] = DueQueue(clock)
    for n in (1, 2, 3, 4):
        queue.put(n)
    queue.put(6, delay=3.0)
    assert queue.get(0.0, accept=lambda n: n % 2 == 0) == 2
    assert queue.get(0.0, accept=lambda n: n > 5) is None  # 6 is not due
    assert queue.due_now() == 3
    assert [queue.get(0.0) for _ in range(3)] == [1, 3, 4]
    clock.now += 3.0
    assert queue.get(0.0, accept=lambda n: n > 5) == 6


def test_take_all_empties_in_due_order_and_close_ends_gets() -> None:
    clock = FakeClock()
    queue: DueQueue[str] = DueQueue(clock)
    queue.put("b", delay=2.0)
    queue.put("a")
    assert queue.take_all() == ["a", "b"]
    assert len(queue) == 0
    queue.put("c")
    queue.close()
    assert queue.get(WAIT) is None  # closed: at once, even with an item queued


def test_a_waiting_get_is_woken_by_a_put() -> None:
    queue: DueQueue[str] = DueQueue()
    got: List[Optional[str]] = []
    started = threading.Event()

    def take() -> None:
        started.set()
        got.append(queue.get(WAIT))

    thread = threading.Thread(target=take, name="test-duequeue-getter")
    thread.start()
    assert started.wait(WAIT)
    queue.put("x")
    thread.join(WAIT)
    assert not thread.is_alive() and got == ["x"]


def test_a_waiting_get_is_woken_by_close() -> None:
    queue: DueQueue[str] = DueQueue()
    got: List[Optional[str]] = []
    thread = threading.Thread(target=lambda: got.append(queue.get(WAIT)), name="test-getter")
    thread.start()
    queue.close()
    thread.join(WAIT)
    assert not thread.is_alive() and got == [None]


def test_log_throttle_says_yes_once_per_interval() -> None:
    clock = FakeClock()
    throttle = LogThrottle(60.0, clock)
    answers = [throttle.ready()]
    for step in (1.0, 58.0, 0.999, 0.001, 30.0, 30.0):
        clock.now += step
        answers.append(throttle.ready())
    assert answers == [True, False, False, False, True, False, True]


def test_make_all_due_keeps_their_order() -> None:
    clock = FakeClock()
    queue: DueQueue[str] = DueQueue(clock)
    queue.put("in-60s", delay=60.0)
    queue.put("in-5s", delay=5.0)
    queue.put("now")
    assert queue.due_now() == 1
    queue.make_all_due()
    assert queue.due_now() == 3
    assert [queue.get(0.0) for _ in range(3)] == ["now", "in-5s", "in-60s"]
    queue.put("fresh")  # after them: their order numbers stay below the new ones
    queue.put("fresh-2")
    queue.make_all_due()
    assert [queue.get(0.0), queue.get(0.0)] == ["fresh", "fresh-2"]
