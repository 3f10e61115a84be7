"""Backoff, the one schedule every wait is made of, as table tests; the
policy's default schedules; and the Redis reconnect loops and a stage loop
waiting the schedule they are given. Pure: no server, no sleep."""

from __future__ import annotations

import logging
import math
import random
import threading
from typing import Any, List, Optional, Sequence, Tuple, cast

import pytest

from acagent.ac import permits as permits_module
from acagent.ac import ratelimit as ratelimit_module
from acagent.ac.backoff import CONCURRENCY_WAIT_MAX, Backoff, concurrency_wait
from acagent.ac.client import ACClient
from acagent.ac.permits import RedisPermits
from acagent.ac.ratelimit import SharedRateLimiter
from acagent.ac.retry import STORE_RECONNECT, RetryPolicy
from acagent.config import AgentConfig
from acagent.globalconfig import RuntimeSettings
from acagent.ledger import Ledger
from acagent.observers import Observers
from acagent.spool import ResultSpool
from acagent.stage import Stage, StageContext

# ------------------------------------------------------------ the exponential itself

# (backoff, failures in a row, wait) with no randomness
EXACT: List[Tuple[Backoff, int, float]] = [
    (Backoff(1.0, 8.0), 1, 1.0),
    (Backoff(1.0, 8.0), 2, 2.0),
    (Backoff(1.0, 8.0), 3, 4.0),
    (Backoff(1.0, 8.0), 4, 8.0),
    (Backoff(1.0, 8.0), 5, 8.0),  # capped
    (Backoff(1.0, 8.0), 60, 8.0),
    (Backoff(1.0, 8.0), 10_000, 8.0),  # no overflow however long the outage
    (Backoff(1.0, 8.0), 0, 1.0),  # "no failure yet" waits as the first
    (Backoff(1.0, 8.0), -3, 1.0),
    (Backoff(0.25, 4.0), 1, 0.25),
    (Backoff(0.25, 4.0), 5, 4.0),
    (Backoff(0.25, 4.0), 4, 2.0),
    (Backoff(5.0, 600.0), 8, 600.0),
    (Backoff(5.0, 600.0), 7, 320.0),
    (Backoff(3.0, 3.0), 1, 3.0),  # a constant wait
    (Backoff(3.0, 3.0), 9, 3.0),
    (Backoff(0.0, 0.0), 4, 0.0),  # no wait at all
    (Backoff(0.0, 5.0), 4, 0.0),
    (Backoff(1.0, 5.0), 4, 5.0),  # cap need not be a power of two of first
]


@pytest.mark.parametrize(("backoff", "failures", "wait"), EXACT)
def test_exact_waits(backoff: Backoff, failures: int, wait: float) -> None:
    assert backoff.wait(failures) == wait
    assert backoff.wait(failures, random.Random(1)) == wait  # no spread: the rng is not used


# (backoff, failures, low, high): every wait in [low, high]
BOUNDED: List[Tuple[Backoff, int, float, float]] = [
    (Backoff(1.0, 8.0, 0.5), 1, 0.5, 1.0),
    (Backoff(1.0, 8.0, 0.5), 3, 2.0, 4.0),
    (Backoff(1.0, 8.0, 0.5), 9, 4.0, 8.0),  # the spread applies to the capped wait
    (Backoff(5.0, 600.0, 0.2), 1, 4.0, 5.0),
    (Backoff(5.0, 600.0, 0.2), 9, 480.0, 600.0),
    (Backoff(2.0, 60.0, 1.0), 2, 0.0, 4.0),  # full spread: anything up to the wait
    (Backoff(5.0, 120.0, jitter=2.0), 1, 5.0, 7.0),  # jitter is added, not scaled
    (Backoff(5.0, 120.0, jitter=2.0), 3, 20.0, 22.0),
    (Backoff(5.0, 120.0, jitter=2.0), 6, 120.0, 122.0),  # added after the cap
    (Backoff(4.0, 4.0, 0.5, 1.0), 1, 2.0, 5.0),  # both
]


@pytest.mark.parametrize(("backoff", "failures", "low", "high"), BOUNDED)
def test_random_waits_stay_in_bounds_and_spread_over_them(
    backoff: Backoff, failures: int, low: float, high: float
) -> None:
    rng = random.Random(7)
    waits = [backoff.wait(failures, rng) for _ in range(400)]
    assert all(low <= w <= high for w in waits), (min(waits), max(waits))
    span = high - low
    # spread over the range, not stuck at one end
    assert min(waits) < low + span * 0.1 and max(waits) > high - span * 0.1


def test_a_seeded_rng_gives_the_same_waits() -> None:
    backoff = Backoff(0.5, 60.0, 0.5, 0.3)
    first = [backoff.wait(n, random.Random(42)) for n in range(1, 10)]
    again = [backoff.wait(n, random.Random(42)) for n in range(1, 10)]
    assert first == again
    other = [backoff.wait(n, random.Random(43)) for n in range(1, 10)]
    assert other != first


