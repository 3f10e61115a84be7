"""How ACClient classifies every AC reply: table-driven, with requests-mock.

Each row of a table is one reply (status x headers x body, or a network
error); the test runs it through the real client call for every endpoint and
checks the exception it becomes, the wait ``RetryPolicy`` derives from it and
whether the call is retried. The adapter is mounted on the client's own
sessions, so the rate-limit token, the permit and the exchange hook all run
as in production; only the socket is replaced. Concurrency is proven against
real servers elsewhere (test_client.py, test_pipeline.py), not here.

The tables are written against today's behaviour; when retry timing changes,
update the constants just below and the rows that name them.
"""

from __future__ import annotations

import contextlib
import email.utils
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type, Union

import pytest
import requests
import requests_mock

from acagent.ac.client import ACClient
from acagent.ac.retry import RetryPolicy
from acagent.config import AgentConfig
from acagent.errors import (
    ACConnectionError,
    ACHTTPError,
    ACRateLimitError,
    BadReplyError,
    TaskError,
)
from acagent.models import Task

# --------------------------------------------------------------------------
# Today's numbers (RetryPolicy defaults); a wait is exact or a (low, high) range
# --------------------------------------------------------------------------

Wait = Union[float, Tuple[float, float]]

#: 5xx / connection failure n: the call backoff, 5 s * 2**(n-1) capped at 120 s, + jitter 0..2 s
BACKOFF_1: Wait = (5.0, 7.0)
BACKOFF_2: Wait = (10.0, 12.0)
BACKOFF_3: Wait = (20.0, 22.0)
#: a 429 without a usable wait header
RATE_LIMIT_DEFAULT: Wait = 5.0
#: "Too many concurrent requests" without a wait header: uniform 0..10 s
CONCURRENCY_WAIT: Wait = (0.0, 10.0)
#: a server wait is clamped to 0..300 s
SERVER_WAIT_MAX = 300.0
#: attempts of one call before it gives up: 1 + error_retries / 1 + rate_limit_retries
ERROR_ATTEMPTS = 4
RATE_LIMIT_ATTEMPTS = 6

AC = "http://ac.test"
S3_PUT_URL = "http://s3.test/s3/t1_body"
API = AC + "/api/http-teleport/"

#: endpoint -> (HTTP method, URL registered with the mock)
ROUTES: Dict[str, Tuple[str, str]] = {
    "get-task": ("GET", API + "get-task"),
    "put-result": ("POST", API + "put-result"),
    "upload-result": ("POST", API + "upload-result"),
    "upload-url": ("GET", API + "upload-url"),
    "upload-logs": ("POST", API + "upload-logs"),
    "s3": ("PUT", S3_PUT_URL),
}
#: the endpoints ACClient retries itself (get-task is retried by the Fetcher's loop)
RETRIED_ENDPOINTS = ("put-result", "upload-result", "upload-url", "upload-logs", "s3")
OK_REPLY: Dict[str, Dict[str, Any]] = {
    "get-task": {"status_code": 200, "json": {"data": None}},
    "put-result": {"status_code": 200, "json": {"data": "ok"}},
    "upload-result": {"status_code": 200, "json": {"data": "ok"}},
    "upload-url": {
        "status_code": 200,
        "json": {"data": {"putUrl": S3_PUT_URL, "getUrl": S3_PUT_URL + "?get=1"}},
    },
    "upload-logs": {"status_code": 200, "json": {"data": "ok"}},
    "s3": {"status_code": 200, "headers": {"ETag": '"abc"'}},
}


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


# --------------------------------------------------------------------------
# Table 1: error replies and network failures (the same for every endpoint)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """One failed exchange and what the client makes of it."""

    id: str
    status: int = 0  # 0: no reply, ``exc`` is raised by the transport
    headers: Dict[str, Union[str, Callable[[], str]]] = field(default_factory=dict)
    body: str = ""
    exc: Optional[Type[BaseException]] = None
    raises: Type[BaseException] = ACHTTPError
    retried: bool = False
    wait: Optional[Wait] = None  # the first wait RetryPolicy derives, when retried
    retry_after: Optional[Wait] = None  # ACRateLimitError only
    concurrency: bool = False  # ACRateLimitError only
    reported: bool = True  # the exchange hook hears of the attempt
    not_for: Tuple[str, ...] = ()  # endpoints where the row does not apply (own test)

    def reply(self) -> Dict[str, Any]:
        if self.exc is not None:
            return {"exc": self.exc}
        headers = {k: (v() if callable(v) else v) for k, v in self.headers.items()}
        return {"status_code": self.status, "headers": headers, "text": self.body}


