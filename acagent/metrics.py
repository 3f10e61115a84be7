"""The agent's Prometheus metrics, built on ``prometheus_client``.

``AgentMetrics`` is the fixed set of counters, gauges and histograms the
pipeline updates, registered on one ``CollectorRegistry``. By default each
``AgentMetrics`` makes its own registry (with the process and platform
collectors), so two Pipelines in one process never mix their numbers. A
service that embeds the agent passes its own registry instead, and the agent's
metrics appear on the service's ``/metrics``.

The JSON-lines metrics file of today's agent is ``acagent.metricsfile``.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Callable, Deque, Dict, Mapping, Optional, Tuple

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.registry import Collector

from ._version import __version__

__all__ = [
    "DEFAULT_BUCKETS",
    "NAMESPACE",
    "AgentMetrics",
    "RateWindow",
    "metric_value",
]

#: Every metric name starts with ``acagent_``.
NAMESPACE = "acagent"

#: Seconds. Covers fast local calls up to long-polled get-task and slow uploads.
DEFAULT_BUCKETS: Tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


def metric_value(metric: Collector, **labels: str) -> float:
    """The current value of one metric, read through its public ``collect()``.

    A counter gives its ``_total``, a gauge its value, a histogram its
    ``_count``. Label sets that ``labels`` does not pin are summed, so
    ``metric_value(tasks_failed_total)`` is the total over every reason and
    ``metric_value(tasks_processed_total, outcome="ok")`` one series.
    """
    total = 0.0
    for family in metric.collect():
        suffix = {"counter": "_total", "histogram": "_count"}.get(family.type, "")
        wanted = family.name + suffix
        for sample in family.samples:
            if sample.name == wanted and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ---------------------------------------------------------------------------
# rates over a sliding window
# ---------------------------------------------------------------------------
class RateWindow:
    """Per-minute rates of counters over the last ``window`` seconds.

    Call ``sample(values)`` with the current counter totals (the status loop
    does, once per status line); ``rates_per_minute()`` compares the newest
    sample with the newest one at least ``window`` old (or the oldest kept).
    Samples closer together than ``window / 120`` are merged, so memory stays
    bounded however often it is called.
    """

    def __init__(
        self, window: float = 60.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = window
        self._clock = clock
        self._min_gap = window / 120.0
        self._lock = threading.Lock()
        self._samples: Deque[Tuple[float, Dict[str, float]]] = collections.deque()

    def sample(self, values: Mapping[str, float], now: Optional[float] = None) -> None:
        t = self._clock() if now is None else now
        with self._lock:
            if len(self._samples) >= 2 and t - self._samples[-2][0] < self._min_gap:
                self._samples[-1] = (t, dict(values))
            else:
                self._samples.append((t, dict(values)))
            cutoff = t - self.window
            while len(self._samples) >= 2 and self._samples[1][0] <= cutoff:
                self._samples.popleft()

    def rates_per_minute(self) -> Dict[str, float]:
        with self._lock:
            if len(self._samples) < 2:
                keys = self._samples[-1][1] if self._samples else {}
                return {k: 0.0 for k in keys}
            t0, first = self._samples[0]
            t1, last = self._samples[-1]
        elapsed = t1 - t0
        rates: Dict[str, float] = {}
        for key, value in last.items():
            delta = value - first.get(key, 0.0)
            if delta < 0:  # counter reset: count from zero
                delta = value
            rates[key] = delta * 60.0 / elapsed if elapsed > 0 else 0.0
        return rates


# ---------------------------------------------------------------------------
# the agent's fixed metric set
# ---------------------------------------------------------------------------
class AgentMetrics:
    """The metrics the pipeline updates. Attribute names are part of the API.

    ``registry``: where the metrics are registered. None (the default) makes
    a new ``CollectorRegistry`` with the process and platform collectors, so
    each instance stands alone. A registry passed in (e.g. the host service's
    ``prometheus_client.REGISTRY``) gets only the agent's own metrics: it is
    expected to carry the process collectors already. Two ``AgentMetrics`` on
    one registry raise ``ValueError`` (duplicated time series), as
    ``prometheus_client`` does for any name clash.
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        r = self.registry = registry
        ns = NAMESPACE
        self.build_info = Info("build", "Version of the acagent library.", namespace=ns, registry=r)
        self.build_info.info({"version": __version__})
        self.tasks_fetched_total = Counter(
            "tasks_fetched", "Tasks received from get-task.", namespace=ns, registry=r
        )
        self.tasks_processed_total = Counter(
            "tasks_processed",
            "Tasks executed, by outcome (ok: the target answered; error: agent-side error).",
            ("outcome",),
            namespace=ns,
            registry=r,
        )
        self.tasks_uploaded_total = Counter(
            "tasks_uploaded",
            "Results accepted by the server, by path (inline, empty, upload, s3, error).",
            ("via",),
            namespace=ns,
            registry=r,
        )
        self.tasks_failed_total = Counter(
            "tasks_failed",
            "Tasks that ended in an Agent Side Error, by reason.",
            ("reason",),
            namespace=ns,
            registry=r,
        )
        self.ac_requests_total = Counter(
            "ac_requests",
            "Requests to the AC server (and S3), by endpoint and HTTP status or 'error'.",
            ("endpoint", "status"),
            namespace=ns,
            registry=r,
        )
        self.ac_inflight = Gauge(
            "ac_inflight", "Requests open to the AC server now.", namespace=ns, registry=r
        )
        self.ac_permits_max = Gauge(
            "ac_permits_max",
            "Most requests the agent may have open to the AC server.",
            namespace=ns,
            registry=r,
        )
        self.ac_effective_limit = Gauge(
            "ac_effective_limit",
            "AC requests the agent opens at once now: the adaptive limit, at most "
            "ac_permits_max (halved by 'Too many concurrent requests', back "
            "after clean calls; shared by the agents on the key with coordination).",
            namespace=ns,
            registry=r,
        )
        self.task_queue_size = Gauge(
            "task_queue_size", "Tasks waiting for an executor thread.", namespace=ns, registry=r
        )
        self.result_queue_size = Gauge(
            "result_queue_size", "Results waiting for upload.", namespace=ns, registry=r
        )
        self.executor_busy_threads = Gauge(
            "executor_busy_threads",
            "Executor threads running a task now.",
            namespace=ns,
            registry=r,
        )
        self.spool_size = Gauge(
            "spool_size", "Results kept on disk waiting to be re-sent.", namespace=ns, registry=r
        )
        self.get_task_seconds = Histogram(
            "get_task_seconds",
            "Duration of get-task calls (long polls included).",
            namespace=ns,
            registry=r,
            buckets=DEFAULT_BUCKETS,
        )
        self.target_request_seconds = Histogram(
            "target_request_seconds",
            "Duration of target requests, body download included.",
            namespace=ns,
            registry=r,
            buckets=DEFAULT_BUCKETS,
        )
        self.upload_seconds = Histogram(
            "upload_seconds",
            "Duration of result uploads (put-result, upload-result, S3).",
            namespace=ns,
            registry=r,
            buckets=DEFAULT_BUCKETS,
        )
        self.ac_permit_wait_seconds = Histogram(
            "ac_permit_wait_seconds",
            "How long AC calls waited for a permit (local, or shared through Redis).",
            namespace=ns,
            registry=r,
            buckets=DEFAULT_BUCKETS,
        )
        self.ac_permit_holders = Gauge(
            "ac_permit_holders",
            "AC permits held by this agent now.",
            namespace=ns,
            registry=r,
        )
        self.ac_permit_holders_all = Gauge(
            "ac_permit_holders_all",
            "AC permits held by every agent on this API key (shared permits; -1 if unknown).",
            namespace=ns,
            registry=r,
        )
        self.ready = Gauge(
            "ready", "1 while /readyz answers ready, else 0.", namespace=ns, registry=r
        )
        self.fetch_held = Gauge(
            "fetch_held",
            "1 while fetching is held for this reason (auth, spool, ...), else 0.",
            ("reason",),
            namespace=ns,
            registry=r,
        )
        self.result_retries_total = Counter(
            "result_retries",
            "Failed upload attempts that will be retried, by reason.",
            ("reason",),
            namespace=ns,
            registry=r,
        )
        self.result_retry_wait_seconds = Histogram(
            "result_retry_wait_seconds",
            "Waits before an upload is retried (a 429's Retry-After included).",
            namespace=ns,
            registry=r,
            buckets=DEFAULT_BUCKETS,
        )
        self.results_retrying = Gauge(
            "results_retrying",
            "Results waiting for a retry of their upload now.",
            namespace=ns,
            registry=r,
        )
        self.response_queue_threshold = Gauge(
            "response_queue_threshold",
            "Results waiting for upload at which fetching pauses (--responseQueueThreshold).",
            namespace=ns,
            registry=r,
        )
        self.executor_threads = Gauge(
            "executor_threads",
            "Executor threads (--executorPoolSize, or globalConfig poolSize).",
            namespace=ns,
            registry=r,
        )
        self.rate_window = RateWindow(60.0, clock=clock)

    def counter_totals(self) -> Dict[str, float]:
        """fetched/processed/uploaded/failed, each summed over its labels."""
        return {
            "fetched": metric_value(self.tasks_fetched_total),
            "processed": metric_value(self.tasks_processed_total),
            "uploaded": metric_value(self.tasks_uploaded_total),
            "failed": metric_value(self.tasks_failed_total),
        }

    def rates_per_minute(self, now: Optional[float] = None) -> Dict[str, float]:
        """Takes a sample of the counters, then returns fetched/processed/uploaded/failed
        per minute over the last 60 s."""
        self.rate_window.sample(self.counter_totals(), now)
        return self.rate_window.rates_per_minute()

    def status_snapshot(self) -> Dict[str, float]:
        """The numbers a status line needs (counter totals and current gauges)."""
        snap = self.counter_totals()
        snap.update(
            {
                "processed_ok": metric_value(self.tasks_processed_total, outcome="ok"),
                "processed_error": metric_value(self.tasks_processed_total, outcome="error"),
                "ac_requests": metric_value(self.ac_requests_total),
                "ac_inflight": metric_value(self.ac_inflight),
                "ac_permits_max": metric_value(self.ac_permits_max),
                "ac_effective_limit": metric_value(self.ac_effective_limit),
                "task_queue_size": metric_value(self.task_queue_size),
                "result_queue_size": metric_value(self.result_queue_size),
                "executor_busy_threads": metric_value(self.executor_busy_threads),
                "spool_size": metric_value(self.spool_size),
            }
        )
        return snap

    def status_line(self, now: Optional[float] = None) -> str:
        """One human line for the periodic status log (samples the rate window)."""
        s = self.status_snapshot()
        r = self.rates_per_minute(now)

        def n(v: float) -> str:
            if not math.isfinite(v):  # a gauge function that failed or lied
                return "?"
            return str(int(v)) if v == int(v) else f"{v:g}"

        return (
            f"status: fetched={n(s['fetched'])} processed={n(s['processed'])} "
            f"uploaded={n(s['uploaded'])} failed={n(s['failed'])} | "
            f"queue task={n(s['task_queue_size'])} result={n(s['result_queue_size'])} "
            f"spool={n(s['spool_size'])} | busy={n(s['executor_busy_threads'])} "
            f"ac_inflight={n(s['ac_inflight'])}/{n(s['ac_permits_max'])} | per-min "
            f"fetched={r.get('fetched', 0.0):.1f} processed={r.get('processed', 0.0):.1f} "
            f"uploaded={r.get('uploaded', 0.0):.1f} failed={r.get('failed', 0.0):.1f}"
        )
