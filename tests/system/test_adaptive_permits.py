"""The effective limit as the permits enforce it: in process, and shared through a real
redis-server by every agent on the key (``permits_limit.lua``)."""

from __future__ import annotations

import threading
from typing import Callable, List

import pytest
from redis_fixture import new_permits, redis_server  # noqa: F401 - the fixtures

from acagent.ac.adaptive import Pacing, Signal
from acagent.ac.permits import LocalPermits, Permits, RedisPermits

API_KEY = "adaptive-key"
#: a climb as soon as the clean run is there (the pause is the policy's table test)
QUICK = Pacing(probe_after_ms=0, step_after_ms=0, clean_run=2)


@pytest.fixture
def shared(new_permits: Callable[..., RedisPermits]) -> Callable[[int], RedisPermits]:  # noqa: F811
    def make(limit: int) -> RedisPermits:
        p = new_permits(API_KEY, limit, lease_seconds=1.0)
        p.pacing = QUICK
        return p

    return make


def _take(p: Permits, n: int, timeout: float = 0.3) -> List[object]:
    """Up to ``n`` permits, each waited for at most ``timeout``."""
    stop = threading.Event()
    got = []
    for _ in range(n):
        lease = p.acquire(stop, timeout=timeout)
        if lease is None:
            break
        got.append(lease)
    return got


def _give(p: Permits, leases: List[object]) -> None:
    for lease in leases:
        p.release(lease)


def test_local_permits_grant_the_effective_limit_and_climb_back() -> None:
    p = LocalPermits(4)
    p.pacing = QUICK
    held = _take(p, 4)
    assert len(held) == 4
    why = '"Too many concurrent requests" on put-result'
    assert p.observe(held[0], Signal.OVERLOAD, why) is True
    assert p.observe(held[1], Signal.OVERLOAD, why) is True  # same burst
    assert p.effective_limit == 2
    _give(p, held)
    held = _take(p, 3)
    assert len(held) == 2  # the third waits: the limit is 2
    for lease in held:
        p.observe(lease, Signal.CLEAN)
    assert p.effective_limit == 3  # the clean run at 2: one step up
    _give(p, held)
    for _ in range(2):
        (lease,) = _take(p, 1)
        p.observe(lease, Signal.CLEAN)
        p.release(lease)
    assert p.effective_limit == 4
    assert len(_take(p, 4)) == 4


def test_a_waiter_gets_its_permit_when_the_limit_climbs() -> None:
    p = LocalPermits(4)
    p.pacing = QUICK
    held = _take(p, 4)
    p.observe(held[0], Signal.OVERLOAD, "x")  # 4 -> 2
    _give(p, held[:3])
    (fresh,) = _take(p, 1)  # granted at the limit 2: its clean calls count
    got: List[object] = []
    waiter = threading.Thread(
        target=lambda: got.extend(_take(p, 1, timeout=10.0)), name="test-waiter", daemon=True
    )
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # two held, the limit 2: it waits
    p.observe(fresh, Signal.CLEAN)
    p.observe(fresh, Signal.CLEAN)
    assert p.effective_limit == 3
    waiter.join(timeout=5.0)
    assert not waiter.is_alive() and len(got) == 1


def test_a_shared_limit_is_halved_once_per_burst_and_seen_by_every_agent(shared) -> None:
    a, b = shared(4), shared(4)
    held_a = _take(a, 2, timeout=10.0)  # the first waits out the fresh store's grace
    held_b = _take(b, 2)
    assert len(held_a) == len(held_b) == 2
    # one burst: both agents see 429s on calls granted at the cap
    assert a.observe(held_a[0], Signal.OVERLOAD, '"Too many concurrent requests" on get-task')
    assert b.observe(held_b[0], Signal.OVERLOAD, '"Too many concurrent requests" on get-task')
    assert a.effective_limit == b.effective_limit == 2  # halved once, not twice
    _give(a, held_a)
    _give(b, held_b)
    # every agent's grants now stop at 2 in all
    got_a = _take(a, 2)
    got_b = _take(b, 2)
    assert len(got_a) + len(got_b) == 2
    _give(a, got_a)
    _give(b, got_b)
    # clean calls climb it back, for both
    for _ in range(8):
        (lease,) = _take(a, 1)
        a.observe(lease, Signal.CLEAN)
        a.release(lease)
    assert a.effective_limit == 4
    (lease,) = _take(b, 1)  # b learns it from its next acquire
    b.release(lease)
    assert b.effective_limit == 4
    assert len(_take(b, 4)) == 4


