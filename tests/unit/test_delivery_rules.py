"""The delivery rules, table-driven: ``delivery.decide`` without any server.

Each row of the table is one attempt: the reply the AC server (or S3) gave,
made into the exception the client raises from it (the client's own
``_check_status`` / ``_check_s3_status``, so status x headers x body are
classified as in production), or a failure with no reply; the delivery's
state before it (route, attempts, refusals, S3 failures, an error result or
a real one); and the decision ``decide`` must give: when the result is due
again (exact, a (low, high) range, or None: done with it), why, the class
pause, a breaker failure, the fetch hold, a reroute, quarantine and the
answer sent instead, and the counts after the attempt.

The waits are the default ``RetryPolicy``'s; when a schedule changes,
update the constants just below and the rows that name them.
"""

from __future__ import annotations

import dataclasses
import email.utils
import errno
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from acagent.ac.client import _check_s3_status, _check_status
from acagent.ac.retry import RetryPolicy
from acagent.ac.transport import ACReply
from acagent.delivery import (
    LINKED_BODY,
    BodyMismatch,
    Decision,
    Delivery,
    Kind,
    Outcome,
    Route,
    decide,
    lanes_held_in,
    route_of,
)
from acagent.errors import (
    ACConnectionError,
    AgentStopping,
    BadReplyError,
    UploadURLRefused,
)
from acagent.hints import CONCURRENCY_HINT
from acagent.models import Result

Wait = Union[float, Tuple[float, float]]

# --------------------------------------------------------------------------
# The default schedules (RetryPolicy); a wait is exact or a (low, high) range
# --------------------------------------------------------------------------


def result_backoff(n: int) -> Wait:
    """``result``: 0.5 s doubling to 60 s, scaled into [0.5, 1]."""
    step = min(0.5 * 2 ** (n - 1), 60.0)
    return (step * 0.5, step)


def key_backoff(n: int) -> Wait:
    """``result_key_refused``: 2 s doubling to 60 s, scaled into [0.8, 1]."""
    step = min(2.0 * 2 ** (n - 1), 60.0)
    return (step * 0.8, step)


#: "Too many concurrent requests" without a wait header: uniform 0..10 s
CONCURRENCY_WAIT: Wait = (0.0, 10.0)
#: a server wait is clamped to 0..300 s
SERVER_WAIT_MAX = 300.0

KEY_HINT = "the AC server refused the API key: check --apiKey"
HELD = f"{KEY_HINT} (HTTP {{}} on upload)"
XRL = "X-Rate-Limit-Retry-After-Seconds"
TOO_MANY = "Too many concurrent requests"
RATE_LIMITED = "rate limited (429)"
TOO_LARGE = "put-result too large for the server (413)"
S3_REFUSED = "upload refused by the storage service"


def _http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


#: the endpoint an attempt on each route fails at
ENDPOINT: Dict[str, str] = {
    "inline": "put-result",
    "empty": "put-result",
    "error": "put-result",
    "upload": "upload-result",
    "logs": "upload-logs",
}


@dataclass(frozen=True)
class Row:
    """One attempt and the decision it must give."""

    id: str
    status: int = 0  # 0: no reply: ``exc`` (None: the attempt went through)
    headers: Dict[str, Union[str, Callable[[], str]]] = field(default_factory=dict)
    body: str = ""
    exc: Optional[BaseException] = None
    # the delivery before the attempt
    route: Route = "inline"
    attempts: int = 0
    refusals: int = 0
    s3: int = 0
    error_result: bool = False
    # the decision
    wait: Optional[Wait] = None  # None: done with the result
    why: str = ""
    pause: Wait = 0.0
    breaker: bool = False
    hold: bool = False
    delivered: bool = False
    reroute: Optional[Route] = None
    reroute_why: str = ""
    quarantine: str = ""  # the reason kept with the original ("" = not quarantined)
    answer: Tuple[str, ...] = ()  # texts the error result sent instead holds
    failure: str = ""
    counts: Tuple[int, int, int] = (0, 0, 0)  # attempts, refusals, S3 failures after

    def raised(self) -> Optional[BaseException]:
        if self.status == 0:
            return self.exc
        headers = CaseInsensitiveDict(
            {k: (v() if callable(v) else v) for k, v in self.headers.items()}
        )
        try:
            if self.route == "s3":
                reply = requests.Response()
                reply.status_code, reply.headers = self.status, headers
                _check_s3_status(reply)
            else:
                _check_status(
                    ENDPOINT[self.route], ACReply(self.status, headers, self.body.encode())
                )
        except Exception as exc:  # the exception is the row's input
            return exc
        raise AssertionError(f"HTTP {self.status} raised nothing")

    def delivery(self) -> Delivery:
        fields = {"taskId": self.id, "method": "GET", "url": "http://tool.test/"}
        if self.error_result:
            result = Result.agent_error(fields, "the target timed out", failure="timeout")
        else:
            result = Result(fields, 200, body_path="/spool/body", body_size=1_000)
        return Delivery(
            result,
            counted=True,
            attempts=self.attempts,
            refusals=self.refusals,
            s3_failures=self.s3,
            route=self.route,
        )


