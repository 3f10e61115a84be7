"""Retry and backoff policies for AC calls, and Retry-After parsing.

``RetryPolicy`` is a small value object (after urllib3's ``Retry``): named
predicates say whether an error is retried (``is_retry``) and whether the
budget is spent (``is_exhausted``); ``wait_for`` derives the pause from the
error itself, tenacity ``wait_exception``-style: ``rate_limit_wait`` for a
429 (the server's own wait, else for "Too many concurrent requests" a random
0..10 s, or 0..0.1 s when the effective AC limit was lowered for it, else
``default_rate_limit_wait``), and the ``call`` backoff for
5xx and connection failures. Every other schedule of the agent is a
``Backoff`` field of the same policy (``backoff.py``).

``run_with_retries`` drives one call through tenacity. The attempt function
takes the AC permit itself, so no permit is held while sleeping, and every
sleep ends at once when the agent is stopping.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TypeVar

import tenacity

from ..errors import ACConnectionError, ACHTTPError, ACRateLimitError, AgentStopping
from .backoff import (
    CONCURRENCY_WAIT_MAX,
    LOWERED_CONCURRENCY_WAIT_MAX,
    Backoff,
    concurrency_wait,
)

T = TypeVar("T")

#: longest wait the agent accepts from a server, whatever it asks for
MAX_SERVER_WAIT = 300.0

#: reconnecting to the coordination store (Redis): the default of ``RetryPolicy.store_reconnect``
#: and of the Redis permits and rate limiter built without a policy
STORE_RECONNECT = Backoff(0.1, 1.0)


def parse_retry_after(value: Optional[str], *, now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a ``Retry-After``-style value, clamped to 0..300.

    Accepts delta-seconds (``"7"``, ``"2.5"``) and an HTTP date. Returns None
    for anything unparseable so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        current = time.time() if now is None else now
        seconds = when.timestamp() - current
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_SERVER_WAIT)


def server_wait(headers: Mapping[str, str]) -> Optional[float]:
    """The wait a 429 reply asks for: the AC header first, then ``Retry-After``."""
    for name in ("X-Rate-Limit-Retry-After-Seconds", "Retry-After"):
        wait = parse_retry_after(headers.get(name))
        if wait is not None:
            return wait
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Every retry and backoff schedule of the agent, one value.

    First one AC call's own retries (``run_with_retries``; not get-task, whose
    loop is the Fetcher's), then the stages' schedules, then Redis reconnects.
    The 429 waits (``rate_limit_wait``) serve the calls and the stages alike.
    The defaults are today's agent's numbers (docs/protocol.md), the floor.
    """

    #: 429 replies retried per call
    rate_limit_retries: int = 5
    #: 5xx replies and connection failures retried per call
    error_retries: int = 3
    #: one call's retries after 5xx/connection errors: 5 s doubling to 120 s, + 0..2 s
    call: Backoff = Backoff(5.0, 120.0, jitter=2.0)
    #: "Too many concurrent requests" waits uniformly in 0..this
    concurrency_wait_max: float = CONCURRENCY_WAIT_MAX
    #: ... and uniformly in 0..this when the effective AC limit was lowered for it
    lowered_concurrency_wait_max: float = LOWERED_CONCURRENCY_WAIT_MAX
    #: a 429 without a usable wait header waits this long
    default_rate_limit_wait: float = 5.0

    # The stages' schedules (a ``Pipeline(retry_policy=...)`` sets them all).
    #: one result's retries after a transient failure (5xx, 407, 408, timeouts)
    result: Backoff = Backoff(0.5, 60.0, 0.5)
    #: one result's retries while the server refuses the API key (401/403)
    result_key_refused: Backoff = Backoff(2.0, 60.0, 0.2)
    #: failures in a row that open a breaker (the fetch loop's, the upload class's)
    breaker_threshold: int = 5
    #: get-task after one failed call, below the threshold
    fetch: Backoff = Backoff(0.25, 4.0, 0.5)
    #: get-task once its breaker is open ("the server is down")
    fetch_breaker: Backoff = Backoff(5.0, 600.0, 0.2)
    #: the whole upload class once its breaker is open
    upload_breaker: Backoff = Backoff(5.0, 300.0)
    #: get-task while the server refuses the API key
    fetch_key_refused: Backoff = Backoff(5.0, 300.0)
    #: a stage loop after an unexpected error in one step
    stage_failure: Backoff = Backoff(1.0, 30.0)
    #: reconnecting to the coordination store (Redis)
    store_reconnect: Backoff = STORE_RECONNECT
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def is_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, ACRateLimitError):
            return True
        if isinstance(exc, ACHTTPError):
            return exc.status >= 500
        return isinstance(exc, ACConnectionError)

    @property
    def is_single_attempt(self) -> bool:
        """No retry of any kind: the first failure is the answer."""
        return self.rate_limit_retries <= 0 and self.error_retries <= 0

    def is_exhausted(self, rate_limited: int, errors: int) -> bool:
        return rate_limited > self.rate_limit_retries or errors > self.error_retries

    def wait_for(self, exc: BaseException, errors_so_far: int) -> float:
        """Seconds to pause after ``exc``; ``errors_so_far`` counts 5xx/connection failures."""
        if isinstance(exc, ACRateLimitError):
            return self.rate_limit_wait(exc)
        return self.call.wait(errors_so_far, self.rng)

    def rate_limit_wait(self, exc: ACRateLimitError) -> float:
        """The wait after a 429: the server's (parsed and clamped by ``server_wait``),
        else ``concurrency_pause`` for "Too many concurrent requests", else
        ``default_rate_limit_wait``."""
        if exc.retry_after is not None:
            return exc.retry_after
        if exc.concurrency:
            return self.concurrency_pause(exc.limit_lowered)
        return self.default_rate_limit_wait

    def concurrency_pause(self, limit_lowered: bool) -> float:
        """The wait after "Too many concurrent requests" without a wait header:
        0..``concurrency_wait_max``, or 0..``lowered_concurrency_wait_max`` when
        the effective AC limit was lowered for it (the permits hold the calls
        to the new limit; the jitter keeps agents apart)."""
        cap = self.lowered_concurrency_wait_max if limit_lowered else self.concurrency_wait_max
        return concurrency_wait(self.rng, cap)


