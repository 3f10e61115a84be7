"""Metrics: a small thread-safe registry, Prometheus text exposition, and the
JSON-lines metrics file of today's agent.

No third-party client library: counters, gauges and fixed-bucket histograms are
a few dozen lines each, and the text format (version 0.0.4) is simple::

    # HELP acagent_tasks_fetched_total Tasks received from get-task.
    # TYPE acagent_tasks_fetched_total counter
    acagent_tasks_fetched_total 42

``AgentMetrics`` is the fixed set the pipeline updates; ``MetricsFileWriter``
writes today's ``metrics<index>.json`` file.
"""

from __future__ import annotations

import bisect
import collections
import json
import logging
import logging.handlers
import math
import os
import re
import threading
import time
from types import TracebackType
from typing import (
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)
from urllib.parse import urlsplit, urlunsplit

from .config import default_base_dir

__all__ = [
    "DEFAULT_BUCKETS",
    "PREFIX",
    "AgentMetrics",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsFileWriter",
    "MetricsRegistry",
    "RateWindow",
    "Sample",
    "default_metrics_path",
    "request_tags",
]

log = logging.getLogger(__name__)

#: Every metric name starts with this.
PREFIX = "acagent_"

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

_METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelKey = Tuple[str, ...]
Number = Union[int, float]


class Sample(NamedTuple):
    """One exposed sample: full name, labels, value."""

    name: str
    labels: Dict[str, str]
    value: float


