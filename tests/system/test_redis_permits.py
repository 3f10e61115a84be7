"""Permits: the local semaphore and the Redis lease semaphore, against a real redis-server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional

import pytest
import redis
from helpers import wait_until
from redis_fixture import (  # noqa: F401 - the fixtures
    new_permits,
    redis_server,
    seconds_until_freed_by_kill,
)

from acagent.ac.permits import (
    LocalPermits,
    Permits,
    RedisPermits,
    key_prefix,
    redact_url,
    secret_origin,
)
from acagent.ac.ratelimit import RateLimits
from acagent.config import AgentConfig
from acagent.testing import PausableProxy

API_KEY = "secret-api-key-123"
LEASE = 1.0


@pytest.fixture
def make_permits(new_permits: Callable[..., RedisPermits]) -> Callable[..., RedisPermits]:  # noqa: F811
    def make(limit: int = 2, lease: float = LEASE, key: str = API_KEY) -> RedisPermits:
        return new_permits(key, limit, lease_seconds=lease)

    return make


def _wait_grace(p: RedisPermits) -> None:
    """A fresh Redis grants nothing for one lease (see permits.py): wait it out once."""
    lease = p.acquire(threading.Event(), timeout=p.lease_seconds * 3 + 5)
    assert lease is not None
    p.release(lease)


class _Counter:
    """Counts holders across threads: the claim checked is max <= limit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.max = 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _hammer(permits: List[Permits], threads_each: int, rounds: int, hold: float) -> tuple:
    counter = _Counter()
    grants = {}
    errors: List[BaseException] = []
    stop = threading.Event()

    def work(p: Permits, name: str) -> None:
        try:
            for _ in range(rounds):
                lease = p.acquire(stop, timeout=30)
                assert lease is not None, "no permit within 30 s"
                counter.enter()
                time.sleep(hold)
                counter.leave()
                p.release(lease)
                grants[name] = grants.get(name, 0) + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(p, f"p{i}-t{j}"), name=f"hammer-{i}-{j}")
        for i, p in enumerate(permits)
        for j in range(threads_each)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return counter.max, grants


# -- names, local permits ------------------------------------------------------


def test_key_prefix_is_a_hash_of_the_key_never_the_key() -> None:
    prefix = key_prefix(API_KEY)
    assert API_KEY not in prefix and "secret" not in prefix
    assert prefix == key_prefix(API_KEY)
    assert prefix != key_prefix(API_KEY + "x")
    assert prefix.startswith("acagent:{") and prefix.endswith("}:")


def test_redact_url_drops_user_and_password() -> None:
    assert redact_url("rediss://user:pw@redis.example:6380/2") == "rediss://redis.example:6380/2"


def test_local_permits_never_exceed_the_limit_and_count() -> None:
    p = LocalPermits(2)
    waits: List[float] = []
    p.on_wait = waits.append
    top, _grants = _hammer([p], threads_each=8, rounds=5, hold=0.005)
    assert top == 2
    assert p.acquired_total == 40 and len(waits) == 40 and p.holders == 0
    assert p.wait_seconds_total > 0


def test_local_permits_wait_ends_on_stop() -> None:
    p = LocalPermits(1)
    held = p.acquire(threading.Event())
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    assert p.acquire(stop) is None
    assert time.monotonic() - started < 3
    p.release(held)


# -- Redis permits -----------------------------------------------------------


def test_two_agents_share_two_permits_and_none_starves(make_permits) -> None:
    a, b = make_permits(), make_permits()
    _wait_grace(a)
    top, grants = _hammer([a, b], threads_each=4, rounds=15, hold=0.01)
    assert top == 2  # both permits were used, never a third
    assert len(grants) == 8 and all(n == 15 for n in grants.values())
    assert a.holders == 0 and b.holders == 0
    # a lease parked for its agent's next call goes back within one linger
    assert wait_until(lambda: a.remote_holders() == 0, timeout=5)
    assert a.acquired_total + b.acquired_total == 121  # 120 + the grace probe


