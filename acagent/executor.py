"""Executor: runs tasks as HTTP requests against the targets.

A dispatcher thread takes tasks from the task queue and hands them to a
``concurrent.futures.ThreadPoolExecutor`` of ``executor_pool_size`` threads.
``execute(task) -> Result`` is the hook a subclass overrides; the default
sends the target request with its own session (inward proxies, TLS settings)
and streams the body, decoded as HTTP says, into a private spool file: a
body is never whole in memory. Any failure becomes ``statusCode 500`` with
``Agent Side Error: <reason>``; ``execute`` never raises for a task.

Resizing (globalConfig ``poolSize``) starts a new pool for new tasks and lets
the old one finish what it runs, so no work is lost.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Dict, Union

import requests
import urllib3.exceptions

from .allowlist import TargetDenied, TargetPolicy, normalise_host
from .errors import AgentError
from .logs import scrub_text
from .models import Result, Task, echo_fields, new_result_key
from .targetsession import TargetSession, build_target_session

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("acagent.executor")

CHECKMARX_TOKEN_PATH = "/cxrestapi/auth/identity/connect/token"  # noqa: S105 - a path
CHUNK = 256 * 1024


class TargetFailure(AgentError):
    """A task could not be completed; ``reason`` goes into the error result."""

    def __init__(self, reason: str, slug: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.slug = slug


class Executor:
    """Runs tasks on a thread pool. Subclass and override ``execute`` (or
    ``prepare_headers``) to customise how a task becomes a target request."""

    #: longest the dispatcher blocks on the task queue before checking for stop
    POLL = 0.5

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.config = pipeline.config
        self.task_queue: queue.Queue[Task] = pipeline.task_queue
        self.allow = TargetPolicy(self.config.allowed_targets, self.config.denied_targets)
        self.verify: Union[bool, str] = self.config.tls_verify
        self.session = self._make_session(self.config.executor_pool_size)
        self._size = self.config.executor_pool_size
        self._pool = self._new_pool(self._size)
        self._old_pools: list[concurrent.futures.ThreadPoolExecutor] = []
        self._lock = threading.Lock()
        self._busy = 0
        self._running = False
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="acagent-dispatch", daemon=True
        )
        # Futures of tasks handed to a pool and not yet finished, by result key.
        self._active: Dict[str, Task] = {}

    # -- lifecycle -------------------------------------------------------
    def _make_session(self, pool_size: int) -> TargetSession:
        return build_target_session(
            self.allow, pool_size, sensitive_headers=self.config.sensitive_headers
        )

    def _new_pool(self, size: int) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="acagent-exec"
        )

    def start(self) -> None:
        self._running = True
        self._dispatcher.start()

    def stop_intake(self) -> None:
        """Stop taking new tasks from the queue (they get shutdown results)."""
        self._running = False

    def join(self, timeout: float) -> bool:
        """Wait for the dispatcher and every pool thread; True if all ended."""
        deadline = time.monotonic() + timeout
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            pools = [self._pool, *self._old_pools]
        for pool in pools:
            pool.shutdown(wait=False)
        for pool in pools:
            for thread in list(getattr(pool, "_threads", ())):
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = self._dispatcher.is_alive() or any(
            t.is_alive() for p in pools for t in list(getattr(p, "_threads", ()))
        )
        if not alive:
            self.session.close()
        return not alive

    def resize(self, size: int) -> None:
        """Run new tasks on a pool of ``size`` threads; the old pool finishes its work."""
        with self._lock:
            if size == self._size:
                return
            old, self._pool, self._size = self._pool, self._new_pool(size), size
            self._old_pools.append(old)
        old.shutdown(wait=False)  # queued work still runs; nothing is cancelled
        log.info("executor resized to %d threads", size)

    def set_verify(self, verify: bool) -> None:
        self.verify = self.config.tls_verify_for(verify)

    def dispatcher_alive(self) -> bool:
        return self._dispatcher.is_alive()

    @property
    def size(self) -> int:
        return self._size

    @property
    def busy(self) -> int:
        return self._busy

    def active_tasks(self) -> Dict[str, Task]:
        with self._lock:
            return dict(self._active)

    # -- dispatching -----------------------------------------------------
    def _dispatch_loop(self) -> None:
        while self._running:
            try:
                task = self.task_queue.get(timeout=self.POLL)
            except queue.Empty:
                continue
            self.submit(task)
        # Tasks fetched but never started get an error result now rather
        # than waiting for a pool that is shutting down.
        while True:
            try:
                task = self.task_queue.get_nowait()
            except queue.Empty:
                break
            self.pipeline.task_finished(
                Result.agent_error(task, "agent shutting down", failure="shutdown")
            )

    def submit(self, task: Task) -> None:
        key = new_result_key()
        with self._lock:
            self._active[key] = task
            pool = self._pool
        pool.submit(self._run, task, key)

    def _run(self, task: Task, key: str) -> None:
        with self._lock:
            self._busy += 1
        try:
            with self.pipeline.task_log_context(task.task_id):
                try:
                    result = self.execute(task, key=key)
                except Exception as exc:  # execute() must not raise; a subclass might
                    log.exception("execute() raised for task %s", task.task_id)
                    result = Result.agent_error(task, f"{type(exc).__name__}: {exc}", key=key)
                result.key = key
                with self._lock:
                    still_ours = self._active.pop(key, None) is not None
                if still_ours:
                    self.pipeline.task_finished(result)
                else:
                    self.pipeline.spool.discard_body(key)  # shutdown answered it already
        finally:
            with self._lock:
                self._busy -= 1

    def take_unfinished(self) -> Dict[str, Task]:
        """Claim every task still running (at the shutdown deadline)."""
        with self._lock:
            active, self._active = self._active, {}
        return active

    # -- one task --------------------------------------------------------
    def execute(self, task: Task, *, key: str) -> Result:
        """Run ``task`` and return its result; errors become error results."""
        started = time.monotonic()
        outcome = "error"
        try:
            if task.is_fetch_logs:
                result = self.pipeline.collect_logs(task, key)
            else:
                result = self.request_target(task, key)
            outcome = "ok" if not result.is_error else "error"
            return result
        except TargetFailure as exc:
            self.pipeline.spool.discard_body(key)
            log.warning("task %s failed: %s", task.task_id, exc.reason)
            return Result.agent_error(task, exc.reason, failure=exc.slug, key=key)
        finally:
            self.pipeline.observe_task(outcome, time.monotonic() - started)

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
            reply = self.session.request(
                task.method,
                task.url,
                headers=headers,
                data=body,
                stream=True,
                timeout=(min(self.config.connect_timeout, left), min(self.config.timeout, left)),
                verify=self.verify,
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
        with reply:
            size = self._stream_body(reply, key, deadline)
        return Result(
            fields=echo_fields(task.raw),
            status_code=reply.status_code,
            response_headers=dict(reply.headers),
            body_path=str(self.pipeline.spool.body_path(key)) if size else None,
            body_size=size,
            key=key,
        )

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

    def _stream_body(self, reply: requests.Response, key: str, deadline: float) -> int:
        cap = self.config.max_response_bytes
        size = 0
        spool = self.pipeline.spool
        out = None
        try:
            for chunk in reply.raw.stream(CHUNK, decode_content=True):
                if not chunk:
                    continue
                if out is None:
                    out = spool.open_body(key)
                size += len(chunk)
                if cap and size > cap:
                    raise TargetFailure(f"response larger than {cap} bytes", "too_large")
                out.write(chunk)
                if time.monotonic() > deadline:
                    raise TargetFailure("task expired while reading the response", "timeout")
                if self.pipeline.aborting:
                    raise TargetFailure("agent shutting down", "shutdown")
        except TargetFailure:
            raise
        except urllib3.exceptions.DecodeError as exc:
            raise TargetFailure(
                f"invalid Content-Encoding: {_brief(exc)}", "bad_encoding"
            ) from None
        except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as exc:
            raise TargetFailure(f"target timed out: {_brief(exc)}", "timeout") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise TargetFailure(f"response body broken: {_brief(exc)}", "broken_body") from None
        finally:
            if out is not None:
                out.close()
        return size


def _host_part(value: str) -> str:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``)."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _brief(exc: BaseException) -> str:
    """An exception as one short line: URLs lose query string and userinfo."""
    return scrub_text(f"{type(exc).__name__}: {exc}")[:300]
