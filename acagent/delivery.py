"""Delivery: one result on its way to the AC server, and the rules that decide its fate.

A ``Delivery`` is all the state of one result's delivery: its attempts, its
refusals, its S3 failures, and its **route** (how it goes: ``inline``,
``empty``, ``upload``, ``s3``, ``error``, ``logs``). The route is worked out
once, at the first attempt, from the result and ``uploadToAc``
(``route_of``), and changed only by a decision ("413 -> upload-result").

``decide(delivery, outcome, policy, ...)`` is the one place the delivery
rules live (SPEC invariants 5 and 6). It is pure: what one attempt gave
(an ``Outcome``, classified from the exception by ``Outcome.of``) and the
delivery's state in, a ``Decision`` out; randomness only through the
policy's ``rng``. The Uploader sends and applies decisions, nothing else.

The rules (docs/protocol.md statuses). A real result is never replaced by an
error result nor dropped for a status that may be transient or that an
operator can fix (401, 403, 407, 408, 413, 429, 5xx, network errors):

* 5xx, 407, 408, timeouts, resets, bad replies: retried on the policy's
  ``result`` backoff, per result; each counts a failure for the upload
  class's breaker.
* 429: with a wait header the class pauses that long and the result is due
  again then; "Too many concurrent requests" without one waits
  ``RetryPolicy.concurrency_pause`` (0..10 s, or a short jitter when the
  effective AC limit was lowered for it); a bare 429 waits the ``result``
  backoff.
* 401/403: the server refused the API key: fetching is held (no new work that
  cannot be delivered) and the result is retried on ``result_key_refused``;
  the first accepted delivery releases the hold.
* 413 on an inline put-result: the same result goes through upload-result,
  at once.
* S3: a presigned URL the upload policy refuses, or ``S3_ATTEMPTS`` failed S3
  attempts: the result goes through upload-result from then on.
* 400/422 (the server refuses the content): ``REFUSALS_BEFORE_QUARANTINE``
  attempts, then the original goes to quarantine and the task is answered
  with an error result quoting the server's reason (an error result refused
  so is only quarantined: there is nothing better to send).
* A body in the spool that is not the one saved, or is a symbolic link: the
  original goes to quarantine, the task is answered with an error result.
* The agent stopping mid-attempt: the result stays, due at once (it is sent
  after a restart if not before).

``lanes_held_in`` says when small results may borrow get-task's permit: only
once one upload has held every sender's lane for ``held`` seconds.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import time
from dataclasses import dataclass, field
from typing import Collection, FrozenSet, Literal, Optional

from .ac.retry import RetryPolicy
from .config import INLINE_BODY_LIMIT
from .errors import ACError, ACHTTPError, ACRateLimitError, AgentStopping, UploadURLRefused
from .models import Result

Route = Literal["inline", "empty", "upload", "s3", "error", "logs"]

#: routes of one short put-result: these may go out on get-task's permit
SMALL_ROUTES: FrozenSet[str] = frozenset({"inline", "empty", "error"})
#: failed S3 attempts of one result before it goes through upload-result instead
S3_ATTEMPTS = 3
#: 400/422 refusals of one result before it is quarantined
REFUSALS_BEFORE_QUARANTINE = 3
#: statuses that mean "the server will not take this content as it is"
CONTENT_REFUSED = frozenset({400, 422})
#: the answer for a result whose body file is a symbolic link, whatever it points to
LINKED_BODY = "the body file is a symbolic link, not a file the agent wrote"


class BodyMismatch(Exception):
    """The body file of a result is not the one saved (``ResultSpool.check_body``)."""


def lanes_held_in(started: Collection[float], lanes: int, held: float, now: float) -> float:
    """Seconds until each of ``lanes`` carries an attempt that began ``held``
    seconds ago or more (0: held now), given when the attempts on them began
    (``started``). ``held`` while a lane is free: an attempt that starts on it
    is held that long later at the earliest."""
    if len(started) < lanes:
        return held
    return max(0.0, max(started) + held - now)


def route_of(result: Result, upload_to_ac: bool) -> Route:
    """How ``result`` goes to the server, before any decision changed it."""
    if result.logs_zip is not None:
        return "logs"
    if result.is_error:
        return "error"
    if result.body_base64 is not None:  # a small body kept in the record
        return "inline"
    if result.body_size == 0 or result.body_path is None:
        return "empty"
    if result.body_size <= INLINE_BODY_LIMIT:
        return "inline"
    return "upload" if upload_to_ac else "s3"


@dataclass
class Delivery:
    """One result on its way to the AC server, with its own retry state."""

    result: Result
    #: counted by backpressure (fetched in this run): release the count when done
    counted: bool
    #: failed attempts so far (reset never: it only grows until success)
    attempts: int = 0
    #: attempts that failed because the server refused the content (400/422)
    refusals: int = 0
    #: failed attempts on the S3 route
    s3_failures: int = 0
    #: how it goes; None until the first attempt (``settle_route``)
    route: Optional[Route] = None
    #: when the first attempt started (monotonic), for the delivery duration
    started: float = field(default_factory=time.monotonic)
    #: the record is on disk (False while the spool cannot be written)
    durable: bool = True
    #: the last attempt drew "Too many concurrent requests": the next one that
    #: goes through is pressure on the AC limit, not room (``ac/adaptive.py``)
    overloaded: bool = False

    def settle_route(self, upload_to_ac: bool) -> Route:
        """The route, set now if this is the first attempt."""
        if self.route is None:
            self.route = route_of(self.result, upload_to_ac)
        return self.route

    @property
    def small(self) -> bool:
        """One short put-result (inline, empty or an error result): may borrow a permit.
        (``uploadToAc`` only chooses between two large routes.)"""
        return (self.route or route_of(self.result, True)) in SMALL_ROUTES

    def apply(self, decision: Decision) -> None:
        """Take the counts, the route and any answer ``decision`` gives this delivery."""
        self.attempts = decision.attempts
        self.refusals = decision.refusals
        self.s3_failures = decision.s3_failures
        self.overloaded = decision.overloaded
        if decision.reroute is not None:
            self.route = decision.reroute
        if decision.answer is not None:
            self.result = Result.agent_error(
                self.result.fields, decision.answer, failure=decision.failure, key=self.result.key
            )
            # The original record went to quarantine: the answer is not on disk
            # yet, so the Ledger saves it before it is queued again.
            self.durable = False


class Kind(enum.Enum):
    """What one delivery attempt gave."""

    DELIVERED = "delivered"
    #: 429; with or without a server wait (``Outcome.server_wait``)
    RATE_LIMITED = "rate limited"
    #: 429 "Too many concurrent requests"
    CONCURRENCY = "too many concurrent requests"
    #: 401/403: the API key was refused
    KEY_REFUSED = "key refused"
    #: 413
    TOO_LARGE = "too large"
    #: 400/422: the content was refused
    CONTENT_REFUSED = "content refused"
    #: any other AC failure: 5xx, 407, 408, timeouts, resets, bad replies
    AC_ERROR = "AC error"
    #: the presigned S3 URL is refused by the upload policy
    URL_REFUSED = "S3 URL refused"
    #: an exception no rule expects (a bug, a disk error while preparing)
    UNEXPECTED = "unexpected"
    #: the agent is stopping
    STOPPING = "stopping"
    #: the body file is not the one saved
    DAMAGED = "damaged body"
    #: the body file is a symbolic link
    LINKED = "linked body file"


@dataclass(frozen=True)
class Outcome:
    """What one attempt gave. ``detail``: the failure's text (the exception's;
    for a refusal the server's reply, first 300 characters; for an unexpected
    exception its type name)."""

    kind: Kind
    status: Optional[int] = None
    server_wait: Optional[float] = None
    detail: str = ""
    #: a concurrency 429 the effective AC limit was lowered for
    limit_lowered: bool = False

    @classmethod
    def of(cls, exc: Optional[BaseException]) -> Outcome:
        """Classify an attempt by what it raised (None: it went through)."""
        if exc is None:
            return cls(Kind.DELIVERED)
        if isinstance(exc, AgentStopping):
            return cls(Kind.STOPPING, detail=str(exc))
        if isinstance(exc, BodyMismatch):
            return cls(Kind.DAMAGED, detail=str(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            # A file of the result's in the spool is a symbolic link (the
            # agent never makes one): planted, never followed nor sent.
            return cls(Kind.LINKED, detail=LINKED_BODY)
        if isinstance(exc, ACRateLimitError):
            kind = Kind.CONCURRENCY if exc.concurrency else Kind.RATE_LIMITED
            return cls(kind, 429, exc.retry_after, str(exc), exc.limit_lowered)
        if isinstance(exc, ACHTTPError):
            if exc.status in (401, 403):
                return cls(Kind.KEY_REFUSED, exc.status, detail=str(exc))
            if exc.status == 413:
                return cls(Kind.TOO_LARGE, 413, detail=str(exc))
            if exc.status in CONTENT_REFUSED:
                return cls(Kind.CONTENT_REFUSED, exc.status, detail=exc.body[:300])
            return cls(Kind.AC_ERROR, exc.status, detail=str(exc))
        if isinstance(exc, UploadURLRefused):
            return cls(Kind.URL_REFUSED, detail=str(exc))
        if isinstance(exc, ACError):
            return cls(Kind.AC_ERROR, detail=str(exc))
        return cls(Kind.UNEXPECTED, detail=type(exc).__name__)


@dataclass(frozen=True)
class Decision:
    """What to do after one attempt; ``Delivery.apply`` takes the counts and route."""

    #: seconds until the next attempt; None: delivery is done with this result
    retry_in: Optional[float]
    #: why it is retried (the log line's and ``on_result_retry``'s reason; "" for a
    #: silent retry), or why it is quarantined
    why: str = ""
    #: the server accepted the result
    delivered: bool = False
    #: the whole upload class waits this long (a 429's wait header)
    pause: float = 0.0
    #: one more failure in a row for the upload class's breaker
    breaker_failure: bool = False
    #: fetching is held with this message (the API key was refused)
    hold: Optional[str] = None
    #: the hold set for a refused key is released
    release: bool = False
    #: the route of the next attempts, and why
    reroute: Optional[Route] = None
    reroute_why: str = ""
    #: the original goes to quarantine with this reason
    quarantine: Optional[str] = None
    #: the task is answered instead with an error result saying this, failure ``failure``
    answer: Optional[str] = None
    failure: str = ""
    #: the delivery's counts after this attempt
    attempts: int = 0
    refusals: int = 0
    s3_failures: int = 0
    #: this attempt drew "Too many concurrent requests" (``Delivery.overloaded``)
    overloaded: bool = False


def decide(
    delivery: Delivery,
    outcome: Outcome,
    policy: RetryPolicy,
    *,
    key_hint: str,
    busy_hint: str,
) -> Decision:
    """The decision after one attempt of ``delivery`` (see the module docstring).

    ``key_hint``: what to do about a refused API key (the hold's message);
    ``busy_hint``: the reason given for "Too many concurrent requests".
    """
    kind, route = outcome.kind, delivery.route
    if kind is Kind.DELIVERED:  # the common case, kept cheap: no replace()
        return Decision(
            None,
            delivered=True,
            release=True,
            attempts=delivery.attempts,
            refusals=delivery.refusals,
            s3_failures=delivery.s3_failures,
        )
    failed = kind not in (Kind.STOPPING, Kind.DAMAGED, Kind.LINKED)
    attempts = delivery.attempts + int(failed)
    refusals = delivery.refusals + int(kind is Kind.CONTENT_REFUSED)
    s3_failures = delivery.s3_failures + int(failed and route == "s3")
    if kind is Kind.TOO_LARGE and route == "inline":  # at once, through upload-result
        decision = Decision(
            0.0, reroute="upload", reroute_why="put-result too large for the server (413)"
        )
    else:
        decision = _rule(delivery.result, outcome, policy, attempts, refusals, key_hint, busy_hint)
    if decision.answer is not None:  # the error result sent instead starts afresh
        decision, refusals = dataclasses.replace(decision, reroute="error"), 0
    elif route == "s3" and failed and (kind is Kind.URL_REFUSED or s3_failures >= S3_ATTEMPTS):
        why = f"S3 upload failed ({outcome.detail})"
        decision = dataclasses.replace(decision, reroute="upload", reroute_why=why)
    return dataclasses.replace(
        decision,
        attempts=attempts,
        refusals=refusals,
        s3_failures=s3_failures,
        overloaded=kind is Kind.CONCURRENCY,
    )


def _rule(
    result: Result,
    outcome: Outcome,
    policy: RetryPolicy,
    attempts: int,
    refusals: int,
    key_hint: str,
    busy_hint: str,
) -> Decision:
    """``decide`` less the counts and reroutes: what the outcome asks for."""
    kind = outcome.kind
    if kind is Kind.STOPPING:
        return Decision(0.0)  # stays in the spool; sent after a restart if not before
    if kind in (Kind.DAMAGED, Kind.LINKED):
        return Decision(
            0.0,
            why=f"the result's body in the spool is damaged ({outcome.detail})",
            quarantine=f"damaged body: {outcome.detail}",
            answer=f"the result's body was damaged in the agent's spool ({outcome.detail})",
            failure="damaged",
        )
    if kind in (Kind.RATE_LIMITED, Kind.CONCURRENCY):
        why = busy_hint if kind is Kind.CONCURRENCY else "rate limited (429)"
        if outcome.server_wait is not None:  # the server said how long: the class waits
            return Decision(outcome.server_wait, why=why, pause=outcome.server_wait)
        if kind is Kind.CONCURRENCY:
            return Decision(policy.concurrency_pause(outcome.limit_lowered), why=why)
        return Decision(policy.result.wait(attempts, policy.rng), why=why)
    if kind is Kind.KEY_REFUSED:
        return Decision(
            policy.result_key_refused.wait(attempts, policy.rng),
            why=f"HTTP {outcome.status}",
            hold=f"{key_hint} (HTTP {outcome.status} on upload)",
        )
    if kind is Kind.CONTENT_REFUSED:
        if refusals < REFUSALS_BEFORE_QUARANTINE:
            why = f"refused by the server (HTTP {outcome.status})"
            return Decision(policy.result.wait(refusals, policy.rng), why=why)
        said = f"HTTP {outcome.status}: {outcome.detail}"
        why = f"the AC server refused the result {refusals} times ({said})"
        if result.is_error:  # nothing better to send: the refused one was an answer already
            return Decision(None, why=why, quarantine=said)
        answer = f"the AC server refused the result (HTTP {outcome.status}): {outcome.detail}"
        return Decision(0.0, why=why, quarantine=said, answer=answer, failure="refused")
    wait = policy.result.wait(attempts, policy.rng)
    # 5xx, 407, 408, a 413 not inline, timeouts, resets, bad replies: the class
    # breaker hears of it; an unexpected exception is this result's alone
    return Decision(wait, why=outcome.detail, breaker_failure=kind is not Kind.UNEXPECTED)
