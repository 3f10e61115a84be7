"""Uploader: the stage that delivers results to the AC server.

A body of 1..512,000 bytes goes inline (base64) in put-result (a small one
is already base64 in the result, kept in its record); a larger one is
gzip-compressed from its spool file to a private work file and sent to
upload-result (``uploadToAc`` true) or to S3 via a presigned URL (false).

**No head-of-line blocking.** ``senders`` threads (``acMaxConcurrent - 1``,
at least one: one permit stays free for get-task, so a slow upload never
stops fetching) take results from the Ledger's ``DueQueue``. Each result
carries its own retry state and due time: a failed attempt puts it back due
after *its* backoff, and the thread moves on to the next due result. Fresh
results and retried ones are served in order of their due times, so neither
starves the other.

**What a failure means** (PROTOCOL.md statuses; a real result is never
replaced by an error result nor deleted for a status that may be transient
or fixed by an operator):

* 5xx, 407, 408, timeouts, resets: retried, ``RETRY_MIN`` doubling to
  ``RETRY_MAX`` with jitter, per result. A run of failures opens the upload
  class's breaker (``ClassBreaker``); a 429 with a wait pauses the class.
* 401/403: the server refused the API key. The result is kept, fetching is
  held (no new work that cannot be delivered), an actionable ERROR is logged
  at most once a minute, and the result is retried; the first accepted
  delivery releases the hold.
* 413 on put-result: the same result goes through upload-result instead.
* S3 (``uploadToAc`` false): a presigned URL the upload policy refuses (an
  internal address, not https), or ``S3_ATTEMPTS`` failed S3 attempts: the
  same result goes through upload-result to the AC server instead (each S3
  attempt asks for a fresh URL first).
* 400/422 (the server refuses the content): ``REFUSALS_BEFORE_QUARANTINE``
  attempts, then the original record and body move to the spool's
  ``quarantine/`` folder and the task is answered with an error result that
  quotes the server's reason.

**A result is what the target sent, or an error.** Before a body is sent
from its file, its length is checked against the record's ``bodySize`` and
its content against the sha256 the spool recorded as it was written
(``ResultSpool.check_body``; an inline body is checked in the bytes already
read). A body that does not match goes to quarantine and the task is
answered with an error result: it is never delivered as the real result.

Hooks (may be overridden): ``deliver(result) -> str`` (raise on failure;
return how it went). For subclasses: ``breaker``, ``compress(source, target)``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
import uuid
from typing import Dict, Optional, Set

from . import logs
from .breaker import ClassBreaker
from .compress import LEVEL, gzip_bytes, gzip_file
from .config import INLINE_BODY_LIMIT
from .errors import ACError, ACHTTPError, ACRateLimitError, AgentStopping, UploadURLRefused
from .fetcher import AUTH_HOLD, CONCURRENCY_HINT, auth_hint
from .hints import hint_for
from .ledger import Delivery
from .logs import error_fields
from .logthrottle import LogThrottle
from .models import (
    Result,
    encoded_inline_payload,
    error_payload,
    inline_payload,
    s3_payload,
    upload_file_name,
    upload_task_part,
)
from .retry import ONE_ATTEMPT
from .spool import read_head
from .stage import Stage, StageContext

log = logging.getLogger("acagent.uploader")

#: statuses that mean "the server will not take this content as it is"
CONTENT_REFUSED = frozenset({400, 422})


#: the answer for a result whose body file is a symbolic link, whatever it points to
LINKED_BODY = "the body file is a symbolic link, not a file the agent wrote"


class BodyMismatch(Exception):
    """The body file of a result is not the one saved (``ResultSpool.check_body``)."""


class Uploader(Stage):
    name = "uploader"

    #: longest a sender blocks waiting for a due result before checking for stop
    POLL = 0.5
    #: how long the borrowing sender steps aside while a get-task waits for a permit
    BORROW_PAUSE = 0.02
    #: longest the borrowing sender sleeps before it looks again at the backlog
    #: and at the senders' lanes
    BACKLOG_WAIT = 1.0
    #: an attempt on a sender's lane this long makes the lane "held": small
    #: results then go out on get-task's permit (``borrow_step``)
    LANE_HELD = 1.0
    #: per-result backoff after a transient failure: first wait, doubled up to RETRY_MAX
    RETRY_MIN = 0.5
    RETRY_MAX = 60.0
    #: per-result wait while the server refuses the API key, doubled up to AUTH_RETRY_MAX
    AUTH_RETRY_MIN = 2.0
    AUTH_RETRY_MAX = 60.0
    #: a "Too many concurrent requests" 429 without a wait header waits 0..this
    CONCURRENCY_WAIT_MAX = 10.0
    #: failed S3 attempts of one result before it goes through upload-result instead
    S3_ATTEMPTS = 3
    #: 400/422 refusals of one result before it is quarantined
    REFUSALS_BEFORE_QUARANTINE = 3
    #: gzip level for upload-result when a body was not compressed by the executor
    COMPRESS_LEVEL = LEVEL

    def __init__(self, ctx: StageContext, *, senders: Optional[int] = None) -> None:
        super().__init__(ctx)
        # One permit is left to get-task (so uploads, however slow, never stop
        # fetching); the others may all carry uploads at once. With more than
        # one permit, one more sender *borrows* get-task's permit for small
        # results while no get-task waits for it (see ``borrow_step``).
        self.senders = senders or max(1, self.config.ac_max_concurrent - 1)
        self.borrower = self.config.ac_max_concurrent >= 2 and senders is None
        policy = ctx.retry_policy
        self.breaker = ClassBreaker(
            threshold=policy.breaker_threshold, opened=policy.upload_breaker
        )
        self._rng = random.Random()
        self._auth_log = LogThrottle(60.0)
        # Results that go through upload-result whatever their size or
        # uploadToAc says (put-result said 413, or S3 would not take them).
        self._via_upload_result: Set[str] = set()
        self._s3_failures: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._retrying = 0
        #: when the attempt running on each sender's lane began (thread ident)
        self._lane_since: Dict[int, float] = {}

    # ------------------------------------------------------------ lifecycle
    def start_threads(self) -> None:
        for n in range(self.senders):
            self.spawn(lambda: self.run_loop(self.send_step), f"acagent-uploader-{n}")
        if self.borrower:
            self.spawn(lambda: self.run_loop(self.borrow_step), "acagent-uploader-borrow")
        # Delivered results leave the spool on their own thread, so no sender
        # waits for the disk between two uploads (see ``Ledger.delivered``).
        self.spawn(lambda: self.run_loop(self.cleanup_step), "acagent-uploader-cleanup")

    def on_stop(self) -> None:
        self.ctx.ledger.wake()  # the borrowing sender's backlog wait ends; it sees the stop
        self.ctx.ledger.wake_remover()  # so does the cleanup thread's wait

    def cleanup_step(self) -> None:
        """Remove the spool files of results delivered since the last step."""
        self.ctx.ledger.remove_delivered(self.POLL)

    @property
    def retrying(self) -> int:
        """Results waiting for a retry after a failed attempt."""
        return self._retrying

    # ------------------------------------------------------------ one step
    def send_step(self) -> None:
        """Take the longest-due result and make one delivery attempt."""
        if not self.breaker.wait_closed(self.stopping):
            return
        delivery = self.ctx.ledger.take_result(timeout=self.POLL)
        if delivery is None:
            return
        lane = threading.get_ident()
        self._lane_since[lane] = time.monotonic()  # a dict item set: atomic
        try:
            with logs.task_context(delivery.result.task_id):
                self._attempt(delivery)
        finally:
            del self._lane_since[lane]

    def lane_held(self) -> bool:
        """Every sender's lane carries an attempt that began ``LANE_HELD`` ago or more."""
        started = list(self._lane_since.values())
        now = time.monotonic()
        return len(started) >= self.senders and all(now - t >= self.LANE_HELD for t in started)

    def borrow_step(self) -> None:
        """Deliver one *small* result on get-task's permit while get-task cannot use it.

        Borrowing happens only while the results waiting for delivery are at
        ``--responseQueueThreshold`` (so no get-task can be made until
        uploads drain them), or while one slow upload holds every sender's
        lane (``lane_held``: a proxy slow on large POSTs must not delay every
        other result), and no get-task waits for a permit. Only
        small results (inline put-result, error results) borrow, so a
        get-task that becomes possible meanwhile waits one short round trip
        at most; a large upload never borrows. So both permits stay busy when
        uploads are the bottleneck, and a slow upload never stops fetching
        while there is capacity.
        """
        if not (self.ctx.ledger.results_backlogged() or self.lane_held()):
            # Idle or keeping up: sleep until a backlog builds, or look again
            # in a while for a held lane.
            self.ctx.ledger.wait_backlogged(self.BACKLOG_WAIT)
            return
        if self.ctx.client.fetch_waiting or self.breaker.remaining() > 0:
            self.wait(self.BORROW_PAUSE)
            return
        delivery = self.ctx.ledger.results.get(self.POLL, accept=self._is_small)
        if delivery is None:
            return
        with logs.task_context(delivery.result.task_id):
            self._attempt(delivery)

    def _is_small(self, delivery: Delivery) -> bool:
        result = delivery.result
        if result.logs_zip is not None or result.key in self._via_upload_result:
            return False
        return result.is_error or result.body_size <= INLINE_BODY_LIMIT

    def _attempt(self, delivery: Delivery) -> None:
        result = delivery.result
        try:
            via = self.deliver(result)
        except AgentStopping:
            self._again(delivery, 0.0)  # stays in the spool; re-sent after a restart
            return
        except BodyMismatch as exc:
            self._quarantine_damaged(delivery, str(exc))
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                # A file of the result's in the spool is a symbolic link (the
                # agent never makes one): planted, never followed nor sent.
                self._quarantine_damaged(delivery, LINKED_BODY)
            else:
                self._failed(delivery, exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure keeps the result
            self._failed(delivery, exc)
            return
        self.breaker.success()
        if delivery.attempts:
            self._note_retry_done()
        self.ctx.ledger.release(AUTH_HOLD)
        with self._lock:
            self._via_upload_result.discard(result.key)
            self._s3_failures.pop(result.key, None)
        self.ctx.ledger.delivered(delivery)
        log.debug("result delivered via %s", via)
        self.ctx.observers.emit(
            "on_result_delivered", result, via, time.monotonic() - delivery.started
        )

    # ------------------------------------------------------------ failures
    def _failed(self, delivery: Delivery, exc: Exception) -> None:
        result = delivery.result
        status = exc.status if isinstance(exc, ACHTTPError) else None
        if delivery.attempts == 0:
            self._note_retry_start()
        delivery.attempts += 1
        if isinstance(exc, ACRateLimitError):
            if exc.retry_after is not None:  # the server said how long: the class waits
                wait = exc.retry_after
                self.breaker.pause(wait)
            elif exc.concurrency:
                wait = self._rng.uniform(0.0, self.CONCURRENCY_WAIT_MAX)
            else:
                wait = self._retry_wait(delivery.attempts)
            reason = CONCURRENCY_HINT if exc.concurrency else "rate limited (429)"
        elif status in (401, 403):
            wait = self._auth_wait(delivery)
            auth = auth_hint(self.config)
            self.ctx.ledger.hold(AUTH_HOLD, f"{auth} (HTTP {status} on upload)")
            if self._auth_log.ready():
                log.error("upload: HTTP %d: %s; results are kept and retried", status, auth)
            reason = f"HTTP {status}"
        elif (
            status == 413 and result.key not in self._via_upload_result and self._is_inline(result)
        ):
            with self._lock:
                self._via_upload_result.add(result.key)
            log.warning(
                "task %s: put-result too large for the server (413); using upload-result",
                result.task_id,
            )
            self._again(delivery, 0.0)
            return
        elif status in CONTENT_REFUSED:
            delivery.refusals += 1
            if delivery.refusals >= self.REFUSALS_BEFORE_QUARANTINE:
                self._quarantine(delivery, exc)
                return
            wait = self._retry_wait(delivery.refusals)
            reason = f"refused by the server (HTTP {status})"
        elif isinstance(exc, ACError):
            self.breaker.failure()
            wait = self._retry_wait(delivery.attempts)
            reason = str(exc)
        else:
            log.error(
                "task %s: unexpected error while uploading; kept and retried",
                result.task_id,
                exc_info=exc,
            )
            wait = self._retry_wait(delivery.attempts)
            reason = f"{type(exc).__name__}"
        level = logging.WARNING if delivery.attempts <= 3 else logging.DEBUG
        hint = auth_hint(self.config) if status in (401, 403) else hint_for(exc)
        log.log(
            level,
            "task %s: upload failed (%s); retry %d in %.1fs%s",
            result.task_id,
            reason,
            delivery.attempts,
            wait,
            f" ({hint})" if hint else "",
            extra=error_fields(exc, wait),
        )
        self.ctx.observers.emit("on_result_retry", result, reason, wait)
        self._again(delivery, wait)

    def _again(self, delivery: Delivery, wait: float) -> None:
        self.ctx.ledger.retry_later(delivery, wait)

    def _retry_wait(self, n: int) -> float:
        step = min(self.RETRY_MIN * 2.0 ** max(n - 1, 0), self.RETRY_MAX)
        return step * self._rng.uniform(0.5, 1.0)

    def _auth_wait(self, delivery: Delivery) -> float:
        step = self.AUTH_RETRY_MIN * 2.0 ** max(delivery.attempts - 1, 0)
        return min(step, self.AUTH_RETRY_MAX) * self._rng.uniform(0.8, 1.0)

    def _note_retry_start(self) -> None:
        with self._lock:
            self._retrying += 1

    def _note_retry_done(self) -> None:
        with self._lock:
            self._retrying -= 1

    def _quarantine(self, delivery: Delivery, exc: Exception) -> None:
        """The server refused the content for good: keep it for a human, answer with an error."""
        result = delivery.result
        server_reason = exc.body[:300] if isinstance(exc, ACHTTPError) else str(exc)
        status = exc.status if isinstance(exc, ACHTTPError) else 0
        where = self.ctx.spool.quarantine(
            result.key, f"HTTP {status}: {server_reason}", body=result.kept_body()
        )
        log.error(
            "task %s: the AC server refused the result %d times (HTTP %d: %s); original kept in %s",
            result.task_id,
            delivery.refusals,
            status,
            server_reason,
            where,
        )
        self.ctx.observers.emit("on_result_quarantined", result, server_reason)
        if result.is_error:
            # Nothing better to send: the refused thing was already an error result.
            self.ctx.ledger.delivered(delivery)
            self._note_retry_done()
            return
        self._answer_instead(
            delivery,
            f"the AC server refused the result (HTTP {status}): {server_reason}",
            "refused",
        )

    def _quarantine_damaged(self, delivery: Delivery, reason: str) -> None:
        """The body in the spool is not the one the target sent: keep it for a
        human, answer the task with an error result instead."""
        result = delivery.result
        where = self.ctx.spool.quarantine(result.key, f"damaged body: {reason}")
        log.error(
            "task %s: the result's body in the spool is damaged (%s); moved to %s, "
            "the task is answered with an error result",
            result.task_id,
            reason,
            where,
        )
        self.ctx.observers.emit("on_result_quarantined", result, reason)
        self._answer_instead(
            delivery, f"the result's body was damaged in the agent's spool ({reason})", "damaged"
        )

    def _answer_instead(self, delivery: Delivery, reason: str, failure: str) -> None:
        """Send an error result in place of the one taken to quarantine."""
        delivery.result = Result.agent_error(
            delivery.result.fields, reason, failure=failure, key=delivery.result.key
        )
        delivery.refusals = 0
        # The original record went to quarantine: the fallback is not on disk
        # yet, so retry_later saves it before it is queued again.
        delivery.durable = False
        self._again(delivery, 0.0)

    # ------------------------------------------------------------ one result
    def _deliver_lost(self, result: Result) -> str:
        """The body file is gone from the spool: the server hears so, as an error result."""
        lost = Result.agent_error(result.fields, "result body lost from the spool", failure="lost")
        self.ctx.client.put_result(error_payload(lost, self.ctx.client.version), policy=ONE_ATTEMPT)
        return "error"

    def deliver(self, result: Result) -> str:
        """Send one result; returns how it went (inline, empty, upload, s3, error, logs).

        Raises an ``ACError`` (or any exception) when it did not go through:
        the caller decides from it when to try again.
        """
        client, version = self.ctx.client, self.ctx.client.version
        if result.logs_zip is not None:
            if not os.path.exists(result.logs_zip):  # zipped by an earlier run: zip again
                logs.zip_logs(self.config.resolved_log_dir(), result.logs_zip)
            client.upload_logs(
                result.logs_zip, upload_task_part(result, version, zipped=True), policy=ONE_ATTEMPT
            )
            return "logs"
        if result.is_error:
            client.put_result(error_payload(result, version), policy=ONE_ATTEMPT)
            return "error"
        if result.body_base64 is not None:  # a small body, kept in the record
            if result.key in self._via_upload_result:
                self._upload_to_ac(result)
                return "upload"
            payload = encoded_inline_payload(result, version, result.body_base64)
            client.put_result(payload, policy=ONE_ATTEMPT)
            return "inline"
        if result.body_size == 0 or result.body_path is None:
            client.put_result(inline_payload(result, version, b""), policy=ONE_ATTEMPT)
            return "empty"
        if self._is_inline(result) and result.key not in self._via_upload_result:
            try:  # no exists() first: one system call less on the delivering thread
                body = read_head(result.body_path, INLINE_BODY_LIMIT + 1)
            except FileNotFoundError:
                return self._deliver_lost(result)
            self._check_body(result, body)
            client.put_result(inline_payload(result, version, body), policy=ONE_ATTEMPT)
            return "inline"
        try:
            self._check_body(result)
        except FileNotFoundError:
            return self._deliver_lost(result)
        if (
            self.ctx.settings.upload_to_ac
            or self._is_inline(result)
            or result.key in self._via_upload_result
        ):
            self._upload_to_ac(result)
            return "upload"
        self._upload_to_s3(result)
        return "s3"

    def _check_body(self, result: Result, body: Optional[bytes] = None) -> None:
        """Raise ``BodyMismatch`` if the body file (or ``body``, read from it) is
        not the one saved; ``FileNotFoundError`` if it is gone."""
        assert result.body_path is not None
        problem = self.ctx.spool.check_body(result.key, result.body_path, result.body_size, body)
        if problem is not None:
            raise BodyMismatch(problem)

    @staticmethod
    def _is_inline(result: Result) -> bool:
        return 0 < result.body_size <= INLINE_BODY_LIMIT and result.logs_zip is None

    def _upload_to_ac(self, result: Result) -> None:
        work = os.path.join(self.ctx.work_dir, f"{result.key}.gz")
        kept = result.kept_body()
        if kept is not None:
            # A small body kept in the record (the server refused it inline):
            # its gzip goes to a work file; a failure to write it is retried.
            gzip_bytes(kept, work, self.COMPRESS_LEVEL)
            source, zipped = work, True
        else:
            assert result.body_path is not None
            ready = str(self.ctx.spool.compressed_path(result.key))
            if os.path.exists(ready):
                # compressed by the executor thread that ran the task: only send it here
                self._send_upload_result(result, ready, zipped=True)
                return
            try:
                self.compress(result.body_path, work)
                source, zipped = work, True
            except OSError as exc:
                log.warning("task %s: compression failed (%s); sending raw", result.task_id, exc)
                source, zipped = result.body_path, False
        try:
            self._send_upload_result(result, source, zipped=zipped)
        finally:
            _remove_quietly(work)

    def _send_upload_result(self, result: Result, path: str, *, zipped: bool) -> None:
        self.ctx.client.upload_result(
            path,
            upload_file_name(result.task_id, zipped=zipped),
            "application/zip" if zipped else "text/plain",
            upload_task_part(result, self.ctx.client.version, zipped=zipped),
            policy=ONE_ATTEMPT,
        )

    def compress(self, source: str, target: str) -> None:
        """gzip ``source`` into a new private file ``target`` (when the executor did not)."""
        gzip_file(source, target, self.COMPRESS_LEVEL)

    def _upload_to_s3(self, result: Result) -> None:
        try:
            self._put_to_s3(result)
        except Exception as exc:
            with self._lock:
                failures = self._s3_failures.get(result.key, 0) + 1
                self._s3_failures[result.key] = failures
                give_up = isinstance(exc, UploadURLRefused) or failures >= self.S3_ATTEMPTS
                if give_up:
                    self._via_upload_result.add(result.key)
            if give_up:
                log.warning(
                    "task %s: S3 upload failed (%s); sending the result through upload-result",
                    result.task_id,
                    exc,
                )
            raise

    def _put_to_s3(self, result: Result) -> None:
        assert result.body_path is not None
        client = self.ctx.client
        put_url, get_url = client.get_upload_url(
            f"{result.task_id}{uuid.uuid4().hex}", policy=ONE_ATTEMPT
        )
        content_type = next(
            (v for k, v in result.response_headers.items() if k.lower() == "content-type"), None
        )
        client.put_s3(put_url, result.body_path, content_type=content_type, policy=ONE_ATTEMPT)
        client.put_result(s3_payload(result, client.version, get_url), policy=ONE_ATTEMPT)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort
        log.debug("could not remove %s: %s", path, exc)