def _ac(status: int, body: str) -> str:
    return f"put-result: HTTP {status}" + (f": {body}" if body else "")


# fmt: off
ROWS: List[Row] = [
    # ---- went through: done, the key hold (if any) released
    Row("delivered", delivered=True),
    Row("delivered-after-retries", attempts=5, refusals=1, delivered=True, counts=(5, 1, 0)),
    Row("delivered-s3", route="s3", attempts=2, s3=2, delivered=True, counts=(2, 0, 2)),
    # ---- 429 with a wait: the class pauses that long, the result is due then
    Row("429-xrl-7", 429, {XRL: "7"}, "Rate limit exceeded", wait=7.0, pause=7.0,
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-retry-after-3", 429, {"Retry-After": "3"}, wait=3.0, pause=3.0,
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-both-headers-xrl-wins", 429, {XRL: "4", "Retry-After": "9"}, wait=4.0, pause=4.0,
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-bad-xrl-falls-back", 429, {XRL: "soon", "Retry-After": "6"}, wait=6.0, pause=6.0,
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-http-date", 429, {"Retry-After": lambda: _http_date(30)}, wait=(28.0, 31.0),
        pause=(28.0, 31.0), why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-clamped-high", 429, {"Retry-After": "100000"}, wait=SERVER_WAIT_MAX,
        pause=SERVER_WAIT_MAX, why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-clamped-negative", 429, {XRL: "-5"}, wait=0.0, pause=0.0, why=RATE_LIMITED,
        counts=(1, 0, 0)),
    Row("429-xrl-on-upload-result", 429, {XRL: "2"}, route="upload", attempts=3, wait=2.0,
        pause=2.0, why=RATE_LIMITED, counts=(4, 0, 0)),
    Row("429-xrl-on-error-result", 429, {XRL: "2"}, route="error", error_result=True, wait=2.0,
        pause=2.0, why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-xrl-on-s3", 429, {"Retry-After": "5"}, route="s3", wait=5.0, pause=5.0,
        why=RATE_LIMITED, counts=(1, 0, 1)),
    # ---- 429 without a usable wait: this result's own backoff, the class goes on
    Row("429-no-header", 429, {}, "Rate limit exceeded", wait=result_backoff(1),
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-no-header-3rd", 429, attempts=2, wait=result_backoff(3), why=RATE_LIMITED,
        counts=(3, 0, 0)),
    Row("429-no-header-capped", 429, attempts=20, wait=result_backoff(21), why=RATE_LIMITED,
        counts=(21, 0, 0)),
    Row("429-garbage-header", 429, {"Retry-After": "tomorrow-ish"}, wait=result_backoff(1),
        why=RATE_LIMITED, counts=(1, 0, 0)),
    Row("429-nan-header", 429, {"Retry-After": "nan"}, wait=result_backoff(1),
        why=RATE_LIMITED, counts=(1, 0, 0)),
    # ---- "Too many concurrent requests": a random short wait unless the server gives one
    Row("429-concurrent", 429, {}, TOO_MANY, wait=CONCURRENCY_WAIT, why=CONCURRENCY_HINT,
        counts=(1, 0, 0)),
    Row("429-concurrent-any-case", 429, {}, "error: TOO MANY Concurrent requests!",
        wait=CONCURRENCY_WAIT, why=CONCURRENCY_HINT, counts=(1, 0, 0)),
    Row("429-concurrent-later-attempt", 429, {}, TOO_MANY, attempts=6, wait=CONCURRENCY_WAIT,
        why=CONCURRENCY_HINT, counts=(7, 0, 0)),
    Row("429-concurrent-with-wait", 429, {"Retry-After": "2"}, TOO_MANY, wait=2.0, pause=2.0,
        why=CONCURRENCY_HINT, counts=(1, 0, 0)),
    Row("429-concurrent-with-xrl", 429, {XRL: "1"}, TOO_MANY, wait=1.0, pause=1.0,
        why=CONCURRENCY_HINT, counts=(1, 0, 0)),
    # ---- 401/403: the key is refused; fetching is held, the result kept and retried
    Row("401", 401, {}, '{"error": "unauthorized"}', wait=key_backoff(1), why="HTTP 401",
        hold=True, counts=(1, 0, 0)),
    Row("403", 403, wait=key_backoff(1), why="HTTP 403", hold=True, counts=(1, 0, 0)),
    Row("401-4th", 401, attempts=3, wait=key_backoff(4), why="HTTP 401", hold=True,
        counts=(4, 0, 0)),
    Row("401-capped", 401, attempts=10, wait=key_backoff(11), why="HTTP 401", hold=True,
        counts=(11, 0, 0)),
    Row("401-retry-after-ignored", 401, {"Retry-After": "30"}, wait=key_backoff(1),
        why="HTTP 401", hold=True, counts=(1, 0, 0)),
    Row("403-upload-result", 403, route="upload", wait=key_backoff(1), why="HTTP 403",
        hold=True, counts=(1, 0, 0)),
    Row("401-error-result", 401, route="error", error_result=True, wait=key_backoff(1),
        why="HTTP 401", hold=True, counts=(1, 0, 0)),
    Row("403-s3-third-failure", 403, route="s3", s3=2, wait=key_backoff(1), why="HTTP 403",
        hold=True, reroute="upload", reroute_why=f"S3 upload failed (s3: HTTP 403: {S3_REFUSED})",
        counts=(1, 0, 3)),
    # ---- 413: an inline result goes through upload-result, at once; anywhere else a failure
    Row("413-inline", 413, wait=0.0, reroute="upload", reroute_why=TOO_LARGE, counts=(1, 0, 0)),
    Row("413-inline-after-retries", 413, {}, "too big", attempts=4, wait=0.0, reroute="upload",
        reroute_why=TOO_LARGE, counts=(5, 0, 0)),
    Row("413-upload-result", 413, route="upload", attempts=1, wait=result_backoff(2),
        why="upload-result: HTTP 413", breaker=True, counts=(2, 0, 0)),
    Row("413-error-result", 413, route="error", error_result=True, wait=result_backoff(1),
        why=_ac(413, ""), breaker=True, counts=(1, 0, 0)),
    Row("413-empty", 413, route="empty", wait=result_backoff(1), why=_ac(413, ""),
        breaker=True, counts=(1, 0, 0)),
    Row("413-logs", 413, route="logs", wait=result_backoff(1), why="upload-logs: HTTP 413",
        breaker=True, counts=(1, 0, 0)),
    Row("413-s3", 413, route="s3", wait=result_backoff(1), why=f"s3: HTTP 413: {S3_REFUSED}",
        breaker=True, counts=(1, 0, 1)),
    # ---- 400/422: refused content, retried twice, then quarantined and answered instead
    Row("422-first", 422, {}, "field statusCode: bad value", wait=result_backoff(1),
        why="refused by the server (HTTP 422)", counts=(1, 1, 0)),
    Row("400-second", 400, {}, '{"error": "bad"}', attempts=1, refusals=1,
        wait=result_backoff(2), why="refused by the server (HTTP 400)", counts=(2, 2, 0)),
    Row("422-backoff-counts-refusals", 422, attempts=7, wait=result_backoff(1),
        why="refused by the server (HTTP 422)", counts=(8, 1, 0)),
    Row("422-third-quarantined", 422, {}, "field statusCode: bad value", attempts=2, refusals=2,
        wait=0.0, why="the AC server refused the result 3 times "
        "(HTTP 422: field statusCode: bad value)",
        quarantine="HTTP 422: field statusCode: bad value", reroute="error",
        answer=("HTTP 422", "field statusCode: bad value"), failure="refused", counts=(3, 0, 0)),
    Row("400-third-quarantined", 400, {}, "no", attempts=5, refusals=2, wait=0.0,
        why="the AC server refused the result 3 times (HTTP 400: no)", quarantine="HTTP 400: no",
        reroute="error", answer=("HTTP 400", "no"), failure="refused", counts=(6, 0, 0)),
    Row("422-reason-cut-to-300", 422, {}, "x" * 1000, refusals=2, wait=0.0,
        why=f"the AC server refused the result 3 times (HTTP 422: {'x' * 300})",
        quarantine=f"HTTP 422: {'x' * 300}", reroute="error", answer=("x" * 300,),
        failure="refused", counts=(1, 0, 0)),
    Row("422-error-result-only-quarantined", 422, {}, "bad", route="error", error_result=True,
        attempts=2, refusals=2, wait=None,
        why="the AC server refused the result 3 times (HTTP 422: bad)",
        quarantine="HTTP 422: bad", counts=(3, 3, 0)),
    Row("422-upload-result", 422, {}, "bad", route="upload", wait=result_backoff(1),
        why="refused by the server (HTTP 422)", counts=(1, 1, 0)),
    Row("400-s3", 400, route="s3", wait=result_backoff(1),
        why="refused by the server (HTTP 400)", counts=(1, 1, 1)),
    # ---- 5xx, 407, 408, other statuses: this result's backoff, a breaker failure
    Row("500", 500, {}, "boom", wait=result_backoff(1), why=_ac(500, "boom"), breaker=True,
        counts=(1, 0, 0)),
    Row("502", 502, {}, "bad gateway", wait=result_backoff(1), why=_ac(502, "bad gateway"),
        breaker=True, counts=(1, 0, 0)),
    Row("503-retry-after-ignored", 503, {"Retry-After": "1"}, wait=result_backoff(1),
        why=_ac(503, ""), breaker=True, counts=(1, 0, 0)),
    Row("504-second", 504, attempts=1, wait=result_backoff(2), why=_ac(504, ""), breaker=True,
        counts=(2, 0, 0)),
    Row("500-fourth", 500, attempts=3, wait=result_backoff(4), why=_ac(500, ""), breaker=True,
        counts=(4, 0, 0)),
    Row("500-capped", 500, attempts=7, wait=result_backoff(8), why=_ac(500, ""), breaker=True,
        counts=(8, 0, 0)),
    Row("407", 407, wait=result_backoff(1), why=_ac(407, ""), breaker=True, counts=(1, 0, 0)),
    Row("408", 408, wait=result_backoff(1), why=_ac(408, ""), breaker=True, counts=(1, 0, 0)),
    Row("404", 404, wait=result_backoff(1), why=_ac(404, ""), breaker=True, counts=(1, 0, 0)),
    Row("302-not-followed", 302, {"Location": "http://elsewhere.test/"},
        wait=result_backoff(1), why=_ac(302, ""), breaker=True, counts=(1, 0, 0)),
    Row("500-error-result", 500, route="error", error_result=True, wait=result_backoff(1),
        why=_ac(500, ""), breaker=True, counts=(1, 0, 0)),
    Row("500-upload-result", 500, route="upload", wait=result_backoff(1),
        why="upload-result: HTTP 500", breaker=True, counts=(1, 0, 0)),
    # ---- S3: a refused URL, or the 3rd failed S3 attempt: upload-result from then on
    Row("503-s3-first", 503, route="s3", wait=result_backoff(1),
        why=f"s3: HTTP 503: {S3_REFUSED}", breaker=True, counts=(1, 0, 1)),
    Row("503-s3-second", 503, route="s3", attempts=1, s3=1, wait=result_backoff(2),
        why=f"s3: HTTP 503: {S3_REFUSED}", breaker=True, counts=(2, 0, 2)),
    Row("503-s3-third", 503, route="s3", attempts=2, s3=2, wait=result_backoff(3),
        why=f"s3: HTTP 503: {S3_REFUSED}", breaker=True, reroute="upload",
        reroute_why=f"S3 upload failed (s3: HTTP 503: {S3_REFUSED})", counts=(3, 0, 3)),
    Row("500-after-s3-gave-up", 500, route="upload", attempts=3, s3=3, wait=result_backoff(4),
        why="upload-result: HTTP 500", breaker=True, counts=(4, 0, 3)),
    Row("s3-url-refused", exc=UploadURLRefused("upload-url: http://10.0.0.1/ refused"),
        route="s3", wait=result_backoff(1), why="upload-url: http://10.0.0.1/ refused",
        breaker=True, reroute="upload",
        reroute_why="S3 upload failed (upload-url: http://10.0.0.1/ refused)", counts=(1, 0, 1)),
    Row("s3-connection-reset", exc=ACConnectionError("s3: connection reset"), route="s3",
        attempts=1, s3=1, wait=result_backoff(2), why="s3: connection reset", breaker=True,
        counts=(2, 0, 2)),
    # ---- no reply: retried like a 5xx
    Row("connection-error", exc=ACConnectionError("put-result: connection refused"),
        wait=result_backoff(1), why="put-result: connection refused", breaker=True,
        counts=(1, 0, 0)),
    Row("read-timeout", exc=ACConnectionError("upload-result: read timed out"),
        route="upload", attempts=2, wait=result_backoff(3), why="upload-result: read timed out",
        breaker=True, counts=(3, 0, 0)),
    Row("bad-reply", exc=BadReplyError("put-result: reply is not JSON"),
        wait=result_backoff(1), why="put-result: reply is not JSON", breaker=True,
        counts=(1, 0, 0)),
    # ---- an exception no rule expects: kept and retried, the class is not blamed
    Row("unexpected", exc=RuntimeError("bug"), wait=result_backoff(1), why="RuntimeError",
        counts=(1, 0, 0)),
    Row("unexpected-disk-error", exc=OSError(errno.EACCES, "Permission denied"),
        route="upload", wait=result_backoff(1), why="PermissionError", counts=(1, 0, 0)),
    Row("unexpected-on-s3-third", exc=RuntimeError("bug"), route="s3", attempts=2, s3=2,
        wait=result_backoff(3), why="RuntimeError", reroute="upload",
        reroute_why="S3 upload failed (RuntimeError)", counts=(3, 0, 3)),
    # ---- the agent stops mid-attempt: due at once, nothing counted
    Row("stopping", exc=AgentStopping("stopped"), attempts=2, wait=0.0, counts=(2, 0, 0)),
    Row("stopping-on-s3", exc=AgentStopping("stopped"), route="s3", s3=2, wait=0.0,
        counts=(0, 0, 2)),
    # ---- a body in the spool that is not the one saved: quarantined, answered instead
    Row("damaged-body", exc=BodyMismatch("10 bytes, the record says 20"), wait=0.0,
        why="the result's body in the spool is damaged (10 bytes, the record says 20)",
        quarantine="damaged body: 10 bytes, the record says 20", reroute="error",
        answer=("damaged", "10 bytes, the record says 20"), failure="damaged", counts=(0, 0, 0)),
    Row("damaged-after-refusals", exc=BodyMismatch("sha256 differs"), route="upload",
        attempts=2, refusals=1, wait=0.0,
        why="the result's body in the spool is damaged (sha256 differs)",
        quarantine="damaged body: sha256 differs", reroute="error", answer=("sha256 differs",),
        failure="damaged", counts=(2, 0, 0)),
    Row("linked-body", exc=OSError(errno.ELOOP, "Too many levels of symbolic links"), wait=0.0,
        why=f"the result's body in the spool is damaged ({LINKED_BODY})",
        quarantine=f"damaged body: {LINKED_BODY}", reroute="error", answer=(LINKED_BODY,),
        failure="damaged", counts=(0, 0, 0)),
]
# fmt: on


