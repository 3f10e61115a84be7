r"""Pipeline: wires the stages to their collaborators, starts them, and stops them in order.

```
AC --get-task--> Fetcher --Ledger.tasks--> Executor --Ledger.results--> Uploader --> AC
         \______ ACClient: one keep-alive session, acMaxConcurrent permits ______/
```

The Pipeline owns no behaviour of its own: task accounting lives in the
``Ledger``, metrics/readiness/globalConfig are observers, and each stage
gets a frozen ``StageContext`` (never the Pipeline). Stages are pluggable as
*factories*: a ``Stage`` subclass or any callable taking the context, e.g.
``functools.partial(JsonlFetcher, path=p)``.

Start is all-or-nothing: the spool folder is locked and the health port
bound before any stage starts; if a step fails, what started is stopped and
nothing is fetched.

Stop order (``stop``): the Fetcher sends no new get-task; one the server
holds open (long poll) is left to end by itself, so a task it brings is run,
until ``shutdown_poll_reserve`` seconds before the deadline (then, or on a
second signal, its connection is shut). Then intake closes (tasks fetched
but not started are answered "agent shutting down"), running tasks finish
and the Uploader keeps delivering while the results drain, all within
``shutdown_timeout``. At the deadline, or on
``stop_now()`` (a second signal), abort: running requests are cut, their
tasks are answered "agent shutting down" in the spool, pending results stay
in the spool, and the threads are joined with a short timeout. The library
never installs signal handlers; the CLI does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple

from . import folders, logs
from ._version import __version__
from .ac.client import ACClient, force_ipv4
from .ac.ratelimit import RateLimits
from .ac.retry import RetryPolicy
from .config import AgentConfig, parse_host_port
from .executor import Executor
from .fetcher import Fetcher
from .globalconfig import GlobalConfigObserver, RuntimeSettings
from .health import HealthServer
from .hints import auth_hint
from .ledger import Ledger
from .metrics import AgentMetrics
from .metricsfile import MetricsFileWriter, default_metrics_path
from .metricsobserver import MetricsFileObserver, MetricsObserver
from .observers import Observer, Observers
from .readiness import Readiness
from .spool import Origin, ResultSpool
from .stage import Stage, StageContext
from .threadcrash import ThreadCrashHook
from .uploader import Uploader

log = logging.getLogger("acagent.pipeline")

#: how long threads get to end after the drain deadline passed
JOIN_GRACE = 5.0

#: seconds between two looks at what signal handlers asked for (``signal_stop``)
SIGNAL_POLL = 0.2

#: a stage factory: a Stage subclass, or any callable taking the context
StageFactory = Callable[[StageContext], Stage]


class Pipeline:
    """The agent. ``start()``, then ``stop()``; or ``run_forever()``; or ``with Pipeline(...)``.

    For callers: ``start``, ``stop``, ``run_forever``, ``request_stop``,
    ``stop_now``, ``request_status`` and ``reload_api_key`` (from any thread),
    ``signal_stop``, ``signal_status`` and ``signal_reload`` (from a signal
    handler), ``liveness``,
    ``readiness``, ``fatal_reason``. Wired parts, read-only: ``config``,
    ``client``, ``ledger``, ``spool``, ``settings``, ``metrics``,
    ``observers``, ``fetcher``, ``executor``, ``uploader``, ``health``.

    ``retry_policy`` sets every wait schedule: the stages' (fetch, breakers,
    per-result retries, stage failures) and, unless a ``client`` is passed,
    the client's (call retries, Redis reconnects).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        fetcher: StageFactory = Fetcher,
        executor: StageFactory = Executor,
        uploader: StageFactory = Uploader,
        client: Optional[ACClient] = None,
        retry_policy: Optional[RetryPolicy] = None,
        metrics: Optional[AgentMetrics] = None,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.config = config
        # A library host's own logging sees no API key or credential either.
        logs.register_secret(config.api_key)
        logs.redact_agent_loggers()
        #: the one stop signal of the stages: set when the agent must stop at once
        self.abort = threading.Event()
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.readiness = Readiness(
            config.ready_window, auth_hint(config), holds=lambda: self.ledger.holds()
        )
        self.observers = Observers((MetricsObserver(self.metrics), self.readiness, *observers))
        if config.ipv4_fallback:
            force_ipv4()
        self.rate_limits = RateLimits(config.rate_limit_per_min)
        #: what globalConfig may change; each setting is held here alone
        self.settings = RuntimeSettings.of(config)
        if client is None:
            client = ACClient(
                config, retry_policy=retry_policy, rate_limits=self.rate_limits, abort=self.abort
            )
        else:
            client.abort = self.abort
            self.rate_limits = client.rate_limits
        client.on_exchange = self._on_exchange
        client.settings = self.settings  # the client reads TLS verification there
        self.client = client
        # The folders must be the agent's own (folders.py) before anything
        # touches them: ConfigError otherwise.
        config.check_paths()
        self.spool = ResultSpool(config.resolved_spool_dir())
        self.ledger = Ledger(
            slots=lambda: self.settings.pool_size + config.prefetch,
            threshold=config.response_queue_threshold,
            spool=self.spool,
            observers=self.observers,
        )
        self.observers.add(
            GlobalConfigObserver(
                self.settings,
                on_pool_size=lambda n: self.ledger.slots_changed(),
                on_rate=self.rate_limits.set_rate,
            )
        )
        self.work_dir = tempfile.mkdtemp(prefix="acagent-work-")
        self.context = StageContext(
            config=config,
            client=self.client,
            ledger=self.ledger,
            spool=self.spool,
            work_dir=self.work_dir,
            abort=self.abort,
            observers=self.observers,
            settings=self.settings,
            retry_policy=retry_policy or self.client.retry_policy,
        )
        self.executor = executor(self.context)
        self.uploader = uploader(self.context)
        self.fetcher = fetcher(self.context)
        self.health: Optional[HealthServer] = None
        self._metrics_file: Optional[MetricsFileWriter] = None
        self._crash_hook = ThreadCrashHook(self._on_thread_crash)
        self._fatal: Optional[str] = None
        self._stop_requested = threading.Event()
        self._hurry = threading.Event()
        self._wake = threading.Event()  # wakes the monitor (stop, or a status line asked for)
        self._stopped = threading.Event()
        # What signal handlers asked for: plain flags, set without a lock (see signal_stop).
        self._signalled_stop = False
        self._signalled_hurry = False
        self._signalled_status = False
        self._signalled_reload = False
        self._started = False
        self._stop_lock = threading.Lock()
        self._monitor = threading.Thread(
            target=self._monitor_loop, name="acagent-monitor", daemon=True
        )
        self._wire_gauges()

    # ------------------------------------------------------------------ wiring
    def _wire_gauges(self) -> None:
        m = self.metrics
        m.ac_permits_max.set(self.config.ac_max_concurrent)
        m.ac_inflight.set_function(lambda: float(self.client.inflight))
        m.task_queue_size.set_function(lambda: float(self.ledger.tasks.qsize()))
        m.result_queue_size.set_function(lambda: float(len(self.ledger.results)))
        m.executor_busy_threads.set_function(lambda: float(_busy(self.executor)))
        m.executor_threads.set_function(lambda: float(self.settings.pool_size))
        m.response_queue_threshold.set(self.config.response_queue_threshold)
        m.results_retrying.set_function(lambda: float(_retrying(self.uploader)))
        m.ready.set_function(lambda: 1.0 if self.readiness.check()[0] else 0.0)
        m.spool_size.set_function(lambda: float(self.spool.size()))
        permits = self.client.permits
        permits.on_wait = m.ac_permit_wait_seconds.observe
        m.ac_permit_holders.set_function(lambda: float(permits.holders))
        m.ac_effective_limit.set_function(lambda: float(permits.effective_limit))
        everyone = getattr(permits, "remote_holders", None)
        if everyone is None:
            m.ac_permit_holders_all.set_function(lambda: float(permits.holders))
        else:
            m.ac_permit_holders_all.set_function(lambda: float(_or_minus_one(everyone())))
        self.readiness.add_check(permits.healthy)

    def _on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        self.observers.emit("on_exchange", endpoint, status, seconds)

    def _on_thread_crash(self, thread_name: str, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = f"thread {thread_name} died: {type(exc).__name__}: {exc}"
        self.request_stop()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start everything, or nothing: on failure what started is stopped and the error raised."""
        if self._started:
            raise RuntimeError("a Pipeline can be started once")
        self._started = True
        started: list[Stage] = []
        try:
            self.spool.lock()  # one agent per spool folder, before anything reads it
            self._mention_legacy_spool()
            self._recover_spool()
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
            if self.config.enable_metrics_file:
                self._metrics_file = MetricsFileWriter(
                    default_metrics_path(self.config.index, self.config.resolved_log_dir()),
                    retention_days=self.config.metrics_retention_days,
                )
                self.observers.add(MetricsFileObserver(self._metrics_file, self.config.base_url))
            if not self.config.verify:
                log.warning(
                    "TLS certificate verification is OFF (--verify false): not for production"
                )
            self._crash_hook.install()
            for stage in (self.uploader, self.executor, self.fetcher):
                stage.start()
                started.append(stage)
            self._monitor.start()
        except BaseException:
            self._undo_start(started)
            raise
        log.info(
            "agent %s %s started: executor=%d prefetch=%d threshold=%d acMaxConcurrent=%d "
            "rate=%d/min spool=%s",
            __version__,
            self.client.agent_id,
            self.config.executor_pool_size,
            self.config.prefetch,
            self.config.response_queue_threshold,
            self.config.ac_max_concurrent,
            self.config.rate_limit_per_min,
            self.spool.directory,
        )

    def _recover_spool(self) -> None:
        """Stamp the spool with this agent's server and key, and have the
        Ledger queue what an earlier run left for them."""
        self.spool.set_origin(Origin.of(self.config.base_url, self.config.api_key))
        self.spool.max_body = self.config.max_response_bytes  # for the headroom rule
        self.ledger.recover()

    def _mention_legacy_spool(self) -> None:
        """Results an earlier version left in its default spool (under the temp
        folder) are not picked up by themselves: say where they are and how."""
        if self.config.spool_dir is not None:
            return
        legacy = os.path.join(folders.legacy_base_dir(), f"spool{self.config.index}")
        try:
            names = os.listdir(legacy)
        except OSError:
            return
        records = sum(name.endswith(".json") for name in names)
        if records:
            log.warning(
                "%d result(s) from an earlier version wait in %s, its default spool; the "
                "default is now %s: run once with --spoolDir %s to deliver them",
                records,
                legacy,
                self.spool.directory,
                legacy,
            )

    def _undo_start(self, started: list[Stage]) -> None:
        self.abort.set()
        self.ledger.close_intake()
        for stage in reversed(started):
            stage.stop()
        self.ledger.close()
        for stage in reversed(started):
            stage.join(JOIN_GRACE)
        if self.health is not None:
            self.health.stop()
        if self._metrics_file is not None:
            self._metrics_file.close()
        self._crash_hook.uninstall()
        self.client.close()
        self.spool.unlock()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self._stopped.set()

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request_stop(self) -> None:
        """Ask ``run_forever`` to stop gracefully. From any thread; from a
        signal handler, use ``signal_stop``."""
        self.client.stop_fetching()
        self._stop_requested.set()
        self._wake.set()

    def stop_now(self) -> None:
        """Cut the graceful stop short. From any thread; from a signal
        handler, use ``signal_stop(hurry=True)``."""
        self._hurry.set()
        self.request_stop()

    def request_status(self) -> None:
        """Have the monitor thread log a status line now. From any thread;
        from a signal handler, use ``signal_status``."""
        self._wake.set()

    def signal_stop(self, *, hurry: bool = False) -> None:
        """From a signal handler: stop gracefully (``hurry``: cut a stop short).

        It only sets flags. A handler runs on the main thread between two of
        its bytecodes, maybe while that thread holds the very lock an
        ``Event.set`` takes (it does, for an instant, each time its wait in
        ``run_forever`` ends): taking it again there would hang the process
        for good. ``run_forever`` and a running ``stop`` act on the flags
        within ``SIGNAL_POLL`` seconds.
        No new get-task is sent from the moment this returns (the client's
        ``fetch_stop`` flag, set without a lock too).
        """
        self.client.stop_fetching(from_signal=True)
        if hurry:
            self._signalled_hurry = True
        self._signalled_stop = True

    def signal_status(self) -> None:
        """From a signal handler (SIGUSR1): a status line soon. Sets a flag only."""
        self._signalled_status = True

    def signal_reload(self) -> None:
        """From a signal handler (SIGHUP): re-read the API key file soon. Sets a flag only."""
        self._signalled_reload = True

    def reload_api_key(self) -> bool:
        """Re-read the API key file now; True if the key changed. From any thread."""
        path = self.config.api_key_file
        if path is None:
            log.info("reload asked: nothing to reload, the API key is not read from a file")
            return False
        changed = self.client.reload_api_key()
        if not changed:
            log.info("reload asked: no new API key in %s", path)
        return changed

    def _take_signals(self) -> bool:
        """Act on what signal handlers asked for (never from a handler); True
        once a stop was asked."""
        if self._signalled_status:
            self._signalled_status = False
            self._wake.set()
        if self._signalled_reload:
            self._signalled_reload = False
            self.reload_api_key()
        if self._signalled_hurry:
            self._hurry.set()
        if self._signalled_stop:
            self.request_stop()
            return True
        return False

    def run_forever(self) -> bool:
        """Start, run until ``request_stop()`` or ``signal_stop()``, then stop.
        Returns ``stop()``'s answer."""
        self.start()
        while not self._stop_requested.wait(SIGNAL_POLL):
            if self._take_signals():
                break
        return self.stop()

    @property
    def fatal_reason(self) -> Optional[str]:
        """Why the agent cannot go on (an agent thread died), or None."""
        return self._fatal

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
            self._end_fetching(deadline - self.config.shutdown_poll_reserve)
            self.ledger.close_intake()
            self.executor.stop()
            drained = self._drain(deadline)
            if not drained:
                self._abort_unfinished()
            self.uploader.stop()
            self.ledger.close()
            grace = time.monotonic() + (JOIN_GRACE if drained else 1.0)
            for stage in (self.fetcher, self.uploader, self.executor):
                if not stage.join(max(0.0, grace - time.monotonic())):
                    log.warning("%s did not end in time", type(stage).__name__)
            self._monitor.join(max(0.0, grace - time.monotonic()))
            self.ledger.remove_delivered(0.0)  # what the cleanup thread had not reached
            if self.health is not None:
                self.health.stop()
            if self._metrics_file is not None:
                self._metrics_file.close()
            if not self.uploader.is_alive():
                self.client.close()
            self._crash_hook.uninstall()
            self.spool.unlock()
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self._stopped.set()
            log.info(
                "stopped (%s); %d result(s) kept in the spool",
                "drained" if drained else "aborted",
                self.spool.size(),
            )
            return drained

    def _end_fetching(self, cut_at: float) -> None:
        """Let a get-task in flight end by itself until ``cut_at`` (or a second
        signal); then shut its connection. The Executor still runs meanwhile,
        so a task the poll brings is run, not answered "shutting down"."""
        while self.fetcher.is_alive():
            self._take_signals()
            left = cut_at - time.monotonic()
            if left <= 0 or self._hurry.is_set():
                if self.client.abandon_fetch():
                    log.info("stopping: the open get-task was cut")
                self.fetcher.join(1.0)
                return
            self.fetcher.join(min(left, SIGNAL_POLL))

    def _drain(self, deadline: float) -> bool:
        """Wait until every fetched task's result is delivered, or time is up."""
        while True:
            left = deadline - time.monotonic()
            self._take_signals()  # a second signal may cut the drain short
            if left <= 0 or self._hurry.is_set():
                return False
            # Results adopted from earlier runs are not counted: they simply
            # stay in the spool if not delivered by now.
            if self.ledger.wait_drained(timeout=min(left, 0.2)) and not self.fetcher.is_alive():
                return True

    def _abort_unfinished(self) -> None:
        self.abort.set()
        take = getattr(self.executor, "take_unfinished", None)
        self.ledger.answer_unfinished(take() if take is not None else {})
        log.warning("shutdown deadline reached: unfinished work is kept in the spool")

    def wait_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    # ------------------------------------------------------------------ health and status
    def liveness(self) -> Tuple[bool, str]:
        if self._fatal is not None:
            return False, self._fatal
        if self.stopping:
            return True, "stopping"
        dead = [name for stage in self._stages() for name in stage.dead_threads()]
        if self._started and not self._monitor.is_alive():
            dead.append(self._monitor.name)
        if dead:
            return False, "stage thread(s) not running: " + ", ".join(dead)
        return True, "ok"

    def _stages(self) -> Tuple[Stage, Stage, Stage]:
        return (self.fetcher, self.executor, self.uploader)

    def status_line(self) -> str:
        holds = self.ledger.holds()
        held = f" held={','.join(sorted(holds))}" if holds else ""
        rate = self.rate_limits.per_minute  # a limit that slows the agent is never a mystery
        limit = f"{rate}/min" if rate else "off"
        # The adaptive AC limit, only while it is below the cap (then ac_inflight
        # can stay below its maximum on purpose): ac_limit=now/cap
        permits = self.client.permits
        below = permits.effective_limit < permits.limit
        ac_limit = f" ac_limit={permits.effective_limit}/{permits.limit}" if below else ""
        return (
            self.metrics.status_line()
            + f" retrying={_retrying(self.uploader)} rate_limit={limit}{ac_limit}{held}"
        )

    def log_status(self) -> None:
        log.info("%s", self.status_line())

    def _monitor_loop(self) -> None:
        while True:
            self._wake.wait(self.config.status_interval)
            self._wake.clear()
            if self._stop_requested.is_set():
                break
            try:
                self.log_status()
            except Exception:  # a status line is never worth a dead thread
                log.debug("status line failed", exc_info=True)


def _or_minus_one(value: Optional[int]) -> int:
    return -1 if value is None else value


def _busy(stage: Any) -> int:
    return int(getattr(stage, "busy", 0))


def _retrying(stage: Any) -> int:
    return int(getattr(stage, "retrying", 0))