#: one attempt and no retry: for callers that schedule their own retries (the Uploader)
ONE_ATTEMPT = RetryPolicy(rate_limit_retries=0, error_retries=0)


class _Budget:
    """Counts one call's failures by kind; fed by tenacity's stop and wait hooks.

    Each failed attempt is counted once, by whichever hook tenacity runs
    first (tenacity 9 computes the wait before checking stop; 8.x did the
    reverse), so the backoff sees this failure included: 1, 2, 4 x base.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.rate_limited = 0
        self.errors = 0
        self._counted_attempt = 0

    def _count(self, state: tenacity.RetryCallState) -> Optional[BaseException]:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is not None and state.attempt_number != self._counted_attempt:
            self._counted_attempt = state.attempt_number
            if isinstance(exc, ACRateLimitError):
                self.rate_limited += 1
            else:
                self.errors += 1
        return exc

    def stop(self, state: tenacity.RetryCallState) -> bool:
        if self._count(state) is None:
            return True
        return self.policy.is_exhausted(self.rate_limited, self.errors)

    def wait(self, state: tenacity.RetryCallState) -> float:
        exc = self._count(state)
        assert exc is not None
        return self.policy.wait_for(exc, self.errors)


def interruptible_sleep(stop: Optional[threading.Event]) -> Callable[[float], None]:
    """A tenacity sleep that returns early, raising AgentStopping, once ``stop`` is set."""

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
            return
        if stop.wait(seconds):
            raise AgentStopping("stopped while waiting to retry")

    return sleep


def run_with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    *,
    stop: Optional[threading.Event] = None,
    on_retry: Optional[Callable[[BaseException, float], None]] = None,
) -> T:
    """Call ``attempt`` until it succeeds, the error is final, or the budget is spent.

    The last error is re-raised unchanged. ``on_retry(exc, wait)`` is told
    about every pause (for logging).
    """
    if policy.is_single_attempt:
        # The Uploader's calls: it schedules its own retries. Skipping
        # tenacity's machinery here saves ~0.1 ms on every upload, on the
        # thread that gates the AC link.
        return attempt()
    budget = _Budget(policy)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc, state.next_action.sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(policy.is_retry),
        stop=budget.stop,
        wait=budget.wait,
        sleep=interruptible_sleep(stop),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(attempt)
