"""Retry rules: Retry-After parsing, RetryPolicy, run_with_retries, and ACClient
retries end to end against a fake AC server on 127.0.0.1.

Server-given waits use 1-2 s values and are measured; everything else uses
small waits (``FAST``).
"""

from __future__ import annotations

import email.utils
import gzip
import random
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from helpers import FAST_CLIENT as FAST
from helpers import WAIT, fast_policy, make_client, make_config, make_pipeline, running
from helpers import result_payload as result

from acagent.ac.backoff import Backoff
from acagent.ac.client import ACClient
from acagent.ac.retry import (
    MAX_SERVER_WAIT,
    ONE_ATTEMPT,
    RetryPolicy,
    parse_retry_after,
    run_with_retries,
    server_wait,
)
from acagent.config import AgentConfig
from acagent.errors import (
    ACConnectionError,
    ACHTTPError,
    ACRateLimitError,
    AgentStopping,
    BadReplyError,
)
from acagent.testing import FakeACServer, RecordedRequest, closed_port_url, expected_body

JOIN = 15.0


def records(ac: FakeACServer, endpoint: str) -> List[RecordedRequest]:
    return sorted((r for r in ac.requests if r.endpoint == endpoint), key=lambda r: r.started)


def gap(first: RecordedRequest, second: RecordedRequest) -> float:
    """Seconds between a reply and the next attempt, as the server saw them."""
    return second.started - first.finished


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    with FakeACServer(api_key="k") as server:
        yield server
        assert server.errors == []


@pytest.fixture
def client(ac: FakeACServer) -> Iterator[ACClient]:
    with make_client(ac) as c:
        yield c