def test_without_an_rng_the_waits_still_vary_within_bounds() -> None:
    backoff = Backoff(1.0, 1.0, 0.5)
    waits = {backoff.wait(1) for _ in range(50)}
    assert len(waits) > 1 and all(0.5 <= w <= 1.0 for w in waits)


@pytest.mark.parametrize(
    ("first", "cap", "spread", "jitter"),
    [
        (-1.0, 5.0, 0.0, 0.0),  # negative first wait
        (2.0, 1.0, 0.0, 0.0),  # cap below the first wait
        (math.nan, 5.0, 0.0, 0.0),
        (1.0, math.nan, 0.0, 0.0),
        (1.0, 5.0, -0.1, 0.0),  # spread outside 0..1
        (1.0, 5.0, 1.5, 0.0),
        (1.0, 5.0, math.nan, 0.0),
        (1.0, 5.0, 0.0, -1.0),  # negative jitter
        (1.0, 5.0, 0.0, math.nan),
    ],
)
def test_invalid_schedules_are_refused(
    first: float, cap: float, spread: float, jitter: float
) -> None:
    with pytest.raises(ValueError):
        Backoff(first, cap, spread, jitter)


def test_a_backoff_is_a_value() -> None:
    assert Backoff(1.0, 2.0, 0.5) == Backoff(1.0, 2.0, 0.5)
    assert Backoff(1.0, 2.0) != Backoff(1.0, 3.0)
    assert len({Backoff(1.0, 2.0), Backoff(1.0, 2.0)}) == 1
    with pytest.raises(AttributeError):
        Backoff(1.0, 2.0).first = 3.0  # type: ignore[misc]


# ------------------------------------------------------------ "Too many concurrent requests"


@pytest.mark.parametrize("cap", [CONCURRENCY_WAIT_MAX, 0.4, 0.0])
def test_concurrency_wait_is_uniform_in_0_to_cap(cap: float) -> None:
    rng = random.Random(5)
    waits = [concurrency_wait(rng, cap) for _ in range(500)]
    assert all(0.0 <= w <= cap for w in waits)
    if cap:
        assert min(waits) < cap * 0.05 and max(waits) > cap * 0.95


def test_concurrency_wait_defaults_to_todays_ten_seconds() -> None:
    assert CONCURRENCY_WAIT_MAX == 10.0
    waits = [concurrency_wait() for _ in range(200)]
    assert all(0.0 <= w <= 10.0 for w in waits) and len(set(waits)) > 1


# ------------------------------------------------------------ the policy's schedules


def _range(backoff: Backoff, failures: int) -> Tuple[float, float]:
    """The lowest and highest wait of ``backoff`` after ``failures``."""
    top = min(backoff.first * 2.0 ** (failures - 1), backoff.cap)
    return top * (1.0 - backoff.spread), top + backoff.jitter


# (schedule, failures, low, high): the defaults, today's agent's numbers where it has them
DEFAULTS: List[Tuple[str, int, float, float]] = [
    ("call", 1, 5.0, 7.0),  # 5 s doubling to 120 s, + 0..2 s (docs/protocol.md)
    ("call", 6, 120.0, 122.0),
    ("fetch", 1, 0.125, 0.25),  # one failed get-task among successes
    ("fetch", 5, 2.0, 4.0),
    ("fetch_breaker", 1, 4.0, 5.0),  # the server is down: 5 s doubling to 600 s
    ("fetch_breaker", 8, 480.0, 600.0),
    ("fetch_key_refused", 1, 5.0, 5.0),  # 5 s doubling to 5 min
    ("fetch_key_refused", 7, 300.0, 300.0),
    ("result", 1, 0.25, 0.5),
    ("result", 8, 30.0, 60.0),
    ("result_key_refused", 1, 1.6, 2.0),
    ("upload_breaker", 1, 5.0, 5.0),
    ("upload_breaker", 7, 300.0, 300.0),
    ("stage_failure", 1, 1.0, 1.0),  # 1 s doubling to 30 s
    ("stage_failure", 6, 30.0, 30.0),
    ("store_reconnect", 1, 0.1, 0.1),  # 0.1 s doubling to 1 s
    ("store_reconnect", 5, 1.0, 1.0),
]


@pytest.mark.parametrize(("name", "failures", "low", "high"), DEFAULTS)
def test_default_schedules(name: str, failures: int, low: float, high: float) -> None:
    backoff = getattr(RetryPolicy(), name)
    assert isinstance(backoff, Backoff)
    assert _range(backoff, failures) == pytest.approx((low, high))
    rng = random.Random(11)
    assert all(low <= backoff.wait(failures, rng) <= high for _ in range(100))


def test_the_store_reconnect_default_is_the_policys() -> None:
    assert RetryPolicy().store_reconnect is STORE_RECONNECT


# ------------------------------------------------------------ Redis reconnects follow the schedule


class StoreDown(Exception):
    """What a fake Redis raises while "unreachable"."""