# ---------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------
def escape_label_value(value: str) -> str:
    """Escape a label value for the text format: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as the text format wants it (``+Inf``, ``-Inf``, ``NaN``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _format_le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _format_labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values))
    return "{" + inner + "}"


# ---------------------------------------------------------------------------
# metric types
# ---------------------------------------------------------------------------
class _Metric:
    """Shared parts: name, help, label names, the lock and label-key building."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        if not _METRIC_NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labelnames)
        for label in names:
            if not _LABEL_NAME_RE.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for metric {name}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate label name for metric {name}: {names!r}")
        self.name = name
        self.help = help
        self.labelnames: Tuple[str, ...] = names
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelKey:
        if len(labels) != len(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        try:
            return tuple(str(labels[n]) for n in self.labelnames)
        except KeyError:
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            ) from None

    def samples(self) -> List[Sample]:  # pragma: no cover - overridden
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for sample in self.samples():
            label_text = _format_labels(list(sample.labels), list(sample.labels.values()))
            lines.append(f"{sample.name}{label_text} {format_value(sample.value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A monotonically increasing value per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: Dict[LabelKey, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter can only go up, got {amount}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def total(self) -> float:
        """Sum over every label set."""
        with self._lock:
            return sum(self._values.values())

    def by_label(self) -> Dict[LabelKey, float]:
        with self._lock:
            return dict(self._values)

    def samples(self) -> List[Sample]:
        with self._lock:
            items = sorted(self._values.items())
        return [Sample(self.name, dict(zip(self.labelnames, k)), v) for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down, or is read from a function at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: Dict[LabelKey, float] = {}
        self._functions: Dict[LabelKey, Callable[[], float]] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def set(self, v: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._functions.pop(key, None)
            self._values[key] = float(v)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def set_function(self, fn: Callable[[], float], **labels: str) -> None:
        """Read the value from ``fn()`` whenever it is asked for (e.g. a queue size)."""
        key = self._key(labels)
        with self._lock:
            self._functions[key] = fn

    def value(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            fn = self._functions.get(key)
            stored = self._values.get(key, 0.0)
        if fn is None:
            return stored
        return _call_gauge_function(self.name, fn)

    def samples(self) -> List[Sample]:
        with self._lock:
            values = dict(self._values)
            functions = dict(self._functions)
        out: List[Sample] = []
        for key in sorted(set(values) | set(functions)):
            fn = functions.get(key)
            v = values.get(key, 0.0) if fn is None else _call_gauge_function(self.name, fn)
            out.append(Sample(self.name, dict(zip(self.labelnames, key)), v))
        return out


def _call_gauge_function(name: str, fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # a broken callback must not break a scrape
        log.debug("gauge %s: value function failed", name, exc_info=True)
        return math.nan


class _HistogramChild:
    __slots__ = ("count", "counts", "sum")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * nbuckets
        self.sum = 0.0
        self.count = 0


class _Timer:
    """Context manager: observes the elapsed seconds into a histogram on exit."""

    __slots__ = ("_histogram", "_labels", "_start", "elapsed")

    def __init__(self, histogram: Histogram, labels: Dict[str, str]) -> None:
        self._histogram = histogram
        self._labels = labels
        self._start = 0.0
        self.elapsed = 0.0

    def __enter__(self) -> _Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.elapsed = time.perf_counter() - self._start
        self._histogram.observe(self.elapsed, **self._labels)


class Histogram(_Metric):
    """Fixed-bucket histogram: cumulative ``_bucket{le=..}``, ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        labelnames: Sequence[str] = (),
    ) -> None:
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets]
        if not bounds or any(math.isnan(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be numbers")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be strictly increasing, got {bounds}")
        if not math.isinf(bounds[-1]):
            bounds.append(math.inf)
        self.buckets: Tuple[float, ...] = tuple(bounds)
        self._children: Dict[LabelKey, _HistogramChild] = {}
        if not self.labelnames:
            self._children[()] = _HistogramChild(len(self.buckets))

    def observe(self, v: float, **labels: str) -> None:
        key = self._key(labels)
        if math.isnan(v):
            return  # would poison _sum; there is no bucket for it
        index = bisect.bisect_left(self.buckets, v)  # first bound >= v ("le")
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = _HistogramChild(len(self.buckets))
            child.counts[min(index, len(self.buckets) - 1)] += 1
            child.sum += v
            child.count += 1

    def time(self, **labels: str) -> _Timer:
        """``with histogram.time(): ...`` observes the block's duration in seconds."""
        self._key(labels)  # validate now, not at exit
        return _Timer(self, dict(labels))

    def count(self, **labels: str) -> int:
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            return child.count if child else 0

    def sum(self, **labels: str) -> float:
        key = self._key(labels)
        with self._lock:
            child = self._children.get(key)
            return child.sum if child else 0.0

    def samples(self) -> List[Sample]:
        with self._lock:
            snapshot = [
                (key, list(child.counts), child.sum, child.count)
                for key, child in sorted(self._children.items())
            ]
        out: List[Sample] = []
        for key, counts, total, count in snapshot:
            base = dict(zip(self.labelnames, key))
            running = 0
            for bound, n in zip(self.buckets, counts):
                running += n
                labels = dict(base)
                labels["le"] = _format_le(bound)
                out.append(Sample(self.name + "_bucket", labels, float(running)))
            out.append(Sample(self.name + "_sum", dict(base), total))
            out.append(Sample(self.name + "_count", dict(base), float(count)))
        return out


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
class MetricsRegistry:
    """Holds metrics by name and renders them in the Prometheus text format.

    Names are given without the ``acagent_`` prefix (it is added); counter
    names get a ``_total`` suffix if they lack one. Registering the same name
    again with the same type and labels returns the existing metric.
    """

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._metrics: Dict[str, _Metric] = {}

    def _full_name(self, name: str) -> str:
        return name if name.startswith(self.prefix) else self.prefix + name

    def _register(self, metric: _Metric) -> _Metric:
        with self._lock:
            existing = self._metrics.get(metric.name)
            if existing is not None:
                same = type(existing) is type(metric) and existing.labelnames == metric.labelnames
                if isinstance(existing, Histogram) and isinstance(metric, Histogram):
                    same = same and existing.buckets == metric.buckets
                if not same:
                    raise ValueError(f"metric {metric.name} already registered differently")
                return existing
            self._metrics[metric.name] = metric
            return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        full = self._full_name(name)
        if not full.endswith("_total"):
            full += "_total"
        metric = self._register(Counter(full, help, labelnames))
        assert isinstance(metric, Counter)
        return metric

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric = self._register(Gauge(self._full_name(name), help, labelnames))
        assert isinstance(metric, Gauge)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        labelnames: Sequence[str] = (),
    ) -> Histogram:
        metric = self._register(Histogram(self._full_name(name), help, buckets, labelnames))
        assert isinstance(metric, Histogram)
        return metric

    def get(self, name: str) -> Optional[_Metric]:
        with self._lock:
            return self._metrics.get(self._full_name(name))

    def metrics(self) -> List[_Metric]:
        with self._lock:
            return list(self._metrics.values())

    def samples(self) -> Iterator[Sample]:
        """Every sample of every metric, in registration order."""
        for metric in self.metrics():
            yield from metric.samples()

    def render_prometheus(self) -> str:
        """The text exposition format, version 0.0.4."""
        return "".join(metric.render() for metric in self.metrics())


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
    """The metrics the pipeline updates. Attribute names are part of the API."""

    def __init__(
        self,
        registry: Optional[MetricsRegistry] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        r = registry if registry is not None else MetricsRegistry()
        self.registry = r
        self.tasks_fetched_total = r.counter("tasks_fetched_total", "Tasks received from get-task.")
        self.tasks_processed_total = r.counter(
            "tasks_processed_total",
            "Tasks executed, by outcome (ok: the target answered; error: agent-side error).",
            ("outcome",),
        )
        self.tasks_uploaded_total = r.counter(
            "tasks_uploaded_total",
            "Results accepted by the server, by path (inline, empty, upload, s3, error).",
            ("via",),
        )
        self.tasks_failed_total = r.counter(
            "tasks_failed_total", "Tasks that ended in an Agent Side Error, by reason.", ("reason",)
        )
        self.ac_requests_total = r.counter(
            "ac_requests_total",
            "Requests to the AC server (and S3), by endpoint and HTTP status or 'error'.",
            ("endpoint", "status"),
        )
        self.ac_inflight = r.gauge("ac_inflight", "Requests open to the AC server now.")
        self.ac_permits_max = r.gauge(
            "ac_permits_max", "Most requests the agent may have open to the AC server."
        )
        self.task_queue_size = r.gauge("task_queue_size", "Tasks waiting for an executor thread.")
        self.result_queue_size = r.gauge("result_queue_size", "Results waiting for upload.")
        self.executor_busy_threads = r.gauge(
            "executor_busy_threads", "Executor threads running a task now."
        )
        self.spool_size = r.gauge("spool_size", "Results kept on disk waiting to be re-sent.")
        self.get_task_seconds = r.histogram(
            "get_task_seconds", "Duration of get-task calls (long polls included)."
        )
        self.target_request_seconds = r.histogram(
            "target_request_seconds", "Duration of target requests, body download included."
        )
        self.upload_seconds = r.histogram(
            "upload_seconds", "Duration of result uploads (put-result, upload-result, S3)."
        )
        self.rate_window = RateWindow(60.0, clock=clock)

    def counter_totals(self) -> Dict[str, float]:
        return {
            "fetched": self.tasks_fetched_total.total(),
            "processed": self.tasks_processed_total.total(),
            "uploaded": self.tasks_uploaded_total.total(),
            "failed": self.tasks_failed_total.total(),
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
                "processed_ok": self.tasks_processed_total.value(outcome="ok"),
                "processed_error": self.tasks_processed_total.value(outcome="error"),
                "ac_requests": self.ac_requests_total.total(),
                "ac_inflight": self.ac_inflight.value(),
                "ac_permits_max": self.ac_permits_max.value(),
                "task_queue_size": self.task_queue_size.value(),
                "result_queue_size": self.result_queue_size.value(),
                "executor_busy_threads": self.executor_busy_threads.value(),
                "spool_size": self.spool_size.value(),
            }
        )
        return snap

    def status_line(self, now: Optional[float] = None) -> str:
        """One human line for the periodic status log (samples the rate window)."""
        s = self.status_snapshot()
        r = self.rates_per_minute(now)

        def n(v: float) -> str:
            return format_value(v) if not math.isnan(v) else "?"

        return (
            f"status: fetched={n(s['fetched'])} processed={n(s['processed'])} "
            f"uploaded={n(s['uploaded'])} failed={n(s['failed'])} | "
            f"queue task={n(s['task_queue_size'])} result={n(s['result_queue_size'])} "
            f"spool={n(s['spool_size'])} | busy={n(s['executor_busy_threads'])} "
            f"ac_inflight={n(s['ac_inflight'])}/{n(s['ac_permits_max'])} | per-min "
            f"fetched={r.get('fetched', 0.0):.1f} processed={r.get('processed', 0.0):.1f} "
            f"uploaded={r.get('uploaded', 0.0):.1f} failed={r.get('failed', 0.0):.1f}"
        )


# ---------------------------------------------------------------------------
# today's JSON-lines metrics file
# ---------------------------------------------------------------------------
def default_metrics_path(index: str = "_prod", log_dir: Optional[str] = None) -> str:
    """``<log_dir>/metrics/metrics<index>.json``; ``log_dir`` defaults to
    ``<tmp>/armorcode/log``, as today's agent."""
    base = log_dir or os.path.join(default_base_dir(), "log")
    return os.path.join(base, "metrics", f"metrics{index}.json")


def strip_url(url: str) -> str:
    """``url`` without query string, fragment and user:password."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]


def request_tags(
    task_id: str,
    operation: str,
    url: str,
    method: str,
    status_code: Union[int, str, None],
    **extra: object,
) -> Dict[str, str]:
    """Tags of an ``http.request.duration_ms`` metric, as today's agent writes them.

    The url loses its query string, fragment and credentials; ``domain`` is its host.
    """
    try:
        domain = urlsplit(url).hostname or ""
    except ValueError:
        domain = ""
    tags = {
        "task_id": str(task_id),
        "operation": str(operation),
        "url": strip_url(url),
        "domain": domain,
        "method": str(method).upper(),
        "status_code": "" if status_code is None else str(status_code),
    }
    for key, value in extra.items():
        tags[str(key)] = str(value)
    return tags


class MetricsFileWriter:
    """Appends ``{"@timestamp", "metric_name", "value", "tags"}`` lines to a daily file.

    Lines are buffered and written by a flush thread every ``flush_interval``
    seconds (``flush_interval=0``: written on every call, no thread). The file
    rotates at midnight; ``retention_days`` old files are kept (0 = all).
    """

    def __init__(
        self,
        path: str,
        *,
        retention_days: int = 7,
        flush_interval: float = 1.0,
        max_buffer: int = 10_000,
    ) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._handler = logging.handlers.TimedRotatingFileHandler(
            path, when="midnight", backupCount=max(0, retention_days), encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._buffer: List[str] = []
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._max_buffer = max(1, max_buffer)
        self._flush_interval = flush_interval
        self._stop = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        if flush_interval > 0:
            self._thread = threading.Thread(
                target=self._run, name="acagent-metrics-file", daemon=True
            )
            self._thread.start()

    def write_metric(
        self,
        name: str,
        value: Number,
        tags: Optional[Mapping[str, object]] = None,
        *,
        timestamp_ms: Optional[int] = None,
    ) -> None:
        if self._closed:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric value must be a number, got {value!r}")
        if not math.isfinite(value):
            return
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        line = json.dumps(
            {
                "@timestamp": ts,
                "metric_name": str(name),
                "value": value,
                "tags": {str(k): str(v) for k, v in (tags or {}).items()},
            }
        )
        with self._buffer_lock:
            self._buffer.append(line)
            full = len(self._buffer) >= self._max_buffer
        if full or self._thread is None:
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            with self._buffer_lock:
                lines, self._buffer = self._buffer, []
            if not lines:
                return
            record = logging.LogRecord(
                "acagent.metrics.file", logging.INFO, __file__, 0, "\n".join(lines), None, None
            )
            self._handler.handle(record)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            try:
                self.flush()
            except Exception:  # keep flushing after a transient disk error
                log.warning("metrics file: write failed", exc_info=True)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()
        self._handler.close()

    def __enter__(self) -> MetricsFileWriter:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