# ------------------------------------------------------------ parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1.0),
        (" 7 ", 7.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("300", 300.0),
        ("301", 300.0),
        ("100000", 300.0),
        ("1e9", 300.0),
        ("inf", 300.0),
        ("-inf", 0.0),
    ],
)
def test_parse_retry_after_seconds_are_clamped(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "nan", "1,5", "Mon, 99 Foo 2024"])
def test_parse_retry_after_unparseable_is_none(value: Any) -> None:
    assert parse_retry_after(value) is None


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    ahead = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(ahead, now=now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    far = email.utils.formatdate(now + 86_400, usegmt=True)
    assert parse_retry_after(far, now=now) == MAX_SERVER_WAIT == 300.0


def test_parse_retry_after_http_date_uses_the_wall_clock() -> None:
    ahead = email.utils.formatdate(time.time() + 60, usegmt=True)
    wait = parse_retry_after(ahead)
    assert wait is not None and 58.0 <= wait <= 60.0


def test_server_wait_prefers_the_ac_header_and_clamps() -> None:
    assert server_wait({"X-Rate-Limit-Retry-After-Seconds": "3", "Retry-After": "9"}) == 3.0
    assert server_wait({"Retry-After": "9"}) == 9.0
    assert server_wait({"X-Rate-Limit-Retry-After-Seconds": "999999"}) == 300.0
    assert server_wait({"Retry-After": "999999"}) == 300.0
    # an unusable AC header falls back to Retry-After
    assert server_wait({"X-Rate-Limit-Retry-After-Seconds": "x", "Retry-After": "4"}) == 4.0
    assert server_wait({}) is None


def test_server_wait_reads_case_insensitive_reply_headers() -> None:
    import requests.structures

    headers = requests.structures.CaseInsensitiveDict({"x-rate-limit-retry-after-seconds": "2"})
    assert server_wait(headers) == 2.0


# ------------------------------------------------------------ RetryPolicy


def test_policy_classifies_errors() -> None:
    policy = RetryPolicy()
    assert policy.is_retry(ACRateLimitError("put-result"))
    assert policy.is_retry(ACHTTPError("put-result", 500))
    assert policy.is_retry(ACHTTPError("put-result", 503))
    assert policy.is_retry(ACConnectionError("reset"))
    assert not policy.is_retry(ACHTTPError("put-result", 400))
    assert not policy.is_retry(ACHTTPError("put-result", 404))
    assert not policy.is_retry(BadReplyError("not json"))
    assert not policy.is_retry(AgentStopping("stop"))
    assert not policy.is_retry(ValueError("bug"))


def test_policy_waits() -> None:
    policy = RetryPolicy(call=Backoff(1.0, 5.0), default_rate_limit_wait=7.0)
    assert [policy.wait_for(ACHTTPError("x", 502), n) for n in range(1, 6)] == [
        1.0,
        2.0,
        4.0,
        5.0,
        5.0,
    ]
    assert policy.wait_for(ACRateLimitError("x", retry_after=3.0), 0) == 3.0
    assert policy.wait_for(ACRateLimitError("x"), 0) == 7.0
    assert policy.wait_for(ACHTTPError("x", 502), 3) == 4.0
    # a server-given wait wins even for a concurrency 429
    assert policy.wait_for(ACRateLimitError("x", retry_after=2.0, concurrency=True), 0) == 2.0


def test_policy_concurrency_wait_is_uniform_in_range() -> None:
    policy = RetryPolicy(concurrency_wait_max=0.4, rng=random.Random(1))
    waits = [policy.wait_for(ACRateLimitError("x", concurrency=True), 0) for _ in range(500)]
    assert all(0.0 <= w <= 0.4 for w in waits)
    assert min(waits) < 0.05 and max(waits) > 0.35  # spread over the range, not constant


def test_policy_jitter_is_bounded() -> None:
    policy = RetryPolicy(call=Backoff(2.0, 120.0, jitter=0.5), rng=random.Random(3))
    values = [policy.wait_for(ACConnectionError("reset"), 2) for _ in range(200)]
    assert all(4.0 <= v <= 4.5 for v in values)
    assert len(set(values)) > 1


def test_defaults_are_todays_agent_numbers() -> None:
    policy = RetryPolicy()
    assert policy.rate_limit_retries == 5
    assert policy.error_retries == 3
    assert policy.call == Backoff(5.0, 120.0, jitter=2.0)
    assert policy.concurrency_wait_max == 10.0


# ------------------------------------------------------------ run_with_retries


class Script:
    """An attempt function that raises the scripted errors, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_run_with_retries_returns_after_transient_errors() -> None:
    waits: List[Tuple[str, float]] = []
    attempt = Script(ACHTTPError("e", 502), ACConnectionError("reset"), ACRateLimitError("e"))
    policy = RetryPolicy(call=Backoff(0.01, 120.0), default_rate_limit_wait=0.02)
    assert (
        run_with_retries(attempt, policy, on_retry=lambda e, w: waits.append((type(e).__name__, w)))
        == "ok"
    )
    assert attempt.calls == 4
    # the backoff counts only 5xx/connection failures: 0.01, then 0.02
    assert waits == [
        ("ACHTTPError", 0.01),
        ("ACConnectionError", 0.02),
        ("ACRateLimitError", 0.02),
    ]


def test_run_with_retries_raises_the_last_error_when_the_budget_is_spent() -> None:
    last = ACHTTPError("e", 504)
    attempt = Script(ACHTTPError("e", 500), ACHTTPError("e", 502), last, ACHTTPError("e", 599))
    policy = RetryPolicy(error_retries=2, call=Backoff(0.001, 120.0))
    with pytest.raises(ACHTTPError) as info:
        run_with_retries(attempt, policy)
    assert info.value is last
    assert attempt.calls == 3


def test_rate_limit_and_error_budgets_are_separate() -> None:
    errors: List[BaseException] = []
    for _ in range(2):
        errors += [ACRateLimitError("e", retry_after=0.0), ACHTTPError("e", 503)]
    attempt = Script(*errors)
    policy = RetryPolicy(rate_limit_retries=2, error_retries=2, call=Backoff(0.001, 120.0))
    assert run_with_retries(attempt, policy) == "ok"
    assert attempt.calls == 5

    attempt = Script(*[ACRateLimitError("e", retry_after=0.0) for _ in range(3)])
    with pytest.raises(ACRateLimitError):
        run_with_retries(attempt, policy)
    assert attempt.calls == 3


def test_run_with_retries_does_not_retry_final_errors() -> None:
    attempt = Script(ACHTTPError("e", 400))
    with pytest.raises(ACHTTPError):
        run_with_retries(attempt, FAST)
    assert attempt.calls == 1
    attempt = Script(KeyError("bug"))
    with pytest.raises(KeyError):
        run_with_retries(attempt, FAST)
    assert attempt.calls == 1


def test_one_attempt_raises_the_first_error_unchanged_and_never_waits() -> None:
    for first in (ACRateLimitError("e", retry_after=60.0), ACHTTPError("e", 503), KeyError("bug")):
        attempt = Script(first)
        waits: List[float] = []
        with pytest.raises(type(first)) as info:
            run_with_retries(attempt, ONE_ATTEMPT, on_retry=lambda e, w: waits.append(w))
        assert info.value is first
        assert attempt.calls == 1
        assert waits == []
    assert run_with_retries(Script(), ONE_ATTEMPT) == "ok"
    assert ONE_ATTEMPT.is_single_attempt and not RetryPolicy().is_single_attempt


def test_run_with_retries_stops_at_once_when_already_stopping() -> None:
    stop = threading.Event()
    stop.set()
    attempt = Script(ACRateLimitError("e", retry_after=60.0))
    started = time.monotonic()
    with pytest.raises(AgentStopping):
        run_with_retries(attempt, FAST, stop=stop)
    assert time.monotonic() - started < 1.0
    assert attempt.calls == 1


# ------------------------------------------------------------ 429 waits end to end


def assert_one_wait(ac: FakeACServer, low: float, high: float) -> float:
    first, second = records(ac, "put-result")
    assert (first.status, second.status) == (429, 200)
    waited = gap(first, second)
    assert low <= waited < high, waited
    return waited


def test_429_with_the_ac_wait_header_is_honoured(ac: FakeACServer, client: ACClient) -> None:
    ac.inject(
        "put-result",
        status=429,
        body=b"Rate limit exceeded",
        headers={"X-Rate-Limit-Retry-After-Seconds": "1"},
    )
    started = time.monotonic()
    client.put_result(result("t1"))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert_one_wait(ac, 0.9, 3.0)
    assert len(ac.results["t1"]) == 1


def test_429_with_retry_after_seconds(ac: FakeACServer, client: ACClient) -> None:
    ac.inject("put-result", status=429, body=b"slow down", headers={"Retry-After": "1"})
    started = time.monotonic()
    client.put_result(result("t1"))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert_one_wait(ac, 0.9, 3.0)


def test_429_with_retry_after_http_date(ac: FakeACServer, client: ACClient) -> None:
    # an HTTP date has whole seconds: the wait is in (1, 2] s
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    ac.inject("put-result", status=429, body=b"slow down", headers={"Retry-After": when})
    started = time.monotonic()
    client.put_result(result("t1"))
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.5, elapsed
    assert_one_wait(ac, 0.9, 3.5)


def test_429_with_a_huge_wait_is_clamped_to_300(ac: FakeACServer) -> None:
    policy = RetryPolicy(rate_limit_retries=0)
    ac.inject("put-result", status=429, headers={"X-Rate-Limit-Retry-After-Seconds": "86400"})
    with make_client(ac, policy) as client:
        with pytest.raises(ACRateLimitError) as info:
            client.put_result(result("t1"))
    assert info.value.retry_after == 300.0
    assert info.value.status == 429
    assert not info.value.concurrency


def test_429_without_a_wait_uses_the_default_wait(ac: FakeACServer) -> None:
    policy = RetryPolicy(default_rate_limit_wait=0.3, concurrency_wait_max=0.0)
    ac.inject("put-result", status=429, body=b"Rate limit exceeded")
    with make_client(ac, policy) as client:
        client.put_result(result("t1"))
    assert_one_wait(ac, 0.25, 2.0)


def test_too_many_concurrent_requests_waits_within_the_concurrency_range(
    ac: FakeACServer,
) -> None:
    # the default wait is huge, so taking the wrong branch would blow the bound
    policy = RetryPolicy(concurrency_wait_max=0.2, default_rate_limit_wait=30.0)
    ac.inject("put-result", status=429, body=b"Too many concurrent requests", times=3)
    started = time.monotonic()
    with make_client(ac, policy) as client:
        client.put_result(result("t1"))
    elapsed = time.monotonic() - started
    attempts = records(ac, "put-result")
    assert [r.status for r in attempts] == [429, 429, 429, 200]
    for before, after in zip(attempts, attempts[1:]):
        assert 0.0 <= gap(before, after) < 0.2 + 0.3
    assert elapsed < 2.0


def test_concurrency_429_retries_are_bounded(ac: FakeACServer) -> None:
    policy = RetryPolicy(rate_limit_retries=2, concurrency_wait_max=0.01)
    ac.inject("put-result", status=429, body=b"Too many concurrent requests", times=5)
    with make_client(ac, policy) as client:
        with pytest.raises(ACRateLimitError) as info:
            client.put_result(result("t1"))
    assert info.value.concurrency
    assert ac.count("put-result") == 3


# ------------------------------------------------------------ 5xx, resets, 4xx


def test_5xx_then_success(ac: FakeACServer, client: ACClient) -> None:
    ac.inject("put-result", status=503, body=b"busy")
    ac.inject("put-result", status=500, body=b"oops")
    client.put_result(result("t1"))
    assert [r.status for r in records(ac, "put-result")] == [503, 500, 200]
    assert len(ac.results["t1"]) == 1


def test_backoff_grows_between_5xx_retries(ac: FakeACServer) -> None:
    policy = RetryPolicy(call=Backoff(0.1, 120.0))
    ac.inject("put-result", status=502, times=2)
    with make_client(ac, policy) as client:
        client.put_result(result("t1"))
    first, second, third = records(ac, "put-result")
    assert 0.08 <= gap(first, second) < 0.6
    assert 0.18 <= gap(second, third) < 0.8


def test_connection_reset_then_success(ac: FakeACServer, client: ACClient) -> None:
    ac.inject("put-result", reset=True)
    client.put_result(result("t1"))
    assert [r.status for r in records(ac, "put-result")] == [0, 200]
    assert len(ac.results["t1"]) == 1


def test_budget_exhausted_raises_the_last_error(ac: FakeACServer) -> None:
    policy = RetryPolicy(error_retries=2, call=Backoff(0.02, 120.0))
    for status in (500, 502, 503):
        ac.inject("put-result", status=status, body=f"fail {status}".encode())
    with make_client(ac, policy) as client:
        with pytest.raises(ACHTTPError) as info:
            client.put_result(result("t1"))
    assert info.value.status == 503
    assert info.value.endpoint == "put-result"
    assert "fail 503" in str(info.value)
    assert ac.count("put-result") == 3
    assert "t1" not in ac.results


@pytest.mark.parametrize("settle", [ACClient.RESET_SETTLE_SECONDS, 0.0], ids=["settled", "control"])
def test_a_reset_request_still_counted_by_the_server_never_makes_a_third(
    ac: FakeACServer, settle: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server resets a put-result and counts it in flight 20 ms more, while
    a get-task holds the other permit: the client's retry (no backoff here)
    waits its settle time with the permit held, so the server never sees 3
    requests. The control (no settle) shows the third request, proving the
    setup can catch it."""
    monkeypatch.setattr(ACClient, "RESET_SETTLE_SECONDS", settle)
    ac.reset_counted_for = 0.02
    held = ac.stall("get-task")
    ac.inject("put-result", reset=True)
    at_once = RetryPolicy(call=Backoff(0.0, 0.0), concurrency_wait_max=0.05)
    with make_client(ac, at_once) as client:
        fetching = threading.Thread(target=client.get_task, name="test-fetch")
        fetching.start()
        try:
            assert ac.wait_for(lambda: ac.inflight == 1, 10.0)  # the get-task is held
            client.put_result(result("t1"))
        finally:
            held.set()
            fetching.join(10.0)
        assert not fetching.is_alive()
    if settle:
        assert [r.status for r in records(ac, "put-result")] == [0, 200]
        assert ac.max_inflight == 2 and ac.rejected_concurrent == 0
    else:
        assert ac.max_inflight == 3 and ac.rejected_concurrent >= 1
    assert len(ac.results["t1"]) == 1


def test_resets_exhaust_the_budget_as_a_connection_error(ac: FakeACServer) -> None:
    policy = RetryPolicy(error_retries=1, call=Backoff(0.02, 120.0))
    ac.inject("put-result", reset=True, times=2)
    with make_client(ac, policy) as client:
        with pytest.raises(ACConnectionError):
            client.put_result(result("t1"))
    assert ac.count("put-result") == 2


def test_unreachable_server_is_retried_then_a_connection_error() -> None:
    attempts: List[str] = []
    config = AgentConfig(
        server_url=closed_port_url(), api_key="k", rate_limit_per_min=0, ac_connect_timeout=2.0
    )
    client = ACClient(
        config,
        retry_policy=RetryPolicy(error_retries=2, call=Backoff(0.02, 120.0)),
        on_exchange=lambda endpoint, status, secs: attempts.append(status),
    )
    with client:
        with pytest.raises(ACConnectionError):
            client.put_result(result("t1"))
    assert attempts == ["error", "error", "error"]


@pytest.mark.parametrize("status", [400, 404, 413])
def test_4xx_is_not_retried(ac: FakeACServer, client: ACClient, status: int) -> None:
    ac.inject("put-result", status=status, body=b"no")
    with pytest.raises(ACHTTPError) as info:
        client.put_result(result("t1"))
    assert info.value.status == status
    assert not isinstance(info.value, ACRateLimitError)
    assert ac.count("put-result") == 1
    client.put_result(result("t2"))  # the client is still usable
    assert list(ac.results) == ["t2"]


# ------------------------------------------------------------ permits during waits


def test_the_permit_is_free_while_a_call_waits_out_a_429() -> None:
    with FakeACServer(api_key="k", max_concurrent=1) as ac:
        with make_client(ac, ac_max_concurrent=1) as client:
            ac.inject(
                "put-result",
                status=429,
                body=b"Rate limit exceeded",
                headers={"X-Rate-Limit-Retry-After-Seconds": "2"},
            )
            done: Dict[str, float] = {}
            failures: List[BaseException] = []

            def call(name: str) -> None:
                try:
                    client.put_result(result(name))
                    done[name] = time.monotonic()
                except BaseException as exc:
                    failures.append(exc)

            a = threading.Thread(target=call, args=("A",))
            b = threading.Thread(target=call, args=("B",))
            a_started = time.monotonic()
            a.start()
            try:
                assert ac.wait_for(lambda: ac.count("put-result", 429) == 1, timeout=JOIN)
                b.start()
                b.join(JOIN)
                assert not b.is_alive()
                assert a.is_alive()  # A is still waiting out its 429 ...
            finally:
                a.join(JOIN)
            assert not a.is_alive()
        assert failures == []
        # ... while B went through, on the permit A does not hold
        assert done["B"] < done["A"]
        (b_result,) = ac.results["B"]
        (a_result,) = ac.results["A"]
        assert b_result.received < a_result.received
        first_429 = records(ac, "put-result")[0]
        assert first_429.status == 429
        assert b_result.received - first_429.finished < 1.5  # B did not wait for A
        assert done["A"] - a_started >= 1.9
        assert ac.max_inflight == 1
        assert ac.count_429 == 1
        assert ac.rejected_concurrent == 0


def test_abort_ends_a_long_retry_wait_promptly(ac: FakeACServer, client: ACClient) -> None:
    ac.inject("put-result", status=429, headers={"X-Rate-Limit-Retry-After-Seconds": "120"})
    outcome: List[BaseException] = []

    def call() -> None:
        try:
            client.put_result(result("t1"))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        assert ac.wait_for(lambda: ac.count("put-result", 429) == 1, timeout=JOIN)
        client.abort.set()
        stopped = time.monotonic()
        thread.join(5.0)
        took = time.monotonic() - stopped
    finally:
        client.abort.set()
        thread.join(JOIN)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], AgentStopping)
    assert took < 1.0
    assert ac.count("put-result") == 1  # no further attempt after the abort