def _policy(seed: int = 7) -> RetryPolicy:
    return RetryPolicy(rng=random.Random(seed))


def _decide(row: Row, policy: RetryPolicy) -> Decision:
    outcome = Outcome.of(row.raised())
    return decide(row.delivery(), outcome, policy, key_hint=KEY_HINT, busy_hint=CONCURRENCY_HINT)


def _within(value: Optional[float], expected: Optional[Wait]) -> bool:
    if value is None or expected is None:
        return value is expected
    if isinstance(expected, tuple):
        return expected[0] <= value <= expected[1]
    return value == expected


def test_the_table_is_big_enough_and_its_ids_unique() -> None:
    assert len(ROWS) >= 60
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_decide(row: Row) -> None:
    d = _decide(row, _policy())
    assert _within(d.retry_in, row.wait), (d.retry_in, row.wait)
    assert d.why == row.why
    assert _within(d.pause, row.pause), (d.pause, row.pause)
    assert d.breaker_failure is row.breaker
    assert d.hold == (HELD.format(row.status) if row.hold else None)
    assert d.delivered is row.delivered
    assert d.release is row.delivered  # the first accepted delivery releases a key hold
    assert (d.reroute, d.reroute_why) == (row.reroute, row.reroute_why)
    assert d.quarantine == (row.quarantine or None)
    if row.answer:
        assert d.answer is not None and d.failure == row.failure
        for text in row.answer:
            assert text in d.answer
    else:
        assert d.answer is None and d.failure == ""
    assert (d.attempts, d.refusals, d.s3_failures) == row.counts


