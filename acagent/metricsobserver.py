"""The observers that turn agent events into metrics.

``MetricsObserver`` updates ``AgentMetrics`` (Prometheus); ``MetricsFileObserver``
writes today's JSON-lines metrics file (one line per AC exchange). The stages
never call either: they emit events (see ``observers.py``).
"""

from __future__ import annotations

from typing import Optional

from .ac.client import API_PREFIX, endpoint_method
from .logs import current_task_id
from .metrics import AgentMetrics
from .metricsfile import MetricsFileWriter, request_tags
from .models import Result, Task
from .observers import Observer

#: the reasons fetching is held for (Ledger holds), shown at 0 from the start
#: so an alert sees a series before the first hold
HOLD_REASONS = ("auth", "spool")
#: the bounded label values of ``acagent_result_retries_total`` (``retry_kind``)
RETRY_KINDS = ("concurrency", "rate_limited", "auth", "refused", "http_error", "network", "other")


def retry_kind(reason: str) -> str:
    """The metric label of an upload retry's reason text (a bounded set)."""
    if reason.startswith("Too many concurrent requests"):
        return "concurrency"
    if reason.startswith("rate limited"):
        return "rate_limited"
    if reason in ("HTTP 401", "HTTP 403"):
        return "auth"
    if reason.startswith("refused by the server"):
        return "refused"
    if ": HTTP " in reason:
        return "http_error"
    return "network" if ": " in reason else "other"


class MetricsObserver(Observer):
    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        for reason in HOLD_REASONS:
            metrics.fetch_held.labels(reason=reason).set(0)
        for kind in RETRY_KINDS:
            metrics.result_retries_total.labels(reason=kind)

    def on_task_fetched(self, task: Task) -> None:
        self.metrics.tasks_fetched_total.inc()

    def on_fetch_finished(self, seconds: float, got_task: bool) -> None:
        self.metrics.get_task_seconds.observe(seconds)

    def on_task_executed(self, result: Result, seconds: float) -> None:
        self.metrics.tasks_processed_total.labels(
            outcome="error" if result.is_error else "ok"
        ).inc()
        self.metrics.target_request_seconds.observe(seconds)

    def on_result_ready(self, result: Result) -> None:
        if result.is_error:
            self.metrics.tasks_failed_total.labels(reason=result.failure or "agent_error").inc()

    def on_result_delivered(self, result: Result, via: str, seconds: float) -> None:
        self.metrics.tasks_uploaded_total.labels(via=via).inc()
        self.metrics.upload_seconds.observe(seconds)

    def on_result_quarantined(self, result: Result, reason: str) -> None:
        self.metrics.tasks_failed_total.labels(reason="refused").inc()

    def on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        self.metrics.ac_requests_total.labels(endpoint=endpoint, status=status).inc()

    def on_result_retry(self, result: Result, reason: str, wait: float) -> None:
        self.metrics.result_retries_total.labels(reason=retry_kind(reason)).inc()
        self.metrics.result_retry_wait_seconds.observe(wait)

    def on_hold(self, reason_key: str, message: Optional[str]) -> None:
        self.metrics.fetch_held.labels(reason=reason_key).set(0 if message is None else 1)


class MetricsFileObserver(Observer):
    """One ``http.request.duration_ms`` line per AC exchange, as today's agent writes."""

    def __init__(self, writer: MetricsFileWriter, base_url: str) -> None:
        self.writer = writer
        self.base_url = base_url

    def on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        if endpoint == "s3" or status == "resend":
            return
        # request_tags drops the query string and any user:password of the URL
        url = f"{self.base_url}{API_PREFIX}{endpoint}"
        tags = request_tags(
            current_task_id() or "", endpoint, url, endpoint_method(endpoint), status
        )
        self.writer.write_metric("http.request.duration_ms", round(seconds * 1000.0, 3), tags)