def test_waiters_are_served_in_arrival_order(make_permits, redis_server) -> None:  # noqa: F811
    holder = make_permits(limit=1)
    _wait_grace(holder)
    lease = holder.acquire(threading.Event(), timeout=5)
    store = redis.Redis.from_url(redis_server.url)
    queue_key = key_prefix(API_KEY) + "queue"
    order: List[int] = []
    threads = []
    for i in range(3):
        p = make_permits(limit=1)

        def wait(p: RedisPermits = p, i: int = i) -> None:
            got = p.acquire(threading.Event(), timeout=20)
            assert got is not None
            order.append(i)
            p.release(got)

        t = threading.Thread(target=wait, name=f"waiter-{i}")
        t.start()
        threads.append(t)
        # the next waiter joins only after this one is in the queue
        deadline = time.monotonic() + 10
        while store.zcard(queue_key) < i + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.zcard(queue_key) == i + 1
    holder.release(lease)
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2]
    store.close()


def test_a_killed_holder_frees_its_permits_within_the_lease(make_permits, redis_server) -> None:  # noqa: F811
    lease_s = 2.0
    waiter = make_permits(limit=2, lease=lease_s)
    _wait_grace(waiter)
    code = (
        "import sys, threading, time\n"
        "from acagent.ac.permits import RedisPermits\n"
        f"p = RedisPermits({redis_server.url!r}, {API_KEY!r}, 2, lease_seconds={lease_s})\n"
        "a = p.acquire(threading.Event(), timeout=20); b = p.acquire(threading.Event(), timeout=20)\n"
        "assert a and b\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )

    def renewed() -> None:
        # held and renewed: nothing for longer than a lease
        assert waiter.acquire(threading.Event(), timeout=lease_s * 1.5) is None

    freed_after = seconds_until_freed_by_kill(waiter, code, renewed, lease_s * 3)
    assert freed_after <= lease_s + 1.0


def test_leases_are_renewed_while_held(make_permits) -> None:
    a, b = make_permits(limit=1, lease=0.6), make_permits(limit=1, lease=0.6)
    _wait_grace(a)
    lease = a.acquire(threading.Event(), timeout=5)
    assert lease is not None
    assert b.acquire(threading.Event(), timeout=2.5) is None  # > 4 leases
    assert a.renewals_total >= 3
    a.release(lease)
    got = b.acquire(threading.Event(), timeout=2)
    assert got is not None
    b.release(got)


def test_stop_ends_a_wait_and_leaves_the_queue(make_permits, redis_server) -> None:  # noqa: F811
    a, b = make_permits(limit=1), make_permits(limit=1)
    _wait_grace(a)
    lease = a.acquire(threading.Event(), timeout=5)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert b.acquire(stop) is None
    assert time.monotonic() - started < 2
    store = redis.Redis.from_url(redis_server.url)
    assert store.zcard(key_prefix(API_KEY) + "queue") == 0
    store.close()
    a.release(lease)


def test_redis_down_grants_nothing_and_resumes_when_back(make_permits, redis_server) -> None:  # noqa: F811
    p = make_permits(limit=2, lease=1.0)
    _wait_grace(p)
    assert p.healthy()[0]
    redis_server.stop()
    result: List[Optional[object]] = []
    t = threading.Thread(
        target=lambda: result.append(p.acquire(threading.Event(), timeout=30)), name="waiter"
    )
    t.start()
    deadline = time.monotonic() + 10
    while p.healthy()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    ok, reason = p.healthy()
    assert not ok and "unreachable" in reason and "127.0.0.1" in reason
    assert t.is_alive() and not result  # no permit without Redis
    redis_server.start()
    t.join(20)
    assert result and result[0] is not None
    assert p.healthy()[0]
    p.release(result[0])


def test_a_store_reset_keeps_surviving_holders(make_permits, redis_server) -> None:  # noqa: F811
    """Redis restarts empty while A holds the only permit: B must not get it."""
    # a lease long enough that the restart ends before A's permit lapses
    a, b = make_permits(limit=1, lease=2.0), make_permits(limit=1, lease=2.0)
    _wait_grace(a)
    lease = a.acquire(threading.Event(), timeout=5)
    redis_server.stop()
    redis_server.start()
    # grace (one lease) + A's renewer re-registers its lease: B gets nothing
    assert b.acquire(threading.Event(), timeout=3.0) is None
    assert a.leases_lost_total >= 1
    assert a.valid(lease) and a.lapsed_total == 0
    a.release(lease)
    got = b.acquire(threading.Event(), timeout=5)
    assert got is not None
    b.release(got)


def test_shared_rate_limit_is_one_bucket_for_all_agents(make_permits) -> None:
    p = make_permits()
    one, two = RateLimits(60), RateLimits(60)  # 1/s, burst of 5
    for limits in (one, two):
        limits.share(p.store, p.prefix, p.store_errors)
        assert limits.shared
    taken = sum(one["fetch"].acquire(timeout=0) for _ in range(5))
    assert taken == 5
    assert not two["fetch"].acquire(timeout=0.2)  # the other agent sees the same bucket
    assert two["upload"].acquire(timeout=0)  # classes stay separate
    assert two["fetch"].acquire(timeout=3)  # refilled at 1/s


# -- configuration -----------------------------------------------------------


def test_client_uses_redis_permits_with_a_coordination_url(redis_server) -> None:  # noqa: F811
    from acagent.ac.client import ACClient

    config = AgentConfig(
        server_url="http://127.0.0.1:9",
        api_key=API_KEY,
        coordination_url=redis_server.url,
        coordination_lease=2.0,
    )
    assert redis_server.url not in repr(config)
    with ACClient(config) as client:
        assert isinstance(client.permits, RedisPermits)
        assert client.rate_limits.shared
    with ACClient(config.replace(coordination_url=None)) as client:
        assert isinstance(client.permits, LocalPermits)
        assert not client.rate_limits.shared


def test_cli_rejects_a_coordination_url_without_the_redis_package() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from acagent.cli.main import main\n"
        "main(['--serverUrl', 'http://127.0.0.1:9', '--apiKey', 'k',"
        " '--coordinationUrl', 'redis://127.0.0.1:1/0'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "pip install 'acagent[redis]'" in lines[0]


def test_cli_rejects_a_bad_coordination_url_and_reads_the_password_env() -> None:
    from acagent.cli.options import config_from_args

    base = ["--serverUrl", "http://127.0.0.1:9", "--apiKey", "k"]
    with pytest.raises(SystemExit) as exc:
        config_from_args([*base, "--coordinationUrl", "http://redis:6379"], environ={})
    assert exc.value.code == 2
    cfg = config_from_args(
        [*base, "--coordinationUrl", "rediss://redis:6380/0", "--coordinationLease", "4"],
        environ={"ACAGENT_COORDINATION_PASSWORD": "pw"},
    )
    assert cfg.coordination_password == "pw" and cfg.coordination_lease == 4.0
    assert "pw" not in repr(cfg)


def test_shared_rate_limit_grants_nothing_without_redis_and_reports_it(
    make_permits,
    redis_server,  # noqa: F811
) -> None:
    p = make_permits()
    limits = RateLimits(6000)
    limits.share(
        p.store,
        p.prefix,
        p.store_errors,
        on_store_error=p.report_store_error,
        on_store_ok=p.report_store_ok,
    )
    assert limits["fetch"].acquire(timeout=1)
    redis_server.stop()
    assert not limits["fetch"].acquire(timeout=0.5)
    ok, reason = p.healthy()
    assert not ok and "unreachable" in reason
    redis_server.start()
    assert limits["fetch"].acquire(timeout=5)
    assert p.healthy()[0]


def test_client_takes_its_permits_from_the_object_passed_in(ac) -> None:
    from helpers import result_payload

    from acagent.ac.client import ACClient

    permits = LocalPermits(1)
    config = AgentConfig(server_url=ac.url, api_key="k", rate_limit_per_min=0)
    ac.latency = 0.02
    client = ACClient(config, permits=permits)
    threads = [
        threading.Thread(target=client.put_result, args=(result_payload(f"t{i}"),), name=f"up-{i}")
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client.close()
    assert len(ac.results) == 6
    assert ac.max_inflight == 1  # one permit, counted at the server
    assert permits.acquired_total == 6 and permits.holders == 0
    assert permits.acquire(threading.Event(), timeout=1) is not None  # not closed by the client


# -- fencing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, given, env, expected",
    [
        ("redis://:pw@h:1/0", "x", "y", (None, "the password in --coordinationUrl")),
        ("redis://h:1/0", "x", "y", ("x", "the password given")),
        ("redis://h:1/0", None, "y", ("y", "ACAGENT_COORDINATION_PASSWORD")),
        ("redis://h:1/0", None, None, (None, "none given (--coordinationPasswordFile)")),
        ("redis://h:1/0", None, "", (None, "none given (--coordinationPasswordFile)")),
    ],
)
def test_secret_origin_says_which_password_is_used(url, given, env, expected) -> None:
    password, origin = secret_origin(url, given, env)
    assert password == expected[0] and origin.startswith(expected[1])


def test_a_held_permit_lapses_before_redis_could_give_it_to_another(
    make_permits,
    redis_server,  # noqa: F811
) -> None:
    lease_s = 1.0
    with PausableProxy(redis_server.port) as link:
        cut = RedisPermits(link.url, API_KEY, 1, lease_seconds=lease_s)
        other = make_permits(limit=1, lease=lease_s)
        lapses: List[float] = []
        lapsed = threading.Event()
        cut.on_lapse = lambda lease: (lapses.append(time.monotonic()), lapsed.set())
        try:
            _wait_grace(cut)
            lease = cut.acquire(threading.Event(), timeout=5)
            assert lease is not None and cut.valid(lease)
            link.pause()
            paused = time.monotonic()
            got = other.acquire(threading.Event(), timeout=lease_s * 4)
            granted = time.monotonic()
            assert got is not None
            assert lapsed.wait(0)  # the lapse came first...
            assert lapses[0] < granted  # ...before the other got the permit
            assert lapses[0] - paused <= lease_s - cut.fence_margin + 0.05
            assert not cut.valid(lease) and cut.lapsed_total == 1
            other.release(got)
            link.resume()
            cut.release(lease)
            assert cut.holders == 0
        finally:
            link.resume()
            cut.close()


def test_a_renewal_never_readds_a_lease_when_every_permit_is_taken(
    make_permits,
    redis_server,  # noqa: F811
) -> None:
    a, b = make_permits(limit=1, lease=1.0), make_permits(limit=1, lease=1.0)
    _wait_grace(a)
    lapsed = threading.Event()
    a.on_lapse = lambda lease: lapsed.set()
    lease = a.acquire(threading.Event(), timeout=5)
    assert lease is not None
    store = redis.Redis.from_url(redis_server.url)
    holders = key_prefix(API_KEY) + "holders"
    try:
        store.zrem(holders, str(lease))  # the store lost A's lease (only that one)
        got = b.acquire(threading.Event(), timeout=5)
        assert got is not None  # so the permit was free in Redis, and B took it
        assert lapsed.wait(a.lease_seconds)  # A's next renewal finds it taken: lost
        assert not a.valid(lease)
        assert store.zcount(holders, "-inf", "(+inf") == 1  # B's only, A's not re-added
        assert a.leases_lost_total == 1
        b.release(got)
    finally:
        a.release(lease)
        store.close()
