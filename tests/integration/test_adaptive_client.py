"""How ``ACClient`` tells the permits what each AC reply says (``ac/adaptive.py``),
against the fake AC server on 127.0.0.1, and the waits that follow."""

from __future__ import annotations

import random
from typing import Iterator

import pytest
from helpers import make_client, result_payload

from acagent.ac.adaptive import Pacing, retrying_overload
from acagent.ac.client import ACClient
from acagent.ac.retry import ONE_ATTEMPT, RetryPolicy
from acagent.delivery import Delivery, Kind, Outcome, decide
from acagent.errors import ACHTTPError, ACRateLimitError
from acagent.logs import task_context
from acagent.models import Result
from acagent.testing import FakeACServer

QUICK = Pacing(probe_after_ms=0, step_after_ms=0, clean_run=2)


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    with FakeACServer(max_concurrent=2) as server:
        yield server


@pytest.fixture
def client(ac: FakeACServer) -> Iterator[ACClient]:
    with make_client(ac) as c:
        c.permits.pacing = QUICK
        yield c


def _put(client: ACClient, task_id: str) -> BaseException:
    with task_context(task_id), pytest.raises((ACRateLimitError, ACHTTPError)) as info:
        client.put_result(result_payload(task_id), policy=ONE_ATTEMPT)
    return info.value


def test_a_concurrency_429_halves_the_limit_and_says_so(ac: FakeACServer, client: ACClient) -> None:
    ac.occupy(2)  # another client holds every slot: each call gets the 429
    first = _put(client, "t-1")
    assert isinstance(first, ACRateLimitError) and first.concurrency
    assert first.limit_lowered  # 2 -> 1 for it: a short wait is enough
    assert client.permits.effective_limit == 1
    again = _put(client, "t-2")
    assert isinstance(again, ACRateLimitError) and not again.limit_lowered  # at 1 already
    ac.release_occupied()
    for task_id in ("t-1", "t-2"):  # each retries the overload it drew (its Delivery says so)
        with retrying_overload(True):
            client.put_result(result_payload(task_id), policy=ONE_ATTEMPT)
    # both went through only after an overload: pressure, no climb yet
    assert client.permits.effective_limit == 1
    for n in range(2):
        client.put_result(result_payload(f"t-{n + 3}"), policy=ONE_ATTEMPT)
    assert client.permits.effective_limit == 2


def test_decide_marks_the_delivery_that_drew_an_overload_and_only_that_one() -> None:
    policy = RetryPolicy(rng=random.Random(3))
    delivery = Delivery(Result.agent_error({"taskId": "t"}, "x"), counted=False)
    busy = ACRateLimitError("put-result", "Too many concurrent requests", concurrency=True)
    for exc, overloaded in (
        (busy, True),
        (ACHTTPError("put-result", 503, ""), False),
        (busy, True),
        (None, False),
    ):
        delivery.apply(decide(delivery, Outcome.of(exc), policy, key_hint="", busy_hint="b"))
        assert delivery.overloaded is overloaded


def test_neither_a_plain_429_nor_a_503_lowers_the_limit(ac: FakeACServer, client: ACClient) -> None:
    ac.inject("put-result", status=429, body=b"slow down", times=1)
    limited = _put(client, "t-1")
    assert isinstance(limited, ACRateLimitError) and not limited.concurrency
    ac.inject("put-result", status=503, times=3)
    for _ in range(3):
        failed = _put(client, "t-2")
        assert isinstance(failed, ACHTTPError) and failed.status == 503
    assert client.permits.effective_limit == 2
    ac.inject("put-result", status=429, body=b"Too many concurrent requests", times=1)
    _put(client, "t-3")
    assert client.permits.effective_limit == 1  # the one that does


@pytest.mark.parametrize(
    "lowered,most",
    [
        (True, RetryPolicy().lowered_concurrency_wait_max),
        (False, RetryPolicy().concurrency_wait_max),
    ],
)
def test_the_wait_after_a_concurrency_429_is_short_once_the_limit_was_lowered_for_it(
    lowered: bool, most: float
) -> None:
    policy = RetryPolicy(rng=random.Random(7))
    exc = ACRateLimitError("put-result", "Too many concurrent requests", concurrency=True,
                           limit_lowered=lowered)  # fmt: skip
    waits = [policy.rate_limit_wait(exc) for _ in range(200)]
    assert all(0.0 <= w <= most for w in waits)
    assert max(waits) > most * 0.9  # the whole range is used
    delivery = Delivery(Result.agent_error({"taskId": "t"}, "x"), counted=False)
    decisions = [
        decide(delivery, Outcome.of(exc), policy, key_hint="", busy_hint="busy") for _ in range(200)
    ]
    assert Outcome.of(exc).kind is Kind.CONCURRENCY
    assert all(d.retry_in is not None and 0.0 <= d.retry_in <= most for d in decisions)
    assert max(d.retry_in or 0.0 for d in decisions) > most * 0.9
