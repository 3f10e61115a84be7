"""AgentMetrics on prometheus_client: names, registries, /metrics, rates and the status line."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import requests
from helpers import WAIT, make_config, wait_until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import acagent
from acagent import AgentConfig, Pipeline
from acagent.health import METRICS_CONTENT_TYPE, HealthServer
from acagent.hints import CONCURRENCY_HINT
from acagent.metrics import DEFAULT_BUCKETS, AgentMetrics, RateWindow, metric_value
from acagent.metricsobserver import HOLD_REASONS, RETRY_KINDS, MetricsObserver, retry_kind
from acagent.testing import FakeACServer, FakeTarget

HTTP_TIMEOUT = 5.0

#: family name (as prometheus_client's parser reports it) -> type; the parser
#: drops a counter's ``_total``, the exposed samples keep it.
EXPECTED = {
    "acagent_tasks_fetched": "counter",
    "acagent_tasks_processed": "counter",
    "acagent_tasks_uploaded": "counter",
    "acagent_tasks_failed": "counter",
    "acagent_ac_requests": "counter",
    "acagent_ac_inflight": "gauge",
    "acagent_ac_permits_max": "gauge",
    "acagent_task_queue_size": "gauge",
    "acagent_result_queue_size": "gauge",
    "acagent_executor_busy_threads": "gauge",
    "acagent_spool_size": "gauge",
    "acagent_get_task_seconds": "histogram",
    "acagent_target_request_seconds": "histogram",
    "acagent_upload_seconds": "histogram",
    "acagent_build_info": "gauge",  # an Info is a gauge of 1 in the text format 0.0.4
}

LabelSet = Tuple[Tuple[str, str], ...]


def parse(text: str) -> Tuple[Dict[str, str], Dict[Tuple[str, LabelSet], float]]:
    """Family types by name, and every sample by (name, sorted labels)."""
    types: Dict[str, str] = {}
    samples: Dict[Tuple[str, LabelSet], float] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return types, samples


def value(samples: Dict[Tuple[str, LabelSet], float], name: str, **labels: str) -> Optional[float]:
    return samples.get((name, tuple(sorted(labels.items()))))


def exposition(metrics: AgentMetrics) -> str:
    return generate_latest(metrics.registry).decode("utf-8")


# ---------------------------------------------------------------------------
# the fixed set and its registry
# ---------------------------------------------------------------------------
def test_agent_metrics_exposes_the_fixed_set_under_todays_names() -> None:
    m = AgentMetrics()
    m.tasks_fetched_total.inc()
    m.tasks_processed_total.labels(outcome="ok").inc()
    m.tasks_uploaded_total.labels(via="inline").inc()
    m.tasks_failed_total.labels(reason="timeout").inc()
    m.ac_requests_total.labels(endpoint="get-task", status="200").inc()
    m.ac_requests_total.labels(endpoint="put-result", status="error").inc()
    m.ac_permits_max.set(2)
    m.ac_inflight.inc()
    m.task_queue_size.set_function(lambda: 4)
    m.get_task_seconds.observe(0.2)
    with m.upload_seconds.time():
        pass
    m.target_request_seconds.observe(1.5)

    types, samples = parse(exposition(m))
    for name, kind in EXPECTED.items():
        assert types.get(name) == kind, name
    assert value(samples, "acagent_tasks_fetched_total") == 1
    assert value(samples, "acagent_tasks_processed_total", outcome="ok") == 1
    assert value(samples, "acagent_tasks_uploaded_total", via="inline") == 1
    assert value(samples, "acagent_tasks_failed_total", reason="timeout") == 1
    assert value(samples, "acagent_ac_requests_total", endpoint="put-result", status="error") == 1
    assert value(samples, "acagent_ac_inflight") == 1
    assert value(samples, "acagent_ac_permits_max") == 2
    assert value(samples, "acagent_task_queue_size") == 4
    assert value(samples, "acagent_get_task_seconds_count") == 1
    assert value(samples, "acagent_upload_seconds_count") == 1
    assert value(samples, "acagent_target_request_seconds_sum") == 1.5
    assert value(samples, "acagent_build_info", version=acagent.__version__) == 1

    # today's buckets, same le values as before, cumulative
    bounds = sorted(
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "acagent_target_request_seconds_bucket"
    )
    assert bounds == [*DEFAULT_BUCKETS, math.inf]
    assert value(samples, "acagent_target_request_seconds_bucket", le="1.0") == 0
    assert value(samples, "acagent_target_request_seconds_bucket", le="2.5") == 1


def test_the_default_registry_is_new_per_instance_with_process_and_platform() -> None:
    m = AgentMetrics()
    types, samples = parse(exposition(m))
    assert types.get("python_info") == "gauge"
    major, minor = sys.version_info[:2]
    assert any(
        name == "python_info"
        and dict(labels)["major"] == str(major)
        and dict(labels)["minor"] == str(minor)
        for (name, labels) in samples
    )
    if sys.platform.startswith("linux"):  # the process collector reads /proc
        assert types.get("process_cpu_seconds") == "counter"
        assert (value(samples, "process_resident_memory_bytes") or 0) > 0


def test_two_agent_metrics_in_one_process_do_not_mix() -> None:
    a = AgentMetrics()
    b = AgentMetrics()
    assert a.registry is not b.registry
    a.tasks_fetched_total.inc(3)
    a.tasks_failed_total.labels(reason="timeout").inc()
    b.tasks_fetched_total.inc(5)
    b.ac_inflight.set_function(lambda: 7)

    _, sa = parse(exposition(a))
    _, sb = parse(exposition(b))
    assert value(sa, "acagent_tasks_fetched_total") == 3
    assert value(sb, "acagent_tasks_fetched_total") == 5
    assert value(sa, "acagent_tasks_failed_total", reason="timeout") == 1
    assert value(sb, "acagent_tasks_failed_total", reason="timeout") is None
    assert value(sa, "acagent_ac_inflight") == 0
    assert value(sb, "acagent_ac_inflight") == 7
    assert a.counter_totals()["fetched"] == 3 and b.counter_totals()["fetched"] == 5


def test_a_callers_registry_gets_the_agents_metrics() -> None:
    host = CollectorRegistry()
    m = AgentMetrics(host)
    assert m.registry is host
    m.tasks_fetched_total.inc(2)
    m.tasks_uploaded_total.labels(via="s3").inc()
    assert host.get_sample_value("acagent_tasks_fetched_total") == 2
    assert host.get_sample_value("acagent_tasks_uploaded_total", {"via": "s3"}) == 1
    assert host.get_sample_value("acagent_build_info", {"version": acagent.__version__}) == 1
    # the host's registry carries its own process collectors: none are added to it
    types, _ = parse(generate_latest(host).decode("utf-8"))
    assert all(name.startswith("acagent_") for name in types), sorted(types)
    # a second agent on the same registry is a name clash, reported at once
    with pytest.raises(ValueError):
        AgentMetrics(host)


# ---------------------------------------------------------------------------
# reading values
# ---------------------------------------------------------------------------
def test_metric_value_reads_counters_gauges_and_histograms() -> None:
    m = AgentMetrics()
    assert metric_value(m.tasks_failed_total) == 0  # no label set yet
    m.tasks_failed_total.labels(reason="timeout").inc(2)
    m.tasks_failed_total.labels(reason="shutdown").inc()
    assert metric_value(m.tasks_failed_total) == 3
    assert metric_value(m.tasks_failed_total, reason="timeout") == 2
    assert metric_value(m.tasks_failed_total, reason="nope") == 0
    m.ac_requests_total.labels(endpoint="get-task", status="200").inc(4)
    m.ac_requests_total.labels(endpoint="get-task", status="error").inc()
    m.ac_requests_total.labels(endpoint="put-result", status="200").inc()
    assert metric_value(m.ac_requests_total, endpoint="get-task") == 5
    assert metric_value(m.ac_requests_total, status="200") == 5
    items = [1, 2, 3]
    m.spool_size.set_function(lambda: len(items))
    assert metric_value(m.spool_size) == 3
    items.append(4)
    assert metric_value(m.spool_size) == 4
    m.get_task_seconds.observe(0.1)
    m.get_task_seconds.observe(0.2)
    assert metric_value(m.get_task_seconds) == 2


def test_status_snapshot_and_line() -> None:
    m = AgentMetrics()
    m.tasks_fetched_total.inc()
    m.tasks_processed_total.labels(outcome="ok").inc()
    m.tasks_uploaded_total.labels(via="inline").inc()
    m.tasks_failed_total.labels(reason="timeout").inc()
    m.ac_permits_max.set(2)
    m.ac_inflight.inc()
    m.task_queue_size.set_function(lambda: 4)
    snap = m.status_snapshot()
    assert snap["fetched"] == 1
    assert snap["processed"] == 1 and snap["processed_ok"] == 1 and snap["processed_error"] == 0
    assert snap["uploaded"] == 1 and snap["failed"] == 1
    assert snap["ac_inflight"] == 1 and snap["ac_permits_max"] == 2
    assert snap["task_queue_size"] == 4
    line = m.status_line()
    assert line.startswith("status: fetched=1 processed=1 uploaded=1 failed=1 | queue task=4 ")
    assert "ac_inflight=1/2" in line
    m.spool_size.set_function(lambda: math.nan)
    assert "spool=? " in m.status_line()


def test_rate_window_per_minute() -> None:
    now = [0.0]
    w = RateWindow(60.0, clock=lambda: now[0])
    assert w.rates_per_minute() == {}
    w.sample({"fetched": 0})
    assert w.rates_per_minute() == {"fetched": 0.0}
    now[0] = 30.0
    w.sample({"fetched": 30})
    assert w.rates_per_minute()["fetched"] == pytest.approx(60.0)
    now[0] = 90.0
    w.sample({"fetched": 60})  # the sample at t=0 falls out; base is t=30
    assert w.rates_per_minute()["fetched"] == pytest.approx(30.0)
    # many samples in a short time stay bounded
    for i in range(10_000):
        now[0] = 90.0 + i * 0.001
        w.sample({"fetched": 60 + i})
    assert len(w._samples) < 200


def test_agent_metrics_rates_use_counter_totals() -> None:
    now = [100.0]
    m = AgentMetrics(clock=lambda: now[0])
    assert m.rates_per_minute() == {"fetched": 0, "processed": 0, "uploaded": 0, "failed": 0}
    m.tasks_fetched_total.inc(10)
    m.tasks_processed_total.labels(outcome="ok").inc(6)
    m.tasks_processed_total.labels(outcome="error").inc(4)
    m.tasks_failed_total.labels(reason="timeout").inc(4)
    now[0] = 130.0
    rates = m.rates_per_minute()
    assert rates["fetched"] == pytest.approx(20.0)
    assert rates["processed"] == pytest.approx(20.0)
    assert rates["failed"] == pytest.approx(8.0)
    assert rates["uploaded"] == 0


# ---------------------------------------------------------------------------
# /metrics of the HealthServer
# ---------------------------------------------------------------------------
def test_health_server_metrics_parse_with_the_reference_parser() -> None:
    m = AgentMetrics()
    m.tasks_fetched_total.inc(7)
    m.ac_requests_total.labels(endpoint="get-task", status="200").inc(3)
    m.tasks_failed_total.labels(reason='a "quoted"\\ reason\nwith a newline').inc()
    server = HealthServer(
        "127.0.0.1",
        0,
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ok"),
        registry=m.registry,
    )
    server.start()
    try:
        r = requests.get(server.url + "/metrics", timeout=HTTP_TIMEOUT)
    finally:
        server.stop(timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == METRICS_CONTENT_TYPE
    types, samples = parse(r.text)
    for name, kind in EXPECTED.items():
        assert types.get(name) == kind, name
    assert value(samples, "acagent_tasks_fetched_total") == 7
    assert value(samples, "acagent_ac_requests_total", endpoint="get-task", status="200") == 3
    nasty = 'a "quoted"\\ reason\nwith a newline'
    assert value(samples, "acagent_tasks_failed_total", reason=nasty) == 1


# ---------------------------------------------------------------------------
# two real Pipelines in one process, and a Pipeline on a caller's registry
# ---------------------------------------------------------------------------
def _config(ac: FakeACServer, tmp_path: Path, name: str) -> AgentConfig:
    return make_config(
        ac.url,
        tmp_path / name / "spool",
        api_key=f"metrics-test-key-{name}",
        health_addr="127.0.0.1:0",
    )


def _add_tasks(ac: FakeACServer, target: FakeTarget, prefix: str, n: int) -> None:
    ac.add_tasks(
        {
            "taskId": f"{prefix}-{i}",
            "method": "GET",
            "url": f"{target.url}/bytes/{100 + i}?seed={i}",
        }
        for i in range(n)
    )


def _scrape(pipeline: Pipeline) -> Dict[Tuple[str, LabelSet], float]:
    assert pipeline.health is not None
    r = requests.get(pipeline.health.url + "/metrics", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    return parse(r.text)[1]


def test_two_pipelines_in_one_process_keep_their_own_metrics(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    with FakeACServer(max_concurrent=2) as ac_b:
        _add_tasks(ac, target, "a", 3)
        _add_tasks(ac_b, target, "b", 5)
        first = Pipeline(_config(ac, tmp_path, "a"))
        second = Pipeline(_config(ac_b, tmp_path, "b"))
        assert first.metrics.registry is not second.metrics.registry
        first.start()
        try:
            second.start()
            try:
                assert ac.wait_for_results(3, timeout=WAIT)
                assert ac_b.wait_for_results(5, timeout=WAIT)
                assert wait_until(lambda: first.metrics.counter_totals()["uploaded"] >= 3)
                assert wait_until(lambda: second.metrics.counter_totals()["uploaded"] >= 5)
                sa, sb = _scrape(first), _scrape(second)
            finally:
                assert second.stop(timeout=WAIT)
        finally:
            assert first.stop(timeout=WAIT)
    assert value(sa, "acagent_tasks_fetched_total") == 3 == ac.tasks_handed_out
    assert value(sb, "acagent_tasks_fetched_total") == 5 == ac_b.tasks_handed_out
    assert value(sa, "acagent_tasks_processed_total", outcome="ok") == 3
    assert value(sb, "acagent_tasks_processed_total", outcome="ok") == 5
    assert sum(v for (n, _), v in sa.items() if n == "acagent_tasks_uploaded_total") == 3
    assert sum(v for (n, _), v in sb.items() if n == "acagent_tasks_uploaded_total") == 5
    assert value(sa, "acagent_ac_requests_total", endpoint="put-result", status="200") == 3
    assert value(sb, "acagent_ac_requests_total", endpoint="put-result", status="200") == 5


def test_a_pipeline_on_a_callers_registry(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    host = CollectorRegistry()
    _add_tasks(ac, target, "h", 4)
    pipeline = Pipeline(_config(ac, tmp_path, "h"), metrics=AgentMetrics(host))
    pipeline.start()
    try:
        assert ac.wait_for_results(4, timeout=WAIT)
        assert wait_until(lambda: pipeline.metrics.counter_totals()["uploaded"] >= 4)
        served = _scrape(pipeline)  # the agent's own /metrics renders the host's registry
    finally:
        assert pipeline.stop(timeout=WAIT)
    assert host.get_sample_value("acagent_tasks_fetched_total") == 4 == ac.tasks_handed_out
    assert host.get_sample_value("acagent_tasks_processed_total", {"outcome": "ok"}) == 4
    assert value(served, "acagent_tasks_fetched_total") == 4
    uploaded = [
        s.value
        for f in host.collect()
        for s in f.samples
        if s.name == "acagent_tasks_uploaded_total"
    ]
    assert sum(uploaded) == 4


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (CONCURRENCY_HINT, "concurrency"),
        ("rate limited (429)", "rate_limited"),
        ("HTTP 401", "auth"),
        ("HTTP 403", "auth"),
        ("refused by the server (HTTP 422)", "refused"),
        ("put-result: HTTP 503: upstream down", "http_error"),
        ("upload-result: ConnectionError: connection reset", "network"),
        ("KeyError", "other"),
    ],
)
def test_retry_kind_is_a_bounded_label(reason: str, kind: str) -> None:
    assert retry_kind(reason) == kind
    assert kind in RETRY_KINDS


def test_holds_and_retries_show_in_the_metrics_by_reason() -> None:
    metrics = AgentMetrics()
    observer = MetricsObserver(metrics)
    held = metrics.fetch_held
    assert [held.labels(reason=r)._value.get() for r in HOLD_REASONS] == [0.0, 0.0]
    observer.on_hold("spool", "no space left on the spool folder")
    assert held.labels(reason="spool")._value.get() == 1.0
    observer.on_hold("spool", None)
    assert held.labels(reason="spool")._value.get() == 0.0
    observer.on_result_retry(None, "rate limited (429)", 3.0)  # type: ignore[arg-type]
    assert metrics.result_retries_total.labels(reason="rate_limited")._value.get() == 1.0
    assert metrics.result_retry_wait_seconds._sum.get() == 3.0