def test_an_overload_on_a_stale_view_does_not_halve_twice(shared) -> None:
    a, b = shared(4), shared(4)
    (la,) = _take(a, 1, timeout=10.0)
    (lb,) = _take(b, 1)
    a.observe(la, Signal.OVERLOAD, "x")  # 4 -> 2 in the store
    assert a.effective_limit == 2
    assert b.effective_limit == 4  # b has not asked the store since
    # b's 429 is of the same burst (granted at version 0): its compare-and-set
    # loses, b takes the store's limit, and the burst was answered already
    assert b.observe(lb, Signal.OVERLOAD, "x") is True
    assert b.effective_limit == 2
    a.release(la)
    b.release(lb)


def test_an_overload_judged_on_an_old_low_view_halves_the_raised_limit(shared) -> None:
    a, b = shared(2), shared(2)
    (la,) = _take(a, 1, timeout=10.0)
    a.observe(la, Signal.OVERLOAD, "x")  # 2 -> 1, version 1
    a.release(la)
    (lb,) = _take(b, 1)  # b learns 1
    assert b.effective_limit == 1
    # another agent's clean run raises it (what its compare-and-set writes);
    # b, holding a permit, has not asked the store since
    b.store.hset(b.prefix + "limit", mapping={"limit": 2, "version": 2, "lowered": 1})
    assert b.effective_limit == 1
    # b's 429 would be one at the limit 1 on its own view (a 0..10 s wait);
    # it reads the store first: the raised limit is halved and the wait is short
    assert b.observe(lb, Signal.OVERLOAD, "x") is True
    assert b.effective_limit == 1
    assert b.store.hmget(b.prefix + "limit", "limit", "version") == [b"1", b"3"]
    b.release(lb)
    (lease,) = _take(a, 1)
    assert a.effective_limit == 1
    a.release(lease)


def test_a_renewal_never_readds_a_lease_above_a_lowered_limit(shared) -> None:
    a, b = shared(2), shared(2)
    (la,) = _take(a, 1, timeout=10.0)
    lapsed = threading.Event()
    a.on_lapse = lambda lease: lapsed.set()
    a.observe(la, Signal.OVERLOAD, "x")  # 2 -> 1 for both
    a.store.zrem(a.prefix + "holders", str(la))  # the store lost A's lease (only that one)
    (lb,) = _take(b, 1)  # the one permit of the lowered limit was free: B has it
    assert b.effective_limit == 1
    # A's next renewal finds the lowered limit taken (the cap, 2, is not): lost
    assert lapsed.wait(a.lease_seconds * 2)
    assert not a.valid(la) and a.leases_lost_total == 1
    assert a.store.zcount(a.prefix + "holders", "-inf", "(+inf") == 1  # B's only
    b.release(lb)
    a.release(la)


def test_the_shared_limit_expires_an_hour_after_its_last_change(shared) -> None:
    a = shared(2)
    (la,) = _take(a, 1, timeout=10.0)
    assert a.store.exists(a.prefix + "limit") == 0  # never changed: the cap, no key
    a.observe(la, Signal.OVERLOAD, "x")
    # no agent left on the key keeps it lowered for longer than an hour
    assert 3_590_000 < a.store.pttl(a.prefix + "limit") <= 3_600_000
    a.release(la)