class _Script:
    """A registered Lua script of a fake Redis: fails ``failures`` times, then answers."""

    def __init__(self, failures: int, answer: Any) -> None:
        self.failures = failures
        self.answer = answer
        self.calls = 0

    def __call__(self, *, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise StoreDown("connection refused")
        return self.answer


class _Store:
    """Just enough of ``redis.Redis``: ``script`` is the one that takes a permit or
    a token; every other script (release, renew) answers at once."""

    def __init__(self, script: _Script) -> None:
        self.script = script

    def register_script(self, source: str) -> _Script:
        if source in (permits_module._ACQUIRE_LUA, ratelimit_module._TAKE_LUA):
            return self.script
        return _Script(0, 0)

    def blpop(self, keys: Sequence[str], timeout: float) -> Optional[Tuple[bytes, bytes]]:
        return None

    def ping(self) -> bool:
        return True


class RecordingStop(threading.Event):
    """A stop Event that records each wait asked of it and returns at once (never set)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: List[float] = []

    def wait(self, timeout: Optional[float] = None) -> bool:
        assert timeout is not None  # every wait of the agent is bounded
        self.waits.append(timeout)
        return False


def test_the_shared_rate_limiter_waits_its_reconnect_schedule() -> None:
    script = _Script(failures=5, answer=0)  # then a token at once
    errors: List[BaseException] = []
    limiter = SharedRateLimiter(
        60,
        store=_Store(script),
        key="k",
        errors=(StoreDown,),
        on_store_error=errors.append,
        reconnect=Backoff(0.01, 0.04),
    )
    stop = RecordingStop()
    assert limiter.acquire(stop=stop, timeout=60.0)
    assert stop.waits == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.04])
    assert len(errors) == 5 and script.calls == 6


def test_the_shared_rate_limiter_defaults_to_the_policys_reconnect() -> None:
    limiter = SharedRateLimiter(
        60, store=_Store(_Script(failures=3, answer=0)), key="k", errors=(StoreDown,)
    )
    stop = RecordingStop()
    assert limiter.acquire(stop=stop, timeout=60.0)
    # 0.1 s doubling; a wait over 0.25 s is cut there (the store is tried again then)
    assert stop.waits == pytest.approx([0.1, 0.2, 0.25])


def test_redis_permits_wait_their_reconnect_schedule() -> None:
    script = _Script(failures=4, answer=[1, 0, 2, 0, 0])  # then granted, at the limit 2
    permits = RedisPermits(
        "redis://127.0.0.1:1/0", "api-key", 2, client=_Store(script), reconnect=Backoff(0.03, 0.1)
    )
    try:
        permits.store_errors = (StoreDown,)
        stop = RecordingStop()
        lease = permits.acquire(stop, timeout=60.0)
        assert lease is not None
        assert stop.waits == pytest.approx([0.03, 0.06, 0.1, 0.1])
        assert script.calls == 5
        permits.release(lease)
    finally:
        permits.close()


def test_redis_permits_default_to_the_policys_reconnect() -> None:
    permits = RedisPermits("redis://127.0.0.1:1/0", "api-key", 2, client=_Store(_Script(0, 0)))
    try:
        assert permits.reconnect is STORE_RECONNECT
    finally:
        permits.close()


# ------------------------------------------------------------ a stage loop's failure pause


class _Observers:
    def __init__(self) -> None:
        self.failures: List[str] = []

    def emit(self, event: str, *args: Any) -> None:
        assert event == "on_stage_failure"
        self.failures.append(str(args[1]))


class _Scripted(Stage):
    """Runs ``script`` (True: the step works, False: it raises), then stops; each
    pause ``run_loop`` asks for is recorded, not slept."""

    def __init__(self, ctx: StageContext, script: Sequence[bool]) -> None:
        super().__init__(ctx)
        self.script = list(script)
        self.pauses: List[float] = []

    def step(self) -> None:
        if not self.script:
            self.stopping.set()
            return
        if not self.script.pop(0):
            raise RuntimeError("step failed")

    def wait(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        return False


def test_a_stage_loop_pauses_as_the_policys_stage_failure_says(
    caplog: pytest.LogCaptureFixture,
) -> None:
    observers = _Observers()
    ctx = StageContext(
        config=cast(AgentConfig, None),
        client=cast(ACClient, None),
        ledger=cast(Ledger, None),
        spool=cast(ResultSpool, None),
        work_dir="",
        abort=threading.Event(),
        observers=cast(Observers, observers),
        settings=cast(RuntimeSettings, None),
        retry_policy=RetryPolicy(stage_failure=Backoff(0.5, 1.0)),
    )
    stage = _Scripted(ctx, [False, False, False, True, False, True])
    with caplog.at_level(logging.ERROR, logger="acagent.stage"):
        stage.run_loop(stage.step)
    # 0.5 s doubling to 1 s per error in a row; a step that works starts it over
    assert stage.pauses == [0.5, 1.0, 1.0, 0.5]
    assert observers.failures == ["step failed"] * 4
    assert [r.getMessage() for r in caplog.records] == [
        "stage: unexpected error; going on in 0.5s",
        "stage: unexpected error; going on in 1.0s",
        "stage: unexpected error; going on in 1.0s",
        "stage: unexpected error; going on in 0.5s",
    ]
