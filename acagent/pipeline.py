r"""Pipeline: wires the Fetcher, Executor and Uploader over queues, and runs them.

```
AC --get-task--> Fetcher --task queue--> Executor (N threads) --result queue--> Uploader --> AC
          \________ ACClient: one keep-alive session, BoundedSemaphore(acMaxConcurrent) ______/
```

Every result is written to the spool before it is queued for upload and
removed when the server accepted it (see ``spool.py``).

Stop order (``stop``): stop intake first (the Fetcher stops asking; tasks
fetched but not started are answered "agent shutting down"), let running
tasks finish and keep the Uploader alive while the results drain, all within
``shutdown_timeout``. At the deadline, or on ``stop_now()`` (a second
signal), abort: tasks still running are answered "agent shutting down" in the
spool, pending results stay in the spool, and the threads are joined with a
short timeout. The library never installs signal handlers; the CLI does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, ContextManager, Dict, Mapping, Optional, Type

from . import __version__, logs
from .backpressure import Backpressure
from .client import API_PREFIX, ACClient, force_ipv4
from .config import AgentConfig, parse_host_port
from .executor import Executor
from .fetcher import Fetcher
from .health import HealthServer, ReadinessTracker
from .metrics import AgentMetrics
from .metricsfile import MetricsFileWriter, default_metrics_path, request_tags
from .models import Result, Task, echo_fields
from .ratelimit import RateLimits
from .retry import RetryPolicy
from .spool import ResultSpool
from .uploader import Uploader

log = logging.getLogger("acagent.pipeline")

#: how long threads get to end after the drain deadline passed
JOIN_GRACE = 5.0


class Pipeline:
    """The agent. ``start()``, then ``stop()``; or ``run_forever()``; or ``with Pipeline(...)``.

    Stage classes are pluggable: pass subclasses of ``Fetcher``, ``Executor``
    and ``Uploader``; each is constructed with this pipeline.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        fetcher_class: Type[Fetcher] = Fetcher,
        executor_class: Type[Executor] = Executor,
        uploader_class: Type[Uploader] = Uploader,
        client: Optional[ACClient] = None,
        retry_policy: Optional[RetryPolicy] = None,
        metrics: Optional[AgentMetrics] = None,
    ) -> None:
        self.config = config
        self.version = __version__
        #: set when the agent must stop at once (deadline or second signal)
        self.abort = threading.Event()
        self.metrics = metrics or AgentMetrics()
        self.readiness = ReadinessTracker(config.ready_window)
        if config.ipv4_fallback:
            force_ipv4()
        self.rate_limits = RateLimits(config.rate_limit_per_min)
        self.client = client or ACClient(
            config,
            retry_policy=retry_policy,
            rate_limits=self.rate_limits,
            abort=self.abort,
            on_exchange=self._on_exchange,
        )
        if client is not None:
            client.abort = self.abort
            client.on_exchange = client.on_exchange or self._on_exchange
        self.spool = ResultSpool(config.resolved_spool_dir())
        self.work_dir = tempfile.mkdtemp(prefix="acagent-work-")
        self.backpressure = Backpressure(config.executor_slots, config.response_queue_threshold)
        self.task_queue: queue.Queue[Task] = queue.Queue()
        self.result_queue: queue.Queue[Result] = queue.Queue()
        self._stop_requested = threading.Event()
        #: wakes the monitor thread (stop, or a status line asked for)
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._stop_lock = threading.Lock()
        self._applied: Dict[str, Any] = {}
        self.health: Optional[HealthServer] = None
        self.metrics_file: Optional[MetricsFileWriter] = None
        self.executor = executor_class(self)
        self.uploader = uploader_class(self)
        self.fetcher = fetcher_class(self)
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="acagent-monitor", daemon=True
        )
        self._wire_gauges()

    # ------------------------------------------------------------------ wiring
    def _wire_gauges(self) -> None:
        m = self.metrics
        m.ac_permits_max.set(self.config.ac_max_concurrent)
        m.ac_inflight.set_function(lambda: float(self.client.inflight))
        m.task_queue_size.set_function(lambda: float(self.task_queue.qsize()))
        m.result_queue_size.set_function(lambda: float(self.result_queue.qsize()))
        m.executor_busy_threads.set_function(lambda: float(self.executor.busy))
        m.spool_size.set_function(lambda: float(self.spool.size()))

    def _on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        self.metrics.ac_requests_total.labels(endpoint=endpoint, status=status).inc()
        if endpoint == "s3":
            return
        if status.isdigit() and int(status) < 300:
            self.readiness.record_success()
        elif status == "error" or (status.isdigit() and int(status) >= 500):
            self.readiness.record_failure()
        if self.metrics_file is not None:
            # request_tags drops the query string and any user:password of the URL
            method = "GET" if endpoint in ("get-task", "upload-url") else "POST"
            url = f"{self.config.base_url}{API_PREFIX}{endpoint}"
            tags = request_tags(logs.current_task_id() or "", endpoint, url, method, status)
            self.metrics_file.write_metric(
                "http.request.duration_ms", round(seconds * 1000.0, 3), tags
            )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            raise RuntimeError("a Pipeline can be started once")
        self._started = True
        removed = self.spool.clean_orphans()
        if removed:
            log.info("removed %d orphan file(s) from the spool", removed)
        pending = self.spool.pending()
        for _key, record in pending:
            try:
                self.uploader.park_from_spool(Result.from_record(record))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("spool record %s is unusable (%s); removed", _key, exc)
                self.spool.remove(_key)
        if pending:
            log.info("%d result(s) from an earlier run will be re-sent", len(pending))
        if self.config.enable_metrics_file:
            self.metrics_file = MetricsFileWriter(
                default_metrics_path(self.config.index, self.config.resolved_log_dir()),
                retention_days=self.config.metrics_retention_days,
            )
        if not self.config.verify:
            log.warning("TLS certificate verification is OFF (--verify false): not for production")
        self.uploader.start()
        self.executor.start()
        self.fetcher.start()
        self._monitor.start()
        if self.config.health_addr:
            host, port = parse_host_port(self.config.health_addr)
            self.health = HealthServer(
                host,
                port,
                liveness=self.liveness,
                readiness=self.readiness.check,
                registry=self.metrics.registry,
            )
            self.health.start()
        log.info(
            "agent %s started: executor=%d prefetch=%d threshold=%d acMaxConcurrent=%d rate=%d/min",
            self.client.agent_id,
            self.config.executor_pool_size,
            self.config.prefetch,
            self.config.response_queue_threshold,
            self.config.ac_max_concurrent,
            self.config.rate_limit_per_min,
        )

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Ask ``run_forever`` to stop gracefully. Safe from a signal handler."""
        self._stop_requested.set()
        self._wake.set()

    def stop_now(self) -> None:
        """Cut the graceful stop short (a second signal). Safe from a signal handler."""
        self._hurry.set()
        self.request_stop()

    def request_status(self) -> None:
        """Have the monitor thread log a status line now (SIGUSR1). Signal-safe."""
        self._wake.set()

    def run_forever(self) -> bool:
        """Start, run until ``request_stop()``, then stop. Returns ``stop()``'s answer."""
        self.start()
        while not self._stop_requested.wait(1.0):
            pass
        return self.stop()

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop in order (see the module doc). True if every result was delivered."""
        with self._stop_lock:
            if self._stopped.is_set() or not self._started:
                return True
            budget = self.config.shutdown_timeout if timeout is None else timeout
            deadline = time.monotonic() + budget
            log.info("stopping: intake closed, draining for up to %.0fs", budget)
            self.request_stop()
            self.fetcher.stop()
            self.executor.stop_intake()
            drained = self._drain(deadline)
            if not drained:
                self._abort_unfinished()
            self.uploader.stop()
            self.backpressure.close()
            grace = time.monotonic() + (JOIN_GRACE if drained else 1.0)
            self.fetcher.join(max(0.0, grace - time.monotonic()))
            self.uploader.join(max(0.0, grace - time.monotonic()))
            self.executor.join(max(0.0, grace - time.monotonic()))
            self._monitor.join(max(0.0, grace - time.monotonic()))
            if self.health is not None:
                self.health.stop()
            if self.metrics_file is not None:
                self.metrics_file.close()
            if not self.uploader.is_alive():
                self.client.close()
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._stopped.set()
            left = self.spool.size()
            log.info(
                "stopped (%s); %d result(s) kept in the spool",
                "drained" if drained else "aborted",
                left,
            )
            return drained

    def _drain(self, deadline: float) -> bool:
        """Wait until every fetched task's result is delivered, or time is up."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self._hurry.is_set():
                return False
            # A get-task in flight may still hand us a task; it is answered
            # "agent shutting down" by task_fetched and counted here.
            # Results parked from this run are still outstanding; parked results
            # of earlier runs are not, and simply stay in the spool.
            if (
                self.backpressure.wait_drained(timeout=min(left, 0.2))
                and not self.fetcher.is_alive()
            ):
                return True

    def _abort_unfinished(self) -> None:
        self.abort.set()
        for key, task in self.executor.take_unfinished().items():
            result = Result.agent_error(task, "agent shutting down", failure="shutdown", key=key)
            self.spool.discard_body(key)
            self.spool.save(key, result.to_record())
            self.metrics.tasks_failed_total.labels(reason="shutdown").inc()
        log.warning("shutdown deadline reached: unfinished work is kept in the spool")

    @property
    def aborting(self) -> bool:
        return self.abort.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def wait_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------------ stage callbacks
    def task_fetched(self, task: Task) -> None:
        """The Fetcher got a task (with a backpressure reservation)."""
        self.metrics.tasks_fetched_total.inc()
        if task.global_config:
            self.apply_global_config(task.global_config)
        with logs.task_context(task.task_id):
            log.debug("task fetched: %s", task.method)
            if self.stopping:
                result = Result.agent_error(task, "agent shutting down", failure="shutdown")
                self.task_finished(result)
            elif task.is_expired():
                log.warning("task %s expired before it was fetched; not run", task.task_id)
                self.task_finished(
                    Result.agent_error(task, "task expired before execution", failure="expired")
                )
            else:
                self.task_queue.put(task)

    def task_finished(self, result: Result) -> None:
        """A result is ready: spool it, then queue it for upload."""
        with logs.task_context(result.task_id):
            log.debug("result ready: status=%s bytes=%d", result.status_code, result.body_size)
        self.spool.save(result.key, result.to_record())
        if result.is_error:
            self.metrics.tasks_failed_total.labels(reason=result.failure or "agent_error").inc()
        self.result_queue.put(result)
        self.backpressure.executed()

    def result_delivered(self, result: Result, *, via: Optional[str], counted: bool) -> None:
        """The Uploader is done with a result (accepted, or refused for good)."""
        self.spool.remove(result.key)
        with logs.task_context(result.task_id):
            log.debug("result delivered via %s", via or "nothing (refused)")
        if via is not None:
            self.metrics.tasks_uploaded_total.labels(via=via).inc()
        else:
            self.metrics.tasks_failed_total.labels(reason="upload_failed").inc()
        if counted:
            self.backpressure.uploaded()

    def observe_task(self, outcome: str, seconds: float) -> None:
        self.metrics.tasks_processed_total.labels(outcome=outcome).inc()
        self.metrics.target_request_seconds.observe(seconds)

    def task_log_context(self, task_id: str) -> ContextManager[None]:
        return logs.task_context(task_id)

    def collect_logs(self, task: Task, key: str) -> Result:
        """The fetch-logs task: zip the log folder for upload-logs."""
        target = os.path.join(self.work_dir, f"logs_{key}.zip")
        logs.zip_logs(self.config.resolved_log_dir(), target)
        return Result(fields=echo_fields(task.raw), status_code=200, logs_zip=target, key=key)

    # ------------------------------------------------------------------ runtime settings
    def apply_global_config(self, settings: Mapping[str, Any]) -> None:
        """Apply the server's globalConfig: each key only if present, valid and changed."""
        for key, value in settings.items():
            if self._applied.get(key, object()) == value:
                continue
            if not self._apply_one(key, value):
                log.warning("globalConfig %s=%r ignored (wrong type or range)", key, value)
                continue
            self._applied[key] = value

    def _apply_one(self, key: str, value: Any) -> bool:
        if key in ("debugMode", "verifyCert", "uploadToAC"):
            if not isinstance(value, bool):
                return False
            if key == "debugMode":
                logs.set_debug(value)
            elif key == "verifyCert":
                if not value:
                    log.warning("server turned TLS verification off (globalConfig verifyCert)")
                self.client.set_verify(value)
                self.executor.set_verify(value)
            else:
                self.uploader.upload_to_ac = value
            log.info("globalConfig: %s=%s", key, value)
            return True
        if key in ("poolSize", "rateLimitPerMin"):
            if isinstance(value, bool) or not isinstance(value, int):
                return False
            if key == "poolSize":
                if not 1 <= value <= 2000:
                    return False
                self.executor.resize(value)
                self.backpressure.resize(value + self.config.prefetch)
            else:
                if value < 0:
                    return False
                self.rate_limits.set_rate(value)
            log.info("globalConfig: %s=%s", key, value)
            return True
        return True  # unknown keys are ignored silently: newer servers may add some

    # ------------------------------------------------------------------ health and status
    def liveness(self) -> tuple[bool, str]:
        threads = {
            "fetcher": self.fetcher,
            "uploader": self.uploader,
            "monitor": self._monitor,
        }
        if self.stopping:
            return True, "stopping"
        dead = [name for name, t in threads.items() if not t.is_alive()]
        if not self.executor.dispatcher_alive():
            dead.append("dispatcher")
        if dead:
            return False, "stage thread(s) not running: " + ", ".join(dead)
        return True, "ok"

    def status_line(self) -> str:
        return self.metrics.status_line() + f" parked={self.uploader.parked}"

    def log_status(self) -> None:
        log.info("%s", self.status_line())

    def _monitor_loop(self) -> None:
        while True:
            self._wake.wait(self.config.status_interval)
            self._wake.clear()
            if self._stop_requested.is_set():
                break
            with contextlib.suppress(Exception):
                self.log_status()
