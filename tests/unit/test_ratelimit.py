"""The client-side rate limiter: token buckets per operation class.

Refill arithmetic is checked with a fake clock (no sleeping); only the
wake-up tests use real time, each wait bounded.
"""

from __future__ import annotations

import threading
import time
from typing import Any, List

import pytest
from helpers import FakeClock

from acagent.ac.ratelimit import FETCH, UPLOAD, RateLimiter, RateLimits

JOIN = 5.0


def drain(limiter: RateLimiter) -> int:
    """Take every token available right now; return how many."""
    taken = 0
    while limiter.acquire(timeout=0):
        taken += 1
        assert taken < 10_000, "limiter never ran dry"
    return taken


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------ arithmetic (fake clock)


def test_starts_full_with_five_seconds_of_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(120, clock=clock)  # 2 tokens/s
    assert limiter.per_minute == 120
    assert drain(limiter) == 10


def test_burst_is_at_least_one_token(clock: FakeClock) -> None:
    limiter = RateLimiter(1, clock=clock)  # 1/60 token/s: 5 s of it is < 1
    assert drain(limiter) == 1


def test_refill_rate_measured_with_a_fake_clock(clock: FakeClock) -> None:
    limiter = RateLimiter(120, clock=clock)  # 2 tokens/s
    drain(limiter)
    clock.advance(1.0)
    assert drain(limiter) == 2
    clock.advance(0.25)
    assert not limiter.acquire(timeout=0)  # half a token
    clock.advance(0.25)
    assert drain(limiter) == 1
    clock.advance(3.0)
    assert drain(limiter) == 6


def test_refill_over_a_simulated_minute_matches_the_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(250, clock=clock)
    start_tokens = drain(limiter)
    granted = 0
    for _ in range(600):  # 60 s in 0.1 s steps
        clock.advance(0.1)
        granted += drain(limiter)
    assert start_tokens == 20  # 250/60 * 5 s, rounded down
    assert 249 <= granted <= 250


def test_idle_time_saves_only_the_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock=clock)
    drain(limiter)
    clock.advance(3600.0)
    assert drain(limiter) == 5


def test_explicit_burst(clock: FakeClock) -> None:
    limiter = RateLimiter(60, burst=2, clock=clock)
    assert drain(limiter) == 2
    clock.advance(10.0)
    assert drain(limiter) == 2


def test_timeout_counts_on_the_limiters_clock(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock=clock)
    drain(limiter)
    started = time.monotonic()
    assert limiter.acquire(timeout=0) is False
    assert limiter.acquire(timeout=-1) is False
    assert time.monotonic() - started < 1.0


# ------------------------------------------------------------ off, set_rate


def test_zero_turns_the_limiter_off(clock: FakeClock) -> None:
    limiter = RateLimiter(0, clock=clock)
    assert all(limiter.acquire(timeout=0) for _ in range(5000))
    assert limiter.per_minute == 0


def test_set_rate_at_runtime(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock=clock)
    drain(limiter)
    limiter.set_rate(0)  # off: everything passes
    assert all(limiter.acquire(timeout=0) for _ in range(100))
    limiter.set_rate(600)  # 10/s, burst 50; the bucket was empty
    assert limiter.per_minute == 600
    assert not limiter.acquire(timeout=0)
    clock.advance(0.5)
    assert drain(limiter) == 5
    limiter.set_rate(6)  # lowering the rate caps the bucket at the new burst
    clock.advance(1000.0)
    assert drain(limiter) == 1


def test_set_rate_keeps_tokens_earned_at_the_old_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(120, clock=clock)
    drain(limiter)
    clock.advance(1.0)  # 2 tokens earned at 2/s
    limiter.set_rate(1200)  # then the rate goes up
    assert drain(limiter) == 2


@pytest.mark.parametrize("bad", [-1, True, 1.5, "250", None])
def test_set_rate_rejects_bad_values(bad: Any) -> None:
    with pytest.raises(ValueError):
        RateLimiter(bad)
    limiter = RateLimiter(60)
    with pytest.raises(ValueError):
        limiter.set_rate(bad)
    assert limiter.per_minute == 60


def test_set_rate_wakes_a_waiter() -> None:
    limiter = RateLimiter(1)  # one token a minute
    assert limiter.acquire(timeout=0)
    got: List[bool] = []
    entered = threading.Event()

    def wait_for_token() -> None:
        entered.set()
        got.append(limiter.acquire())

    thread = threading.Thread(target=wait_for_token)
    thread.start()
    try:
        assert entered.wait(JOIN)
        limiter.set_rate(0)
        changed = time.monotonic()
        thread.join(JOIN)
        took = time.monotonic() - changed
    finally:
        limiter.set_rate(0)
        thread.join(JOIN)
    assert not thread.is_alive()
    assert got == [True]
    assert took < 1.0


# ------------------------------------------------------------ stop event


def test_acquire_with_stop_returns_false_promptly() -> None:
    limiter = RateLimiter(1)
    assert limiter.acquire(timeout=0)
    stop = threading.Event()
    got: List[bool] = []
    entered = threading.Event()

    def wait_for_token() -> None:
        entered.set()
        got.append(limiter.acquire(stop=stop))

    thread = threading.Thread(target=wait_for_token)
    thread.start()
    try:
        assert entered.wait(JOIN)
        stop.set()
        stopped = time.monotonic()
        thread.join(JOIN)
        took = time.monotonic() - stopped
    finally:
        stop.set()
        thread.join(JOIN)
    assert not thread.is_alive()
    assert got == [False]
    assert took < 1.0


def test_acquire_with_stop_already_set_still_takes_a_free_token(clock: FakeClock) -> None:
    limiter = RateLimiter(60, clock=clock)
    stop = threading.Event()
    stop.set()
    assert limiter.acquire(stop=stop) is True  # tokens available: no reason to refuse
    drain(limiter)
    assert limiter.acquire(stop=stop) is False


def test_real_timeout_is_bounded() -> None:
    limiter = RateLimiter(1)
    assert limiter.acquire(timeout=0)
    started = time.monotonic()
    assert limiter.acquire(timeout=0.3) is False
    assert 0.25 <= time.monotonic() - started < 2.0


# ------------------------------------------------------------ classes


def test_classes_have_independent_budgets(clock: FakeClock) -> None:
    limits = RateLimits(60, clock=clock)
    assert drain(limits[FETCH]) == 5
    assert limits[UPLOAD].acquire(timeout=0)  # fetching did not spend upload tokens
    assert drain(limits[UPLOAD]) == 4
    clock.advance(1.0)
    assert drain(limits[FETCH]) == 1
    assert drain(limits[UPLOAD]) == 1


def test_rate_limits_set_rate_applies_to_every_class(clock: FakeClock) -> None:
    limits = RateLimits(60, clock=clock)
    limits.set_rate(0)
    assert limits.per_minute == 0
    for name in RateLimits.CLASSES:
        assert limits[name].per_minute == 0
        assert all(limits[name].acquire(timeout=0) for _ in range(100))
    with pytest.raises(KeyError):
        limits["other"]
