"""Uploader: the stage that delivers results to the AC server.

Each result goes on its route (``delivery.route_of``): a body of 1..512,000
bytes inline (base64) in put-result; a larger one gzip-compressed (by the
executor, or here into a private work file) to upload-result (``uploadToAc``
true) or to S3 via a presigned URL (false).

**No head-of-line blocking.** ``senders`` threads (``acMaxConcurrent - 1``,
at least one: one permit stays for get-task, so a slow upload never stops
fetching) take the longest-due result from the Ledger's ``DueQueue``; a
failed attempt puts the result back due after *its* backoff (its state is
its ``Delivery``). While every sender's lane is held by a slow upload,
small results borrow get-task's permit (``borrow_step``). **What a failure
means** is decided in one place, ``delivery.decide``: the Uploader sends,
and applies what it decides.

**A result is what the target sent, or an error.** A body sent from its
file is first checked against the record's ``bodySize`` and the sha256 the
spool recorded (``ResultSpool.check_body``); one that does not match goes
to quarantine and the task is answered with an error result instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Dict, Optional

from . import logs
from .ac.adaptive import retrying_overload
from .ac.breaker import ClassBreaker
from .ac.retry import ONE_ATTEMPT
from .compress import LEVEL, gzip_bytes, gzip_file
from .config import INLINE_BODY_LIMIT
from .delivery import (
    BodyMismatch,
    Delivery,
    Kind,
    Outcome,
    Route,
    decide,
    lanes_held_in,
)
from .hints import CONCURRENCY_HINT, auth_hint, hint_for
from .ledger import AUTH_HOLD
from .logs import error_fields
from .logthrottle import LogThrottle
from .models import (
    Result,
    error_payload,
    inline_payload,
    s3_payload,
    upload_file_name,
    upload_task_part,
)
from .spool import read_head
from .stage import Stage, StageContext

log = logging.getLogger("acagent.uploader")


class Uploader(Stage):
    """Delivers each result the Ledger holds to the AC server; ``decide`` says what a failure means.

    May be overridden: ``deliver(result, route) -> str`` (send one result on
    its route; raise when it did not go through; archive a delivered result with
    ``Observer.on_result_delivered``, not here, or a failing archive re-sends
    it) and ``compress(source, target)`` (gzip a body the executor left raw).

    Class variables that may be overridden: ``POLL`` (longest a sender waits
    for a due result), ``BORROW_PAUSE`` (the borrowing sender steps aside while
    a get-task waits for a permit), ``LANE_HELD`` (an attempt this long lets
    small results borrow), ``COMPRESS_LEVEL`` (gzip level).

    May be extended, call ``super()``: ``__init__``, ``start_threads`` (the
    senders, the borrowing sender, the cleanup thread) and ``on_stop`` (wakes
    the cleanup thread's wait, so it sees the stop).
    For subclasses: ``Stage``'s part (see ``acagent.stage``).
    """

    name = "uploader"

    #: longest a sender blocks waiting for a due result before checking for stop
    POLL = 0.5
    #: how long the borrowing sender steps aside while a get-task waits for a permit
    BORROW_PAUSE = 0.02
    #: an attempt this long makes its lane "held": small results may borrow (``borrow_step``)
    LANE_HELD = 1.0
    #: gzip level for upload-result when a body was not compressed by the executor
    COMPRESS_LEVEL = LEVEL

    def __init__(self, ctx: StageContext, *, senders: Optional[int] = None) -> None:
        super().__init__(ctx)
        # One permit is left to get-task; with two or more, one more sender
        # borrows it for small results when it may (``borrow_step``).
        self.senders = senders or max(1, self.config.ac_max_concurrent - 1)
        self.borrower = self.config.ac_max_concurrent >= 2 and senders is None
        #: the schedules ``decide`` draws the waits from
        self.policy = ctx.retry_policy
        self.breaker = ClassBreaker(
            threshold=self.policy.breaker_threshold, opened=self.policy.upload_breaker
        )
        self._auth_log = LogThrottle(60.0)
        #: what to do about a refused key (the config is frozen: worked out once)
        self._key_hint = auth_hint(self.config)
        #: when the attempt running on each sender's lane began (thread ident)
        self._lane_since: Dict[int, float] = {}

    # ------------------------------------------------------------ lifecycle
    def start_threads(self) -> None:
        for n in range(self.senders):
            self.spawn(lambda: self.run_loop(self.send_step), f"acagent-uploader-{n}")
        if self.borrower:
            self.spawn(lambda: self.run_loop(self.borrow_step), "acagent-uploader-borrow")
        # Delivered results leave the spool on their own thread (``Ledger.delivered``).
        self.spawn(lambda: self.run_loop(self.cleanup_step), "acagent-uploader-cleanup")

    def on_stop(self) -> None:
        self.ctx.ledger.wake_remover()  # the cleanup thread's wait ends; it sees the stop

    def cleanup_step(self) -> None:
        """Remove the spool files of results delivered since the last step."""
        self.ctx.ledger.remove_delivered(self.POLL)

    @property
    def retrying(self) -> int:
        """Results waiting for a retry after a failed attempt."""
        return self.ctx.ledger.results.count(lambda delivery: delivery.attempts > 0)

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

    def borrow_step(self) -> None:
        """Deliver one *small* result (one short put-result, so a get-task
        waits one short round trip at most) on get-task's permit while slow
        uploads hold every sender's lane (``lanes_held_in``) and no get-task
        waits for a permit; else sleep until the lanes may be held (a stop
        ends the sleep at once)."""
        started = list(self._lane_since.values())
        held_in = lanes_held_in(started, self.senders, self.LANE_HELD, time.monotonic())
        if held_in > 0:
            self.wait(held_in)
            return
        if self.ctx.client.fetch_waiting or self.breaker.remaining() > 0:
            self.wait(self.BORROW_PAUSE)
            return
        delivery = self.ctx.ledger.results.get(self.POLL, accept=lambda d: d.small)
        if delivery is None:
            return
        with logs.task_context(delivery.result.task_id):
            self._attempt(delivery)

    def _attempt(self, delivery: Delivery) -> None:
        route = delivery.settle_route(self.ctx.settings.upload_to_ac)
        try:
            with retrying_overload(delivery.overloaded):
                via = self.deliver(delivery.result, route)
        except Exception as exc:  # noqa: BLE001 - every failure keeps the result
            self._apply(delivery, exc, None)
        else:
            self._apply(delivery, None, via)

    def _apply(self, delivery: Delivery, exc: Optional[Exception], via: Optional[str]) -> None:
        """Do what ``decide`` says after one attempt of ``delivery``."""
        outcome = Outcome.of(exc)
        key_hint = self._key_hint
        d = decide(delivery, outcome, self.policy, key_hint=key_hint, busy_hint=CONCURRENCY_HINT)
        result, task_id = delivery.result, delivery.result.task_id
        if outcome.kind is Kind.UNEXPECTED:
            log.error(
                "task %s: unexpected error while uploading; kept and retried", task_id, exc_info=exc
            )
        if d.pause:
            self.breaker.pause(d.pause)
        if d.breaker_failure:
            self.breaker.failure()
        if d.hold is not None:
            self.ctx.ledger.hold(AUTH_HOLD, d.hold)
            if self._auth_log.ready():
                log.error("upload: %s; results are kept and retried", d.hold)
        if d.reroute_why:
            log.warning("task %s: %s; sending it through upload-result", task_id, d.reroute_why)
        if d.quarantine is not None:
            where = self.ctx.spool.quarantine(result.key, d.quarantine, body=result.kept_body())
            answered = "; the task is answered with an error result" if d.answer else ""
            log.error("task %s: %s; original kept in %s%s", task_id, d.why, where, answered)
            self.ctx.observers.emit("on_result_quarantined", result, d.quarantine)
        elif d.why and exc is not None and d.retry_in is not None:
            hint = key_hint if d.hold is not None else hint_for(exc)
            log.log(
                logging.WARNING if d.attempts <= 3 else logging.DEBUG,
                "task %s: upload failed (%s); retry %d in %.1fs%s",
                task_id,
                d.why,
                d.attempts,
                d.retry_in,
                f" ({hint})" if hint else "",
                extra=error_fields(exc, d.retry_in),
            )
            self.ctx.observers.emit("on_result_retry", result, d.why, d.retry_in)
        delivery.apply(d)
        if d.delivered:
            self.breaker.success()
        if d.release:
            self.ctx.ledger.release(AUTH_HOLD)
        if d.retry_in is not None:
            self.ctx.ledger.retry_later(delivery, d.retry_in)
            return
        self.ctx.ledger.delivered(delivery)
        if d.delivered:
            log.debug("result delivered via %s", via)
            elapsed = time.monotonic() - delivery.started
            self.ctx.observers.emit("on_result_delivered", result, via, elapsed)

    # ------------------------------------------------------------ one result
    def deliver(self, result: Result, route: Route) -> str:
        """Send one result on ``route`` (its ``Delivery``'s); returns how it
        went (inline, empty, upload, s3, error, logs).

        Raises an ``ACError`` (or any exception) when it did not go through:
        ``decide`` says what happens next.
        """
        client, version = self.ctx.client, self.ctx.client.version
        body: Optional[bytes] = None
        if route in ("inline", "upload", "s3") and result.body_base64 is None:
            assert result.body_path is not None
            try:  # no exists() first: one system call less on the delivering thread
                if route == "inline":
                    body = read_head(result.body_path, INLINE_BODY_LIMIT + 1)
                # the file (or ``body``, read from it) must be the one saved
                problem = self.ctx.spool.check_body(
                    result.key, result.body_path, result.body_size, body
                )
                if problem is not None:
                    raise BodyMismatch(problem)
            except FileNotFoundError:  # gone from the spool: the server hears so
                lost = Result.agent_error(
                    result.fields, "result body lost from the spool", failure="lost"
                )
                client.put_result(error_payload(lost, version), policy=ONE_ATTEMPT)
                return "error"
        if route == "logs":
            assert result.logs_zip is not None
            if not os.path.exists(result.logs_zip):  # zipped by an earlier run: zip again
                logs.zip_logs(self.config.resolved_log_dir(), result.logs_zip)
            client.upload_logs(
                result.logs_zip, upload_task_part(result, version, zipped=True), policy=ONE_ATTEMPT
            )
        elif route == "error":
            client.put_result(error_payload(result, version), policy=ONE_ATTEMPT)
        elif route == "inline" or route == "empty":
            client.put_result(inline_payload(result, version, body), policy=ONE_ATTEMPT)
        elif route == "upload":
            self._upload_to_ac(result)
        else:
            self._put_to_s3(result)
        return route

    def _upload_to_ac(self, result: Result) -> None:
        work = os.path.join(self.ctx.work_dir, f"{result.key}.gz")
        source, zipped = str(self.ctx.spool.compressed_path(result.key)), True
        kept = result.kept_body()
        try:
            if kept is not None:  # a small body kept in the record, refused inline
                gzip_bytes(kept, work, self.COMPRESS_LEVEL)
                source = work
            elif not os.path.exists(source):  # the executor did not compress it
                assert result.body_path is not None
                try:
                    self.compress(result.body_path, work)
                    source = work
                except OSError as exc:
                    log.warning(
                        "task %s: compression failed (%s); sending raw", result.task_id, exc
                    )
                    source, zipped = result.body_path, False
            self.ctx.client.upload_result(
                source,
                upload_file_name(result.task_id, zipped=zipped),
                "application/zip" if zipped else "text/plain",
                upload_task_part(result, self.ctx.client.version, zipped=zipped),
                policy=ONE_ATTEMPT,
            )
        finally:
            with contextlib.suppress(OSError):  # best effort: the work folder is private
                os.unlink(work)

    def compress(self, source: str, target: str) -> None:
        """gzip ``source`` into a new private file ``target`` (when the executor did not)."""
        gzip_file(source, target, self.COMPRESS_LEVEL)

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
