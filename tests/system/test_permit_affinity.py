"""Permit affinity: a shared lease kept for its agent's next calls, against a real redis-server."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, List

import pytest
import redis
from helpers import wait_until
from redis_fixture import (  # noqa: F401 - the fixtures
    new_permits,
    redis_server,
    seconds_until_freed_by_kill,
)

from acagent.ac.adaptive import Signal
from acagent.ac.permits import RedisPermits, key_prefix
from acagent.testing import LocalRedis

API_KEY = "affinity-api-key"


class CountingRedis(redis.Redis):  # type: ignore[type-arg]
    """A Redis client that counts the commands each thread sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter = Counter()
        self._count_lock = threading.Lock()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        with self._count_lock:
            self.calls[threading.current_thread().name] += 1
        return super().execute_command(*args, **options)


def _warm(url: str) -> None:
    """A fresh Redis grants nothing for one lease (see permits.py): waited out
    once with a short lease, so the tests' long leases start at once."""
    p = RedisPermits(url, API_KEY, 1, lease_seconds=0.5, keep_calls=0)
    try:
        lease = p.acquire(threading.Event(), timeout=5)
        assert lease is not None
        p.release(lease)
    finally:
        p.close()


@pytest.fixture
def make(
    redis_server: LocalRedis,  # noqa: F811
    new_permits: Callable[..., RedisPermits],  # noqa: F811
) -> Callable[..., RedisPermits]:
    _warm(redis_server.url)

    def make_permits(limit: int = 1, **kwargs: Any) -> RedisPermits:
        kwargs.setdefault("lease_seconds", 1.0)
        return new_permits(API_KEY, limit, **kwargs)

    return make_permits


def _first(p: RedisPermits) -> str:
    lease = p.acquire(threading.Event(), timeout=5)
    assert lease is not None
    return str(lease)


def test_a_kept_lease_makes_no_redis_call_until_the_bound(redis_server) -> None:  # noqa: F811
    _warm(redis_server.url)
    client = CountingRedis.from_url(redis_server.url, socket_timeout=2.0)
    # a long lease and linger: only this thread's calls are counted, none is due
    p = RedisPermits(
        redis_server.url, API_KEY, 1, lease_seconds=30.0, client=client, keep_calls=3, linger=10.0
    )
    try:
        me = threading.current_thread().name
        lease = _first(p)
        p.release(lease)  # parked: 1 call made, 3 more may follow
        before = client.calls[me]
        for _ in range(3):
            again = p.acquire(threading.Event(), timeout=1)
            assert again == lease  # the same lease, from this process
            p.release(again)
            if p.kept_total < 3:
                assert client.calls[me] == before  # no Redis round trip at all
        # the 4th call on it was the last: that release went to Redis
        assert client.calls[me] == before + 1
        assert p.kept_total == 3 and p.acquired_total == 4
        assert p.remote_holders() == 0
    finally:
        p.close()
        client.close()


def test_the_bound_hands_the_permit_to_the_next_agent_in_line(make, redis_server) -> None:  # noqa: F811
    a = make(keep_calls=2, linger=10.0, lease_seconds=30.0)
    b = make(keep_calls=2, linger=10.0, lease_seconds=30.0)
    lease = _first(a)
    got: List[object] = []
    granted = threading.Event()

    def wait() -> None:
        got.append(b.acquire(threading.Event(), timeout=20))
        granted.set()

    waiter = threading.Thread(target=wait, name="affinity-waiter")
    waiter.start()
    store = redis.Redis.from_url(redis_server.url)
    try:
        assert wait_until(lambda: store.zcard(key_prefix(API_KEY) + "queue") == 1, timeout=10)
        for _ in range(2):  # kept: b waits on
            a.release(lease)
            again = a.acquire(threading.Event(), timeout=1)
            assert again == lease and not granted.is_set()
        a.release(lease)  # the 3rd call on it: back to the queue, whose head is b
        assert granted.wait(5)
        waiter.join(5)
        assert got[0] is not None
        assert a.acquire(threading.Event(), timeout=0.5) is None  # b holds the one permit
        b.release(got[0])
    finally:
        waiter.join(25)
        store.close()
    assert not waiter.is_alive()