def test_a_real_result_is_never_replaced_for_a_status_that_may_pass() -> None:
    """SPEC invariant 6: 401, 403, 407, 408, 413, 429, 5xx and network errors
    never quarantine a result nor answer it with an error result, whatever
    the route and however many times they came."""
    passing = {401, 403, 407, 408, 413, 429, 500, 502, 503, 504}
    rows = [r for r in ROWS if r.status in passing or isinstance(r.exc, ACConnectionError)]
    assert len(rows) >= 40
    for row in rows:
        for attempts in (0, 3, 50):
            d = _decide(dataclasses.replace(row, attempts=attempts), _policy())
            assert d.retry_in is not None, row.id
            assert d.quarantine is None and d.answer is None, row.id
            assert d.reroute in (None, "upload"), row.id


def test_waits_come_from_the_policy_rng_alone() -> None:
    """The same seed gives the same decisions; the schedules are the policy's own."""
    first = [_decide(row, _policy(11)) for row in ROWS if "http-date" not in row.id]
    again = [_decide(row, _policy(11)) for row in ROWS if "http-date" not in row.id]
    assert first == again
    fast = dataclasses.replace(_policy(), concurrency_wait_max=0.05)
    concurrent = next(row for row in ROWS if row.id == "429-concurrent")
    assert _within(_decide(concurrent, fast).retry_in, (0.0, 0.05))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (None, Kind.DELIVERED),
        (AgentStopping("x"), Kind.STOPPING),
        (BodyMismatch("x"), Kind.DAMAGED),
        (OSError(errno.ELOOP, "loop"), Kind.LINKED),
        (OSError(errno.ENOSPC, "full"), Kind.UNEXPECTED),
        (UploadURLRefused("x"), Kind.URL_REFUSED),
        (BadReplyError("x"), Kind.AC_ERROR),
        (ValueError("x"), Kind.UNEXPECTED),
    ],
)
def test_outcome_of_an_exception(exc: Optional[BaseException], kind: Kind) -> None:
    assert Outcome.of(exc).kind is kind


