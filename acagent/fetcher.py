"""Fetcher: the stage that asks the AC server for tasks.

It asks only when the agent has somewhere to run the answer and can deliver
its result (``Ledger.reserve``), so fetched work never piles up. How it waits
after each kind of reply (every schedule is a ``Backoff`` of the stage
policy, ``ctx.retry_policy``):

* an empty reply: the poll interval with jitter (today's agent re-polls at
  once and burns its rate budget);
* one failed call among successes (5xx, timeout, reset): a brief backoff,
  ``policy.fetch`` (0.25 s doubling to 4 s, with jitter);
* ``policy.breaker_threshold`` failures in a row: the server is down, so the
  fetch breaker (a ``ClassBreaker``) opens and waits follow
  ``policy.fetch_breaker`` (5 s doubling to 600 s, today's numbers); any
  success closes it;
* a 429: what the server asks (``RetryPolicy.rate_limit_wait``: a random
  0..10 s for "Too many concurrent requests" without a wait header, 0..0.1 s
  when the effective AC limit was lowered for it);
* 401/403: the server refused the API key: an actionable ERROR at most once a
  minute, ``/readyz`` says why (the readiness observer sees the status), and
  waits follow ``policy.fetch_key_refused`` (5 s doubling to 5 min) until it
  accepts.
  With a key file (``api_key_file``) the file is re-read every
  ``KEY_FILE_POLL`` seconds while the server refuses the key (on get-task or
  on upload); a new key ends the wait, lifts the uploads' hold and makes the
  results waiting for a retry due at once.

Every wait ends when the stage stops. Once a stop begins no new get-task is
sent (``ACClient.stop_fetching``, looked at right before each send); one the
server holds open (long poll) is left to end by itself, so a task it hands
out is run and answered. The Pipeline cuts it only at the shutdown deadline,
less ``shutdown_poll_reserve``, or on a second signal.

Hooks (may be overridden): ``fetch_one() -> Optional[Task]`` (take tasks from
elsewhere: see ``examples/jsonl_fetcher.py``), ``idle_wait() -> float``.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Optional

from .ac.adaptive import retrying_overload
from .ac.breaker import ClassBreaker
from .errors import (
    ACConnectionError,
    ACError,
    ACHTTPError,
    ACRateLimitError,
    AgentStopping,
    BadReplyError,
    TaskError,
)
from .hints import CONCURRENCY_HINT, auth_hint, hint_for
from .ledger import AUTH_HOLD
from .logs import error_fields
from .logthrottle import LogThrottle
from .models import Result, Task, echo_fields
from .spool import Origin
from .stage import Stage, StageContext

log = logging.getLogger("acagent.fetcher")


class Fetcher(Stage):
    """Gets tasks from the AC server, one get-task at a time, while the Ledger has room.

    May be overridden: ``fetch_one() -> Optional[Task]`` (where tasks come
    from; None = none now, then ``idle_wait()`` seconds pass) and
    ``idle_wait() -> float`` (the poll interval with jitter).

    Class variables that may be overridden: ``CAPACITY_POLL`` (one wait for a
    free slot before the stop flag is looked at again), ``KEY_FILE_POLL``
    (while the server refuses the key, seconds between two reads of
    ``--apiKeyFile``).

    May be extended, call ``super()``: ``__init__``, ``start_threads`` (the
    fetch loop) and ``on_stop`` (ends a get-task long poll at once).
    For subclasses: ``breaker`` (open while get-task fails in a row), and
    ``Stage``'s part (see ``acagent.stage``).
    """

    name = "fetcher"

    #: how long one capacity wait lasts before the stop flag is checked again
    CAPACITY_POLL = 0.5
    #: while the server refuses the key: seconds between two reads of the key file
    KEY_FILE_POLL = 1.0

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        policy = ctx.retry_policy
        #: open after ``breaker_threshold`` failed get-tasks in a row: "the server is down"
        self.breaker = ClassBreaker(threshold=policy.breaker_threshold, opened=policy.fetch_breaker)
        self._auth_failures = 0
        #: the last get-task drew "Too many concurrent requests" (``ac/adaptive.py``)
        self._overloaded = False
        self._rng = random.Random()
        self._auth_log = LogThrottle(60.0)
        self._key_seen = ctx.client.key_version
        self._next_key_read = 0.0

    # ------------------------------------------------------------ lifecycle
    def start_threads(self) -> None:
        self.spawn(lambda: self.run_loop(self.fetch_step), "acagent-fetcher")

    def on_stop(self) -> None:
        # No new get-task; one in flight ends by itself (the Pipeline may cut it).
        self.ctx.client.stop_fetching()

    # ------------------------------------------------------------ one step
    def fetch_step(self) -> None:
        """Reserve room, ask for one task, hand it to the Ledger; then wait as the reply says."""
        ledger = self.ctx.ledger
        self._check_key()
        if self.ctx.client.fetch_stop.is_set():
            self.wait(self.CAPACITY_POLL)  # a signal came: the stop itself follows
            return
        if not ledger.reserve(timeout=self.CAPACITY_POLL):
            return
        pause = 0.0
        reserved = True
        try:
            if self.stopping.is_set() or self.ctx.client.fetch_stop.is_set():
                return
            started = time.monotonic()
            try:
                with retrying_overload(self._overloaded):
                    task = self.fetch_one()
            except TaskError as exc:
                reserved = not self._answer_malformed(exc)
                return
            except Exception as exc:  # noqa: BLE001 - every failure has a wait, none is fatal
                self._overloaded = isinstance(exc, ACRateLimitError) and exc.concurrency
                pause = self._pause_after(exc)
                return
            self.ctx.observers.emit(
                "on_fetch_finished", time.monotonic() - started, task is not None
            )
            self._succeeded()
            if task is None:
                pause = self.idle_wait()
                return
            reserved = False
            ledger.fetched(task)
        finally:
            if reserved:
                ledger.cancel()
            if pause > 0:
                self._pause(pause)

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds``; while the key is refused, only until a new key comes."""
        if self.config.api_key_file is None:
            self.wait(seconds)
            return
        deadline = time.monotonic() + seconds
        while not self._check_key():
            left = deadline - time.monotonic()
            if left <= 0 or self.wait(min(left, self.KEY_FILE_POLL)):
                return

    def _check_key(self) -> bool:
        """While the server refuses the key, re-read the key file (at most every
        ``KEY_FILE_POLL`` s). True once the key changed since the last look (a
        SIGHUP may have changed it too): then new spool records name the new
        key, the uploads' hold is lifted and the results waiting for a retry
        are due, so all goes on with the new key."""
        client = self.ctx.client
        if client.key_refused and self.config.api_key_file is not None:
            now = time.monotonic()
            if now >= self._next_key_read:
                self._next_key_read = now + self.KEY_FILE_POLL
                client.reload_api_key()
        version = client.key_version
        if version == self._key_seen:
            return False
        self._key_seen = version
        self._auth_failures = 0
        spool = self.ctx.spool
        if spool.origin is not None:
            # records written from now on belong to the new key (a restart with it sends them)
            spool.set_origin(Origin.of(self.config.base_url, client.api_key))
        ledger = self.ctx.ledger
        # Results refused with the old key wait out backoffs of up to a minute:
        # due now, in the order they were due, so they go with the new key.
        ledger.results.make_all_due()
        ledger.release(AUTH_HOLD)
        return True

    # ------------------------------------------------------------ hooks
    def fetch_one(self) -> Optional[Task]:
        """Get one task, or None if there is none now. Override to fetch elsewhere."""
        return self.ctx.client.get_task()

    def idle_wait(self) -> float:
        """Seconds to wait after an empty reply: the poll interval +- jitter."""
        base = self.config.poll_interval
        jitter = self.config.poll_jitter
        return max(0.0, base + self._rng.uniform(-jitter, jitter))

    # ------------------------------------------------------------ failures
    def _succeeded(self) -> None:
        failures = self.breaker.consecutive_failures
        if failures >= self.breaker.threshold:
            log.warning("get-task works again after %d failures", failures)
        if self._auth_failures:
            log.warning("the AC server accepts the API key again")
        self.breaker.success()
        self._auth_failures = 0
        self._overloaded = False

    def _pause_after(self, exc: Exception) -> float:
        """How long to wait after a failed get-task (and log it once, plainly)."""
        if isinstance(exc, AgentStopping) or (self.stopping.is_set() and isinstance(exc, ACError)):
            return 0.0  # the agent is stopping: a cut-short call is expected, not an error
        policy = self.ctx.retry_policy
        if isinstance(exc, ACRateLimitError):
            wait = policy.rate_limit_wait(exc)
            log.warning(
                "get-task: %s; waiting %.1fs",
                CONCURRENCY_HINT if exc.concurrency else "rate limited by the AC server (429)",
                wait,
                extra=error_fields(exc, wait),
            )
            return wait
        if isinstance(exc, ACHTTPError) and exc.status in (401, 403):
            self._auth_failures += 1
            wait = policy.fetch_key_refused.wait(self._auth_failures, self._rng)
            if self._auth_log.ready():
                log.error(
                    "get-task: HTTP %d: %s; retrying in %.0fs",
                    exc.status,
                    auth_hint(self.config),
                    wait,
                    extra=error_fields(exc, wait),
                )
            return wait
        if isinstance(exc, (ACHTTPError, ACConnectionError, BadReplyError)):
            # Open, the breaker says how long; below its threshold, a brief backoff.
            wait = self.breaker.failure()
            failures = self.breaker.consecutive_failures
            if wait <= 0:
                wait = policy.fetch.wait(failures, self._rng)
            # One line per event (the message already names get-task), with
            # what to do about it when there is something to do.
            level = logging.WARNING if failures <= self.breaker.threshold else logging.DEBUG
            hint = hint_for(exc)
            log.log(
                level,
                "%s; waiting %.1fs%s",
                exc,
                wait,
                f" ({hint})" if hint else "",
                extra=error_fields(exc, wait),
            )
            return wait
        raise exc  # not an AC failure: a bug; run_loop logs it with its traceback

    def _answer_malformed(self, exc: TaskError) -> bool:
        """A task we cannot run but can name gets an error result; True if answered."""
        if exc.task_id is None:
            log.error("skipped a task without a usable taskId: %s", exc.reason)
            return False
        log.warning("task %s is malformed: %s", exc.task_id, exc.reason)
        fields = echo_fields(exc.raw) or {"taskId": exc.task_id}
        fields["taskId"] = exc.task_id
        self.ctx.ledger.finished(
            Result.agent_error(fields, f"malformed task: {exc.reason}", failure="malformed")
        )
        return True