XRL = "X-Rate-Limit-Retry-After-Seconds"
TOO_MANY = "Too many concurrent requests"

# fmt: off
FAILURES: List[Failure] = [
    # 429: a rate limit waits what the server says; the AC header comes first
    Failure("429-xrl-7", 429, {XRL: "7"}, "Rate limit exceeded", raises=ACRateLimitError,
            retried=True, wait=7.0, retry_after=7.0),
    Failure("429-retry-after-3", 429, {"Retry-After": "3"}, raises=ACRateLimitError,
            retried=True, wait=3.0, retry_after=3.0),
    Failure("429-retry-after-fraction", 429, {"Retry-After": " 2.5 "}, raises=ACRateLimitError,
            retried=True, wait=2.5, retry_after=2.5),
    Failure("429-both-headers-xrl-wins", 429, {XRL: "4", "Retry-After": "9"},
            raises=ACRateLimitError, retried=True, wait=4.0, retry_after=4.0),
    Failure("429-bad-xrl-falls-back", 429, {XRL: "soon", "Retry-After": "6"},
            raises=ACRateLimitError, retried=True, wait=6.0, retry_after=6.0),
    Failure("429-http-date", 429, {"Retry-After": lambda: _http_date(30)},
            raises=ACRateLimitError, retried=True, wait=(28.0, 31.0), retry_after=(28.0, 31.0)),
    Failure("429-http-date-past", 429, {"Retry-After": lambda: _http_date(-600)},
            raises=ACRateLimitError, retried=True, wait=0.0, retry_after=0.0),
    Failure("429-clamped-high", 429, {"Retry-After": "100000"}, raises=ACRateLimitError,
            retried=True, wait=SERVER_WAIT_MAX, retry_after=SERVER_WAIT_MAX),
    Failure("429-clamped-negative", 429, {XRL: "-5"}, raises=ACRateLimitError,
            retried=True, wait=0.0, retry_after=0.0),
    Failure("429-nan-ignored", 429, {"Retry-After": "nan"}, raises=ACRateLimitError,
            retried=True, wait=RATE_LIMIT_DEFAULT, retry_after=None),
    Failure("429-garbage-ignored", 429, {"Retry-After": "tomorrow-ish"},
            raises=ACRateLimitError, retried=True, wait=RATE_LIMIT_DEFAULT, retry_after=None),
    Failure("429-no-header", 429, {}, "Rate limit exceeded", raises=ACRateLimitError,
            retried=True, wait=RATE_LIMIT_DEFAULT),
    Failure("429-empty", 429, raises=ACRateLimitError, retried=True, wait=RATE_LIMIT_DEFAULT),
    # 429 "Too many concurrent requests": a random short wait unless the server gives one
    Failure("429-concurrent", 429, {}, TOO_MANY, raises=ACRateLimitError, retried=True,
            wait=CONCURRENCY_WAIT, concurrency=True),
    Failure("429-concurrent-any-case", 429, {}, "error: TOO MANY Concurrent requests!",
            raises=ACRateLimitError, retried=True, wait=CONCURRENCY_WAIT, concurrency=True),
    Failure("429-concurrent-with-wait", 429, {"Retry-After": "2"}, TOO_MANY,
            raises=ACRateLimitError, retried=True, wait=2.0, retry_after=2.0, concurrency=True),
    # 5xx: retried with exponential backoff; a wait header is not used
    Failure("500", 500, {}, "boom", retried=True, wait=BACKOFF_1),
    Failure("500-long-body-kept-to-500", 500, {}, "x" * 2000, retried=True, wait=BACKOFF_1),
    Failure("502", 502, {}, "<html>bad gateway</html>", retried=True, wait=BACKOFF_1),
    Failure("503", 503, retried=True, wait=BACKOFF_1),
    Failure("503-retry-after-ignored", 503, {"Retry-After": "1"}, retried=True, wait=BACKOFF_1),
    Failure("504", 504, retried=True, wait=BACKOFF_1),
    Failure("599", 599, retried=True, wait=BACKOFF_1),
    # anything else that is not 2xx: final at once
    Failure("400", 400, {}, '{"error": "bad"}'),
    Failure("401", 401, {}, '{"error": "unauthorized"}'),
    Failure("403", 403),
    Failure("404", 404),
    Failure("405", 405, {"Allow": "GET"}),
    Failure("408", 408),
    Failure("409", 409),
    Failure("413", 413),
    Failure("302-not-followed", 302, {"Location": "http://elsewhere.test/"}),
    Failure("304", 304),
    Failure("499", 499),
    # no reply: the connection failed; retried like a 5xx
    Failure("connection-error", exc=requests.exceptions.ConnectionError,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("connect-timeout", exc=requests.exceptions.ConnectTimeout,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("read-timeout", exc=requests.exceptions.ReadTimeout,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("tls-error", exc=requests.exceptions.SSLError,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("proxy-error", exc=requests.exceptions.ProxyError,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("chunked-encoding-error", exc=requests.exceptions.ChunkedEncodingError,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    Failure("content-decoding-error", exc=requests.exceptions.ContentDecodingError,
            raises=ACConnectionError, retried=True, wait=BACKOFF_1),
    # a programming/config error in the request itself is not wrapped and not retried
    # (and the exchange hook does not hear of it)
    Failure("invalid-header", exc=requests.exceptions.InvalidHeader,
            raises=requests.exceptions.InvalidHeader, reported=False),
]
# fmt: on


# --------------------------------------------------------------------------
# Table 2: 2xx replies, whose body matters per endpoint (never retried)
# --------------------------------------------------------------------------

TASK = {"taskId": "t1", "url": "http://tool.test/a", "method": "get", "extraField": 1}


@dataclass(frozen=True)
class Success:
    """A 2xx reply to one endpoint: the value returned, or the error raised."""

    id: str
    endpoint: str
    status: int = 200
    body: Union[str, bytes, None] = None
    json: Any = None
    returns: Any = None  # compared with ==, or a predicate on the value
    raises: Optional[Type[BaseException]] = None
    task_id: Optional[str] = None  # TaskError: the id it still carries
    raw: Any = None  # TaskError: the task object as received

    def reply(self) -> Dict[str, Any]:
        reply: Dict[str, Any] = {"status_code": self.status}
        if self.json is not None:
            reply["json"] = self.json
        elif isinstance(self.body, bytes):
            reply["content"] = self.body
        elif self.body is not None:
            reply["text"] = self.body
        return reply


def _is_task(value: Any) -> bool:
    return (
        isinstance(value, Task)
        and value.task_id == "t1"
        and value.method == "GET"
        and value.url == TASK["url"]
        and value.raw == TASK  # every field is kept, to be echoed in the result
    )


# fmt: off
SUCCESSES: List[Success] = [
    # get-task: no task, a task, or a reply the protocol does not allow
    Success("null-data", "get-task", json={"data": None}, returns=None),
    Success("no-data-key", "get-task", json={}, returns=None),
    Success("204", "get-task", status=204, returns=None),
    Success("200-empty", "get-task", body="", returns=None),
    Success("200-blank", "get-task", body=" \r\n ", returns=None),
    Success("task", "get-task", json={"data": TASK}, returns=_is_task),
    Success("task-201", "get-task", status=201, json={"data": TASK}, returns=_is_task),
    Success("not-json", "get-task", body="<html>maintenance</html>", raises=BadReplyError),
    Success("json-array", "get-task", json=[TASK], raises=BadReplyError),
    Success("json-string", "get-task", body='"task"', raises=BadReplyError),
    Success("data-number", "get-task", json={"data": 5}, raises=BadReplyError),
    Success("data-list", "get-task", json={"data": [TASK]}, raises=BadReplyError),
    Success("deep-nesting", "get-task", body="[" * 100_000, raises=BadReplyError),
    Success("task-without-id", "get-task", json={"data": {"url": "http://tool.test/"}},
            raises=TaskError, task_id=None, raw={"url": "http://tool.test/"}),
    Success("task-without-url", "get-task", json={"data": {"taskId": "t9", "method": "GET"}},
            raises=TaskError, task_id="t9", raw={"taskId": "t9", "method": "GET"}),
    Success("task-bad-method", "get-task",
            json={"data": {"taskId": "t8", "url": "http://tool.test/", "method": "FETCH"}},
            raises=TaskError, task_id="t8",
            raw={"taskId": "t8", "url": "http://tool.test/", "method": "FETCH"}),
    # upload-url: the reply must carry both URLs
    Success("urls", "upload-url", json=OK_REPLY["upload-url"]["json"],
            returns=(S3_PUT_URL, S3_PUT_URL + "?get=1")),
    Success("not-json", "upload-url", body="ok", raises=BadReplyError),
    Success("204", "upload-url", status=204, raises=BadReplyError),
    Success("json-array", "upload-url", json=[], raises=BadReplyError),
    Success("null-data", "upload-url", json={"data": None}, raises=BadReplyError),
    Success("no-get-url", "upload-url", json={"data": {"putUrl": S3_PUT_URL}},
            raises=BadReplyError),
    Success("empty-put-url", "upload-url", json={"data": {"putUrl": "", "getUrl": "x"}},
            raises=BadReplyError),
    Success("put-url-not-string", "upload-url", json={"data": {"putUrl": 1, "getUrl": "x"}},
            raises=BadReplyError),
    # the result endpoints and S3: any 2xx is success, whatever the body
    *(
        Success(case, endpoint, status=status, body=body, returns=None)
        for endpoint in ("put-result", "upload-result", "upload-logs", "s3")
        for case, status, body in (
            ("200-json", 200, '{"data": "ok"}'),
            ("200-not-json", 200, "<html>fine</html>"),
            ("201", 201, ""),
            ("204", 204, None),
        )
    ),
]
# fmt: on


# --------------------------------------------------------------------------
# Table 3: sequences through one call's retry budget
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySequence:
    """Replies in order to one call; the last one repeats if the call goes on."""

    id: str
    replies: List[Failure]
    attempts: int
    waits: List[Wait]
    raises: Optional[Type[BaseException]] = None  # None: the last reply is a success


F503 = Failure("503", 503)
F429 = Failure("429", 429, {XRL: "1"})
F429_BARE = Failure("429-bare", 429)
F400 = Failure("400", 400)
FCONN = Failure("conn", exc=requests.exceptions.ConnectionError)

# fmt: off
SEQUENCES: List[RetrySequence] = [
    RetrySequence("503-until-exhausted", [F503], ERROR_ATTEMPTS, [BACKOFF_1, BACKOFF_2, BACKOFF_3],
             raises=ACHTTPError),
    RetrySequence("connection-until-exhausted", [FCONN], ERROR_ATTEMPTS,
             [BACKOFF_1, BACKOFF_2, BACKOFF_3], raises=ACConnectionError),
    RetrySequence("429-until-exhausted", [F429], RATE_LIMIT_ATTEMPTS, [1.0] * 5,
             raises=ACRateLimitError),
    # 429s and errors have separate budgets, and a 429 does not advance the backoff
    RetrySequence("429-503-429-then-ok", [F429_BARE, F503, F429_BARE], 4,
             [RATE_LIMIT_DEFAULT, BACKOFF_1, RATE_LIMIT_DEFAULT]),
    RetrySequence("503-conn-503-then-ok", [F503, FCONN, F503], 4, [BACKOFF_1, BACKOFF_2, BACKOFF_3]),
    RetrySequence("503-then-400-is-final", [F503, F400], 2, [BACKOFF_1], raises=ACHTTPError),
]
# fmt: on


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingPolicy(RetryPolicy):
    """Today's RetryPolicy, except that it records each wait and then does not sleep."""

    waits: List[Tuple[BaseException, float]] = field(default_factory=list, compare=False)

    def wait_for(self, exc: BaseException, errors_so_far: int) -> float:
        wait = super().wait_for(exc, errors_so_far)
        self.waits.append((exc, wait))
        return 0.0


@dataclass
class Harness:
    client: ACClient
    policy: RecordingPolicy
    adapter: requests_mock.Adapter
    exchanges: List[Tuple[str, str]]
    payload_file: Path

    def register(self, endpoint: str, replies: List[Dict[str, Any]]) -> None:
        method, url = ROUTES[endpoint]
        self.adapter.register_uri(method, url, replies)

    def call(self, endpoint: str) -> Any:
        client, path = self.client, str(self.payload_file)
        if endpoint == "get-task":
            return client.get_task()
        if endpoint == "put-result":
            return client.put_result({"taskId": "t1", "statusCode": 200})
        if endpoint == "upload-result":
            return client.upload_result(path, "t1_0.zip", "application/zip", {"taskId": "t1"})
        if endpoint == "upload-url":
            return client.get_upload_url("t1_0")
        if endpoint == "upload-logs":
            return client.upload_logs(path, {"taskId": "fetchLogs-1"})
        if endpoint == "s3":
            return client.put_s3(S3_PUT_URL, path)
        raise AssertionError(endpoint)

    def check_requests(self, endpoint: str, attempts: int) -> None:
        """Every attempt reached the mock with the right method and URL; permits are back."""
        method, url = ROUTES[endpoint]
        history = self.adapter.request_history
        assert len(history) == attempts
        assert all(r.method == method and r.url.split("?")[0] == url for r in history)
        assert all(e == endpoint for e, _ in self.exchanges)
        assert self.client.inflight == 0
        permits = self.client.permits
        assert permits.holders == 0 and self.client.inflight == 0
        # every permit can be taken again, and not one more (a 429 "Too many
        # concurrent requests" lowered the effective limit below the cap)
        stop = threading.Event()
        leases = [permits.acquire(stop, timeout=0.5) for _ in range(permits.effective_limit)]
        assert all(lease is not None for lease in leases)
        assert permits.acquire(stop, timeout=0.05) is None
        for lease in leases:
            permits.release(lease)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the whole module (a tmp_path per case costs more than the case)."""
    path = tmp_path_factory.mktemp("classify")
    (path / "body.zip").write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # read, never written
    return path


@contextlib.contextmanager
def new_harness(workdir: Path) -> Iterator[Harness]:
    """A fresh client whose two sessions (AC and S3) talk to one requests-mock adapter."""
    config = AgentConfig(server_url=AC, api_key="k", spool_dir=str(workdir / "spool"))
    exchanges: List[Tuple[str, str]] = []
    policy = RecordingPolicy()
    client = ACClient(
        config,
        retry_policy=policy,
        on_exchange=lambda endpoint, status, _secs: exchanges.append((endpoint, status)),
    )
    adapter = requests_mock.Adapter()
    for session in (client.session, client.s3_session):
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    with client:
        yield Harness(client, policy, adapter, exchanges, workdir / "body.zip")


@pytest.fixture
def harness(workdir: Path) -> Iterator[Harness]:
    with new_harness(workdir) as h:
        yield h


@contextlib.contextmanager
def endpoint_named(endpoint: str) -> Iterator[None]:
    """Prefix an assertion failure with the endpoint (the endpoints share one test case)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"[{endpoint}] {exc}") from exc


def _within(value: Optional[float], expected: Wait) -> bool:
    if value is None:
        return False
    if isinstance(expected, tuple):
        low, high = expected
        return low <= value <= high
    return value == pytest.approx(expected, abs=1e-6)


def _expected_body(failure: Failure, endpoint: str) -> str:
    """What an HTTP error keeps of the reply body: the storage host's is never quoted."""
    if endpoint != "s3":
        return failure.body[:500]
    if failure.status == 429:
        return ""
    if failure.status is not None and 300 <= failure.status < 400:
        return "redirect not followed"
    return "upload refused by the storage service"


def _status_label(failure: Failure) -> str:
    return "error" if failure.exc is not None else str(failure.status)


def _check_exception(exc: BaseException, failure: Failure, endpoint: str) -> None:
    assert type(exc) is failure.raises, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ACHTTPError):
        assert exc.endpoint == endpoint and exc.status == failure.status
        assert exc.body == _expected_body(failure, endpoint)
    if isinstance(exc, ACRateLimitError):
        # the storage host's body is not read: only the AC server says "concurrent"
        assert exc.concurrency is (failure.concurrency and endpoint != "s3")
        if failure.retry_after is None:
            assert exc.retry_after is None
        else:
            assert _within(exc.retry_after, failure.retry_after), exc.retry_after
    if isinstance(exc, ACConnectionError):
        # the transport error is kept as the cause (and is the one injected, not
        # requests-mock's NoMockAddress, which is also a ConnectionError)
        if endpoint == "s3":
            # the presigned URL's query (a signature) must not ride along in a chained error
            assert exc.__cause__ is None and exc.__suppress_context__
        else:
            assert type(exc.__cause__) is failure.exc


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

ENDPOINTS = tuple(ROUTES)


@pytest.mark.parametrize("failure", FAILURES, ids=lambda f: f.id)
def test_failed_exchange_is_classified(workdir: Path, failure: Failure) -> None:
    # One case per row, the endpoints in a loop: ~50 cases instead of ~250 keeps
    # the module well under its 5 s budget (pytest's per-case cost dominates).
    for endpoint in ENDPOINTS:
        if endpoint in failure.not_for:
            continue
        with new_harness(workdir) as harness, endpoint_named(endpoint):
            _check_failed_exchange(harness, endpoint, failure)


def _check_failed_exchange(harness: Harness, endpoint: str, failure: Failure) -> None:
    retried = failure.retried and endpoint in RETRIED_ENDPOINTS
    harness.register(endpoint, [failure.reply(), OK_REPLY[endpoint]])
    if retried:
        harness.call(endpoint)  # the second attempt gets the good reply
        attempts = 2
        assert len(harness.policy.waits) == 1
        exc, wait = harness.policy.waits[0]
        _check_exception(exc, failure, endpoint)
        assert failure.wait is not None and _within(wait, failure.wait), wait
    else:
        with pytest.raises(failure.raises) as info:
            harness.call(endpoint)
        attempts = 1
        _check_exception(info.value, failure, endpoint)
        assert harness.policy.waits == []
        if endpoint in RETRIED_ENDPOINTS:
            # the policy itself says final (not only: the budget was spent)
            assert not harness.policy.is_retry(info.value)
    harness.check_requests(endpoint, attempts)
    expected = [_status_label(failure)] if failure.reported else []
    expected += ["200"] if retried else []
    assert [status for _, status in harness.exchanges] == expected


@pytest.mark.parametrize("case", SUCCESSES, ids=lambda c: f"{c.endpoint}-{c.id}")
def test_2xx_reply_is_classified(harness: Harness, case: Success) -> None:
    harness.register(case.endpoint, [case.reply()])
    if case.raises is None:
        value = harness.call(case.endpoint)
        if callable(case.returns):
            assert case.returns(value), value
        else:
            assert value == case.returns
    else:
        with pytest.raises(case.raises) as info:
            harness.call(case.endpoint)
        if isinstance(info.value, TaskError):
            assert info.value.task_id == case.task_id
            assert info.value.raw == case.raw
    # a 2xx is never retried, even when its body is unusable
    assert harness.policy.waits == []
    harness.check_requests(case.endpoint, 1)
    assert harness.exchanges == [(case.endpoint, str(case.status))]


@pytest.mark.parametrize("sequence", SEQUENCES, ids=lambda s: s.id)
def test_retry_budget(workdir: Path, sequence: RetrySequence) -> None:
    for endpoint in RETRIED_ENDPOINTS:
        with new_harness(workdir) as harness, endpoint_named(endpoint):
            _check_retry_budget(harness, endpoint, sequence)


def _check_retry_budget(harness: Harness, endpoint: str, sequence: RetrySequence) -> None:
    replies = [f.reply() for f in sequence.replies]
    if sequence.raises is None:
        replies.append(OK_REPLY[endpoint])
    harness.register(endpoint, replies)
    if sequence.raises is None:
        harness.call(endpoint)
    else:
        with pytest.raises(sequence.raises):
            harness.call(endpoint)
    # tenacity 9 also derives a wait for the failure that ends the budget (then
    # stops without sleeping); only the waits before a further attempt are paused
    waits = [wait for _, wait in harness.policy.waits][: sequence.attempts - 1]
    assert len(waits) == len(sequence.waits), waits
    assert all(_within(w, e) for w, e in zip(waits, sequence.waits)), waits
    harness.check_requests(endpoint, sequence.attempts)
    assert len(harness.exchanges) == sequence.attempts


def test_tables_cover_every_endpoint_and_outcome() -> None:
    # guards the tables themselves: a row dropped by an edit shows up here
    assert set(ENDPOINTS) == {
        "get-task",
        "put-result",
        "upload-result",
        "upload-url",
        "upload-logs",
        "s3",
    }
    kinds = {f.raises for f in FAILURES} | {c.raises for c in SUCCESSES}
    assert {ACRateLimitError, ACHTTPError, ACConnectionError, BadReplyError, TaskError} <= kinds
    assert {c.endpoint for c in SUCCESSES} == set(ENDPOINTS)
    assert len({f.id for f in FAILURES}) == len(FAILURES)