def test_a_parked_lease_nobody_takes_goes_back_after_the_linger(make) -> None:
    linger = 0.3
    p = make(keep_calls=4, linger=linger)
    other = make(keep_calls=0)
    lease = _first(p)
    released = time.monotonic()
    p.release(lease)
    assert p.holders == 0  # a parked lease is not an AC request open now
    assert p.remote_holders() == 1  # still this agent's in Redis
    stopped = threading.Event()
    stopped.set()
    assert p.acquire(stopped, timeout=1) is None  # a stopped wait takes no parked lease
    got = other.acquire(threading.Event(), timeout=5)
    waited = time.monotonic() - released
    assert got is not None
    assert linger <= waited < linger + 1.0
    assert p.kept_total == 0
    other.release(got)


def test_a_lease_that_could_lapse_while_parked_is_not_kept(make) -> None:
    # lease 1 s: a fence at most 0.75 s ahead; a renewal period (0.33 s) and a
    # 0.5 s linger do not fit before it, a 0.3 s linger does
    near = make(keep_calls=4, linger=0.5)
    lease = _first(near)
    near.release(lease)
    assert near.remote_holders() == 0 and near.kept_total == 0
    far = make(keep_calls=4, linger=0.3)
    lease = far.acquire(threading.Event(), timeout=5)
    assert lease is not None
    far.release(lease)
    assert far.remote_holders() == 1  # parked
    assert far.acquire(threading.Event(), timeout=1) == lease and far.kept_total == 1
    far.release(lease)


def test_a_lease_granted_under_the_lowered_limit_is_kept_one_from_above_drains(make) -> None:
    a = make(limit=2, keep_calls=4, linger=10.0, lease_seconds=30.0)
    above = _first(a)  # granted under the cap, 2
    assert a.observe(above, Signal.OVERLOAD, "x") and a.effective_limit == 1
    a.release(above)  # it could be the one above the lowered limit: back to Redis
    assert a.remote_holders() == 0 and a.kept_total == 0
    within = _first(a)  # granted under 1: the only holder
    a.release(within)
    assert a.remote_holders() == 1  # parked
    assert a.acquire(threading.Event(), timeout=1) == within and a.kept_total == 1
    # a permit a release hands over says the limit it is granted under
    handing = make(limit=2, keep_calls=0, lease_seconds=30.0)
    b = make(limit=2, keep_calls=4, linger=10.0, lease_seconds=30.0)
    a.release(within)  # parked again; its linger is long: hand it to Redis by closing
    a.close()
    first = handing.acquire(threading.Event(), timeout=5)
    assert first is not None  # the one permit; b waits behind it
    got: List[object] = []
    waiter = threading.Thread(
        target=lambda: got.append(b.acquire(threading.Event(), timeout=20)),
        name="affinity-waiter",
    )
    waiter.start()
    try:
        assert wait_until(lambda: b.waiting == 1, timeout=5)
        handing.release(first)  # handed to b through its grant list
        waiter.join(10)
        assert got and got[0] is not None and b.effective_limit == 1
        b.release(got[0])
        assert b.remote_holders() == 1  # parked: it came under the lowered limit
        assert b.acquire(threading.Event(), timeout=1) == got[0] and b.kept_total == 1
        b.release(got[0])
    finally:
        waiter.join(25)
    assert not waiter.is_alive()


def test_close_gives_back_a_parked_lease_at_once(make) -> None:
    p = make(keep_calls=4, linger=10.0, lease_seconds=30.0)
    other = make(keep_calls=0)
    p.release(_first(p))
    assert p.remote_holders() == 1
    p.close()
    assert other.remote_holders() == 0
    got = other.acquire(threading.Event(), timeout=1)
    assert got is not None
    other.release(got)


def test_a_killed_agent_s_parked_lease_comes_back_within_the_lease(make, redis_server) -> None:  # noqa: F811
    lease_s = 6.0  # room for a long linger: a renewal period and 3 s before the fence
    waiter = make(lease_seconds=lease_s, keep_calls=0)
    code = (
        "import threading, time\n"
        "from acagent.ac.permits import RedisPermits\n"
        f"p = RedisPermits({redis_server.url!r}, {API_KEY!r}, 1, lease_seconds={lease_s},"
        " keep_calls=4, linger=3.0)\n"
        "a = p.acquire(threading.Event(), timeout=20)\n"
        "assert a\n"
        "p.release(a)\n"
        "print('held', flush=True)  # one lease, parked\n"
        "time.sleep(60)\n"
    )

    def parked() -> None:
        assert waiter.remote_holders() == 1

    freed_after = seconds_until_freed_by_kill(waiter, code, parked, lease_s * 3)
    assert freed_after <= lease_s + 1.0