# --------------------------------------------------------------------------
# The route: worked out once, changed only by a decision
# --------------------------------------------------------------------------

FIELDS = {"taskId": "r", "method": "GET", "url": "http://tool.test/"}

# fmt: off
ROUTES = [
    ("logs", Result(FIELDS, 200, logs_zip="/spool/logs.zip"), True, "logs"),
    ("error", Result.agent_error(FIELDS, "timed out"), True, "error"),
    ("kept-in-record", Result(FIELDS, 200, body_size=3, body_base64="YWJj"), False, "inline"),
    ("empty", Result(FIELDS, 204), True, "empty"),
    ("empty-file", Result(FIELDS, 200, body_path="/spool/b", body_size=0), False, "empty"),
    ("one-byte", Result(FIELDS, 200, body_path="/spool/b", body_size=1), False, "inline"),
    ("inline-limit", Result(FIELDS, 200, body_path="/spool/b", body_size=512_000), False,
     "inline"),
    ("above-limit-ac", Result(FIELDS, 200, body_path="/spool/b", body_size=512_001), True,
     "upload"),
    ("above-limit-s3", Result(FIELDS, 200, body_path="/spool/b", body_size=512_001), False,
     "s3"),
]
# fmt: on


@pytest.mark.parametrize(
    ("result", "upload_to_ac", "route"),
    [row[1:] for row in ROUTES],
    ids=[row[0] for row in ROUTES],
)
def test_route_of(result: Result, upload_to_ac: bool, route: str) -> None:
    assert route_of(result, upload_to_ac) == route
    assert Delivery(result, counted=True).small is (route in ("inline", "empty", "error"))


