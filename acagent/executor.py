"""Executor: runs tasks as HTTP requests against the targets.

A dispatcher thread takes tasks from the task queue and hands them to a
``concurrent.futures.ThreadPoolExecutor`` of ``executor_pool_size`` threads.
``execute(task) -> Result`` is the hook a subclass overrides; the default
sends the target request with its own session (inward proxies, TLS settings)
and streams the body, decoded as HTTP says, into a private spool file: a
large body is never whole in memory (one of at most ``RECORD_BODY_LIMIT``
bytes is kept in the result and its record instead). Any failure becomes ``statusCode 500`` with
``Agent Side Error: <reason>``; ``execute`` never raises for a task.

Resizing (globalConfig ``poolSize``) starts a new pool for new tasks and lets
the old one finish what it runs, so no work is lost.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

import requests
import urllib3.exceptions

from . import logs
from .compress import gzip_file
from .config import INLINE_BODY_LIMIT, RECORD_BODY_LIMIT
from .errors import TargetFailure
from .logs import scrub_text
from .models import Result, Task, echo_fields, new_result_key
from .spool import SPOOL_ERRNOS, spool_error_reason
from .stage import Stage, StageContext
from .targets.deadline import DeadlineWatch, Watch
from .targets.encodings import encoding_reason, undecodable_encoding
from .targets.policy import TargetDenied, TargetPolicy, normalise_host
from .targets.session import TargetSession, build_target_session

log = logging.getLogger("acagent.executor")

CHECKMARX_TOKEN_PATH = "/cxrestapi/auth/identity/connect/token"  # noqa: S105 - a path
CHUNK = 256 * 1024


class Executor(Stage):
    """Runs tasks on a thread pool, each as one HTTP request to its target.

    May be overridden: ``execute(task, key=...) -> Result`` (must not raise: a
    failure is an error result; a result the spool cannot record as JSON is
    answered with an error result too), ``prepare_headers(task)`` (add auth,
    etc.), ``collect_logs(task, key)`` (the fetch-logs task).

    Class variables that may be overridden: ``POLL`` (longest the dispatcher
    blocks on the task queue before it looks at the stop flag).

    May be extended, call ``super()``: ``__init__``, ``start_threads`` (the
    dispatcher and the deadline watch), ``on_stop``, ``join``, and
    ``request_target(task, key)``, which checks the task's URL against the
    target policy before anything is sent: an override that does not call it
    lets a task reach any host.
    For subclasses: ``session`` (the target session), ``allow`` (the target
    policy), ``deadline_watch``, and ``Stage``'s part (see ``acagent.stage``).
    """

    name = "executor"
    #: longest the dispatcher blocks on the task queue before checking for stop
    POLL = 0.5

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.allow = TargetPolicy(self.config.allowed_targets, self.config.denied_targets)
        self.session = self._make_session(self.config.executor_pool_size)
        self.deadline_watch = DeadlineWatch(ctx.abort)
        # The threads of the pool new tasks go to: the settings' pool_size as
        # it was when the dispatcher last looked (it resizes to a new one).
        self._size = ctx.settings.pool_size
        self._pool = self._new_pool(self._size)
        self._lock = threading.Lock()
        # Tasks handed to a pool and not yet finished, by result key, and their futures.
        self._active: Dict[str, Task] = {}
        # Tasks on a pool thread now (``busy``): a task handed to a pool whose
        # threads are all taken (the prefetched one) waits there, not counted.
        self._running = 0
        self._futures: Dict[concurrent.futures.Future[None], concurrent.futures.Executor] = {}
        self._dispatcher: Optional[threading.Thread] = None
        self._watcher: Optional[threading.Thread] = None
        # Pools replaced by a resize: shut down, kept until their last task ended.
        self._old_pools: List[concurrent.futures.ThreadPoolExecutor] = []

    # -- lifecycle -------------------------------------------------------
    def _make_session(self, pool_size: int) -> TargetSession:
        return build_target_session(
            self.allow, pool_size, sensitive_headers=self.config.sensitive_headers
        )

    def _new_pool(self, size: int) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="acagent-exec"
        )

    def start_threads(self) -> None:
        self._dispatcher = self.spawn(self._dispatch_loop, "acagent-dispatch")
        self._watcher = self.spawn(self.deadline_watch.run, "acagent-deadline")

    def on_stop(self) -> None:
        # The dispatcher ends its loop, answers queued tasks "agent shutting
        # down" and returns; running tasks go on until they end or the abort
        # signal cuts them short (see DeadlineWatch).
        pass

    def join(self, timeout: float) -> bool:
        """Wait for the dispatcher and every running task; True if all ended."""
        deadline = time.monotonic() + timeout
        if self._dispatcher is not None:
            self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            futures = list(self._futures)
            pools = [self._pool, *self._old_pools]
        concurrent.futures.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        for pool in pools:
            pool.shutdown(wait=False)  # idle threads end; running ones were waited for
        self.deadline_watch.close()
        if self._watcher is not None:
            self._watcher.join(max(0.0, deadline - time.monotonic()))
        done = not self.is_alive() and all(f.done() for f in futures)
        if done:
            self.session.close()
        return done

    def resize(self, size: int) -> None:
        """Run new tasks on a pool of ``size`` threads; the old pool finishes its work."""
        with self._lock:
            if size == self._size:
                return
            old, self._pool, self._size = self._pool, self._new_pool(size), size
            self._old_pools.append(old)
        old.shutdown(wait=False)  # queued work still runs; nothing is cancelled
        log.info("executor resized to %d threads", size)

    @property
    def size(self) -> int:
        """Threads of the pool that takes new tasks."""
        return self._size

    @property
    def busy(self) -> int:
        """Tasks running on a thread now (never more than the pools' threads)."""
        return self._running

    # -- dispatching -----------------------------------------------------
    def _dispatch_loop(self) -> None:
        self.run_loop(self._dispatch_one)
        # Tasks fetched but never started get an error result now rather
        # than waiting for a pool that is shutting down.
        for task in self.ctx.ledger.take_queued_tasks():
            self.ctx.ledger.finished(
                Result.agent_error(task, "agent shutting down", failure="shutdown")
            )

    def _dispatch_one(self) -> None:
        task = self.ctx.ledger.take_task(timeout=self.POLL)
        if task is None:
            return
        wanted = self.ctx.settings.pool_size
        if wanted != self._size:
            # globalConfig poolSize: resized here, on the one thread that
            # submits, so a resize can never race a submit.
            self.resize(wanted)
        self.submit(task)

    def submit(self, task: Task) -> None:
        key = task.key or new_result_key()  # the Ledger's journal key, if it made one
        with self._lock:
            self._active[key] = task
            try:
                future = self._pool.submit(self._run, task, key)
            except RuntimeError:  # the pool is shutting down (a stop raced us)
                del self._active[key]
                refused = True
            else:
                self._futures[future] = self._pool
                refused = False
        if refused:
            self.ctx.ledger.finished(
                Result.agent_error(task, "agent shutting down", failure="shutdown", key=key)
            )
            return
        future.add_done_callback(self._forget)

    def _forget(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.pop(future, None)
            if self._old_pools:
                # A replaced pool with no task left is shut down already: forget it.
                busy = set(self._futures.values())
                self._old_pools = [p for p in self._old_pools if p in busy]
        # _run handles every failure it expects; anything else would stay in
        # the future, unseen. Say it (a bug), as a stage loop does.
        error = None if future.cancelled() else future.exception()
        if isinstance(error, Exception):
            log.error("a task's run failed unexpectedly", exc_info=error)
            self.ctx.observers.emit("on_stage_failure", self.name, error)

    def _run(self, task: Task, key: str) -> None:
        started = time.monotonic()
        with self._lock:
            self._running += 1
        with logs.task_context(task.task_id):
            try:
                result = self.execute(task, key=key)
            except Exception as exc:  # execute() must not raise; a subclass might
                log.exception("execute() raised for task %s", task.task_id)
                result = Result.agent_error(task, f"{type(exc).__name__}: {exc}", key=key)
            finally:
                with self._lock:
                    self._running -= 1
                    still_ours = self._active.pop(key, None) is not None
            result.key = key
            if not still_ours:
                self.ctx.spool.discard_body(key)  # the shutdown deadline answered it already
                return
            self.ctx.observers.emit("on_task_executed", result, time.monotonic() - started)
            self.ctx.ledger.finished(result)

    def take_unfinished(self) -> Dict[str, Task]:
        """Claim every task still running (at the shutdown deadline)."""
        with self._lock:
            active, self._active = self._active, {}
        return active

    # -- one task --------------------------------------------------------
    def execute(self, task: Task, *, key: str) -> Result:
        """Run ``task`` and return its result; errors become error results."""
        try:
            if task.is_fetch_logs:
                return self.collect_logs(task, key)
            return self.request_target(task, key)
        except TargetFailure as exc:
            self.ctx.spool.discard_body(key)
            log.warning("task %s failed: %s", task.task_id, exc.reason)
            return Result.agent_error(task, exc.reason, failure=exc.slug, key=key)

    def collect_logs(self, task: Task, key: str) -> Result:
        """The fetch-logs task: zip the log folder for upload-logs."""
        target = os.path.join(self.ctx.work_dir, f"logs_{key}.zip")
        logs.zip_logs(self.config.resolved_log_dir(), target)
        return Result(fields=echo_fields(task.raw), status_code=200, logs_zip=target, key=key)

    def prepare_headers(self, task: Task) -> Dict[str, str]:
        """Headers for the target request (override to add auth, etc.)."""
        headers = dict(task.request_headers)
        if CHECKMARX_TOKEN_PATH in task.url:
            # Compatibility quirk: Checkmarx's token endpoint wants a form post.
            for name in [h for h in headers if h.lower() == "content-type"]:
                del headers[name]
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        return headers

    def request_target(self, task: Task, key: str) -> Result:
        """Send the target request and stream the body into the spool."""
        left = task.seconds_left()
        if left <= 0:
            raise TargetFailure("task expired before it could run", "expired")
        try:
            host = self.allow.check_url(task.url)
        except TargetDenied as exc:
            raise TargetFailure(exc.reason, "denied") from None
        headers = self.prepare_headers(task)
        self._check_host_header(headers, host)
        try:
            body = task.input.encode("utf-8") if task.input is not None else None
        except UnicodeEncodeError:  # JSON can carry a lone surrogate ("\ud800")
            raise TargetFailure("input is not valid UTF-8 text", "malformed") from None
        deadline = time.monotonic() + left
        try:
            reply = self.session.request_checked(
                task.method,
                task.url,
                host,
                headers=headers,
                data=body,
                timeout=(min(self.config.connect_timeout, left), min(self.config.timeout, left)),
                verify=self.ctx.settings.verify,
                proxies=self.config.inward_proxies,
            )
        except TargetFailure:
            raise
        except TargetDenied as exc:
            raise TargetFailure(exc.reason, "denied") from None
        except requests.Timeout as exc:
            raise TargetFailure(f"target timed out: {_brief(exc)}", "timeout") from None
        except requests.exceptions.InvalidURL as exc:
            raise TargetFailure(f"invalid url: {_brief(exc)}", "malformed") from None
        except requests.exceptions.InvalidHeader:
            # requests quotes the offending header value in its message: it may
            # be a credential, so it goes neither into the log nor the result.
            raise TargetFailure(
                "invalid request header (leading whitespace or reserved characters)", "malformed"
            ) from None
        except UnicodeError:
            raise TargetFailure(
                "a request header is not encodable as Latin-1 (HTTP/1.1)", "malformed"
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
            raise TargetFailure(
                f"target unreachable: {_brief(exc)}", "target_unreachable"
            ) from None
        with reply, self.deadline_watch.watching(reply.raw, deadline) as watch:
            size, small = self._stream_body(reply, key, deadline, watch)
        if size > INLINE_BODY_LIMIT and self.ctx.settings.upload_to_ac:
            self._precompress(key)
        return Result(
            fields=echo_fields(task.raw),
            status_code=reply.status_code,
            response_headers=dict(reply.headers),
            body_path=str(self.ctx.spool.body_path(key)) if size and small is None else None,
            body_size=size,
            key=key,
            body_base64=base64.b64encode(small).decode("ascii") if small else None,
        )

    def _precompress(self, key: str) -> None:
        """gzip a large body for upload-result here, on one of many executor threads.

        The Uploader then only sends it: compressing a 20 MB body on the
        delivery path would stall every other upload behind it. A failure
        (a full disk) only means the Uploader compresses it itself.
        """
        spool = self.ctx.spool
        try:
            gzip_file(str(spool.body_path(key)), str(spool.compressed_path(key)))
        except OSError as exc:
            log.debug("could not compress the body ahead of upload: %s", exc)

    def _check_host_header(self, headers: Dict[str, str], host: str) -> None:
        """A ``Host`` header must name the URL's host or an allow-listed one."""
        for name, value in headers.items():
            if name.strip().lower() != "host":
                continue
            named = normalise_host(_host_part(value))
            if named == host:
                continue
            if self.allow.enabled and named and self.allow.allow.matches_name(named):
                continue
            raise TargetFailure("Host header names another host than the url", "denied")

    def _stream_body(
        self, reply: requests.Response, key: str, deadline: float, watch: Watch
    ) -> Tuple[int, Optional[bytes]]:
        """Read the body: ``(size, small)``. A body of at most RECORD_BODY_LIMIT
        bytes is returned as ``small``, to be kept in the result's record; a
        larger one is streamed into the spool's body file (``small`` None)."""
        unknown = undecodable_encoding(reply.headers.get("Content-Encoding", ""))
        if unknown:
            # urllib3 passes an encoding it cannot decode through as raw bytes;
            # they must not reach AC as if they were the body.
            raise TargetFailure(encoding_reason(unknown), "bad_encoding")
        cap = self.config.max_response_bytes
        size = 0
        held: List[bytes] = []  # the body while it still fits in the record
        out = None
        try:
            for chunk in reply.raw.stream(CHUNK, decode_content=True):
                if not chunk:
                    continue
                size += len(chunk)
                if cap and size > cap:
                    raise TargetFailure(f"response larger than {cap} bytes", "too_large")
                if out is None and size <= RECORD_BODY_LIMIT:
                    held.append(chunk)
                else:
                    try:
                        if out is None:
                            out = self.ctx.spool.open_body(key)
                            for part in held:
                                out.write(part)
                            held = []
                        out.write(chunk)
                    except OSError as exc:
                        raise _spool_failure(exc) from None
                if time.monotonic() > deadline:
                    raise TargetFailure("task expired while reading the response", "timeout")
                if self.ctx.abort.is_set():
                    raise TargetFailure("agent shutting down", "shutdown")
        except TargetFailure:
            raise
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise _read_failure(exc, watch) from None
        finally:
            if out is not None:
                try:
                    out.close()
                except OSError as exc:  # the last buffered write failed on close
                    raise _spool_failure(exc) from None
        return size, (None if out is not None else b"".join(held))


def _spool_failure(exc: OSError) -> TargetFailure:
    """A body that could not be written to the spool: the task's error result says why."""
    if exc.errno in SPOOL_ERRNOS:
        reason = spool_error_reason(exc)
        if "no space" in reason:
            reason = "no space for the response body in the spool folder"
        return TargetFailure(reason, "spool_unwritable")
    return TargetFailure(f"cannot write the response body: {_brief(exc)}", "spool_unwritable")


def _read_failure(exc: Exception, watch: Watch) -> Exception:
    """The error result's reason for an exception raised while reading a body."""
    if watch.fired is not None:  # the watch shut the socket: that is why the read failed
        return watch.fired
    if isinstance(exc, urllib3.exceptions.DecodeError):
        return TargetFailure(f"invalid Content-Encoding: {_brief(exc)}", "bad_encoding")
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return TargetFailure(f"target timed out: {_brief(exc)}", "timeout")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
        return TargetFailure(f"response body broken: {_brief(exc)}", "broken_body")
    return exc


def _host_part(value: str) -> str:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _brief(exc: BaseException) -> str:
    """An exception as one short line: URLs lose query string and userinfo."""
    return scrub_text(f"{type(exc).__name__}: {exc}")[:300]