# ------------------------------------------------------------ retried uploads re-send everything


def test_retried_upload_result_resends_the_whole_file(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    data = expected_body(400_000, 11)
    path = tmp_path / "t1.gz"
    path.write_bytes(gzip.compress(data))
    ac.inject("upload-result", status=503, body=b"try later")
    client.upload_result(
        str(path), "t1_" + "d" * 32 + ".zip", "application/zip", result("t1", responseZipped=True)
    )
    first, second = records(ac, "upload-result")
    assert (first.status, second.status) == (503, 200)
    # both attempts carried the full multipart body
    assert first.body_len == second.body_len > path.stat().st_size > 0
    (received,) = ac.results["t1"]
    assert received.body_len == len(data)
    assert received.body == data


def test_upload_result_after_a_reset_resends_the_whole_file(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    data = b"plain text body \xe2\x82\xac\n" * 5000
    path = tmp_path / "t2.txt"
    path.write_bytes(data)
    ac.inject("upload-result", reset=True)
    client.upload_result(str(path), "t2_" + "e" * 32 + ".txt", "text/plain", result("t2"))
    first, second = records(ac, "upload-result")
    assert (first.status, second.status) == (0, 200)
    assert first.body_len == second.body_len
    assert ac.results["t2"][0].body == data


def test_retried_upload_logs_resends_the_whole_zip(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    path = tmp_path / "logs.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("app_log_prod.log", "line\n" * 20_000)
        archive.writestr("app_log_prod.log.1", expected_body(50_000, 2))
    content = path.read_bytes()
    ac.inject("upload-logs", status=503)
    client.upload_logs(str(path), result("fetchLogs-1"))
    first, second = records(ac, "upload-logs")
    assert (first.status, second.status) == (503, 200)
    assert first.body_len == second.body_len > len(content)
    (received,) = ac.results["fetchLogs-1"]
    assert received.via == "logs"
    assert received.body == content


def test_s3_put_after_a_reset_stores_the_whole_object(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    data = expected_body(600_000, 21)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    name = "t5" + "f" * 32
    put_url, _ = client.get_upload_url(name)
    ac.inject("s3", reset=True)
    client.put_s3(put_url, str(path))
    first, second = records(ac, "s3")
    assert (first.status, second.status) == (0, 200)
    assert first.body_len == second.body_len == len(data)
    stored = ac.s3_object(name)
    assert stored is not None
    body, _, length = stored
    assert length == len(data)
    assert body == data
    assert "Authorization" not in second.headers


def test_s3_put_5xx_budget_raises_the_last_error(ac: FakeACServer, tmp_path: Path) -> None:
    path = tmp_path / "body.bin"
    path.write_bytes(b"x" * 1000)
    policy = RetryPolicy(error_retries=1, call=Backoff(0.01, 120.0))
    with make_client(ac, policy) as client:
        put_url, _ = client.get_upload_url("t6" + "0" * 32)
        ac.inject("s3", status=500)
        ac.inject("s3", status=503)
        with pytest.raises(ACHTTPError) as info:
            client.put_s3(put_url, str(path))
    assert info.value.status == 503
    assert info.value.endpoint == "s3"
    assert ac.count("s3") == 2


# ------------------------------------------------------------ Pipeline(retry_policy=...)


def _failing_get_tasks(tmp_path: Path, policy: RetryPolicy, window: float) -> Tuple[int, float]:
    """Run an agent whose every get-task gets a 500: (get-tasks the server saw within
    ``window`` of the first, seconds until the 12th arrived or ``window`` passed)."""
    with FakeACServer(api_key="k") as ac:
        ac.inject("get-task", status=500, body=b"down", times=10_000)
        config = make_config(ac.url, tmp_path / "spool")
        with running(make_pipeline(config, retry_policy=policy)):
            assert ac.wait_for(lambda: ac.count("get-task") >= 1, WAIT)
            first = time.monotonic()
            ac.wait_for(lambda: ac.count("get-task") >= 12, window)
            took = time.monotonic() - first
            seen = ac.count("get-task")
        assert ac.errors == []
    return seen, took


def test_the_pipelines_retry_policy_sets_the_fetch_schedule(tmp_path: Path) -> None:
    """The same failing server, two policies: the fetch schedules of the one
    passed to ``Pipeline`` are the ones its Fetcher waits. With the default
    schedule (0.25 s doubling) a second get-task would come within the window
    of the slow one, so the plumbing is what this counts."""
    fast = fast_policy(fetch=Backoff(0.01, 0.01), fetch_breaker=Backoff(0.01, 0.01))
    seen, took = _failing_get_tasks(tmp_path / "fast", fast, WAIT)
    assert seen >= 12, seen  # 5 below the breaker's threshold, then the breaker's own
    slow = fast_policy(fetch=Backoff(60.0, 60.0), fetch_breaker=Backoff(60.0, 60.0))
    seen, _ = _failing_get_tasks(tmp_path / "slow", slow, max(1.0, took))
    assert seen == 1