def test_the_route_is_set_once_and_changed_only_by_a_decision() -> None:
    big = Result(FIELDS, 200, body_path="/spool/b", body_size=600_000)
    delivery = Delivery(big, counted=True)
    assert delivery.route is None
    assert delivery.settle_route(upload_to_ac=False) == "s3"
    assert delivery.settle_route(upload_to_ac=True) == "s3"  # uploadToAc changed since: kept
    delivery.apply(Decision(0.0, reroute="upload", attempts=1, s3_failures=1))
    assert (delivery.route, delivery.attempts, delivery.s3_failures) == ("upload", 1, 1)
    assert not delivery.small  # a large body never borrows a permit


def test_an_answer_instead_replaces_the_result_under_its_key() -> None:
    result = Result(FIELDS, 200, body_path="/spool/b", body_size=10)
    delivery = Delivery(result, counted=True, attempts=3, refusals=3, route="inline")
    outcome = Outcome(Kind.CONTENT_REFUSED, 422, detail="nope")
    delivery.refusals = 2
    d = decide(delivery, outcome, _policy(), key_hint=KEY_HINT, busy_hint=CONCURRENCY_HINT)
    delivery.apply(d)
    assert delivery.result.is_error and delivery.result.failure == "refused"
    assert delivery.result.key == result.key  # it replaces the original's record
    assert "nope" in str(delivery.result.error)
    assert (delivery.route, delivery.refusals, delivery.durable) == ("error", 0, False)
    assert delivery.small  # an error result is one short put-result


# --------------------------------------------------------------------------
# Borrowing get-task's permit: only once one upload holds every lane
# --------------------------------------------------------------------------

# fmt: off
LANES = [
    # id, attempts started at (monotonic), lanes, now -> seconds until held (held = 1.0)
    ("idle", [], 1, 100.0, 1.0),
    ("one-of-two-lanes-busy", [50.0], 2, 100.0, 1.0),
    ("just-started", [100.0], 1, 100.0, 1.0),
    ("half-way", [99.4], 1, 100.0, 0.4),
    ("exactly-held", [99.0], 1, 100.0, 0.0),
    ("held-20s", [80.0], 1, 100.0, 0.0),
    ("newest-decides", [80.0, 99.5], 2, 100.0, 0.5),
    ("every-lane-held", [80.0, 98.0], 2, 100.0, 0.0),
]
# fmt: on


@pytest.mark.parametrize(
    ("started", "lanes", "now", "held_in"),
    [row[1:] for row in LANES],
    ids=[row[0] for row in LANES],
)
def test_lanes_held_in(started: List[float], lanes: int, now: float, held_in: float) -> None:
    assert lanes_held_in(started, lanes, 1.0, now) == pytest.approx(held_in)
