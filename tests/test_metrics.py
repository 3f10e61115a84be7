"""Metrics registry, Prometheus text exposition, rates and the JSON-lines file."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from acagent.metrics import (
    DEFAULT_BUCKETS,
    AgentMetrics,
    MetricsFileWriter,
    MetricsRegistry,
    RateWindow,
    default_metrics_path,
    request_tags,
)

# ---------------------------------------------------------------------------
# a strict checker of the Prometheus text format 0.0.4
# ---------------------------------------------------------------------------
NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Family:
    name: str
    type: str
    help: Optional[str] = None
    samples: List[Tuple[str, Dict[str, str], float]] = field(default_factory=list)


def _parse_value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    assert re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text), text
    return float(text)


def _parse_labels(text: str) -> Tuple[Dict[str, str], str]:
    """Parse ``{a="x",b="y"}`` at the start of ``text``; return labels and the rest."""
    assert text[0] == "{"
    i = 1
    labels: Dict[str, str] = {}
    while True:
        if text[i] == "}":
            return labels, text[i + 1 :]
        m = LABEL_NAME_RE.match(text, i)
        assert m, f"bad label name at {text[i:]!r}"
        name = m.group(0)
        i = m.end()
        assert text[i : i + 2] == '="', f'expected =" at {text[i:]!r}'
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                nxt = text[i + 1]
                assert nxt in ("\\", '"', "n"), f"bad escape \\{nxt}"
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        i += 1
        assert name not in labels, f"duplicate label {name}"
        labels[name] = "".join(value)
        if text[i] == ",":
            i += 1
        else:
            assert text[i] == "}", f"expected , or }} at {text[i:]!r}"


def parse_exposition(text: str) -> Dict[str, Family]:
    assert text.endswith("\n")
    families: Dict[str, Family] = {}
    helps: Dict[str, str] = {}
    for line in text.splitlines():
        assert line, "empty line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if parts[1] == "HELP":
                name = parts[2]
                assert NAME_RE.fullmatch(name), name
                assert name not in helps, f"two HELP lines for {name}"
                helps[name] = parts[3] if len(parts) > 3 else ""
            elif parts[1] == "TYPE":
                name, kind = parts[2], parts[3]
                assert NAME_RE.fullmatch(name), name
                assert kind in TYPES, kind
                assert name not in families, f"two TYPE lines for {name}"
                families[name] = Family(name, kind, helps.get(name))
            continue
        m = NAME_RE.match(line)
        assert m, line
        sample_name = m.group(0)
        rest = line[m.end() :]
        labels: Dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _parse_labels(rest)
        assert rest.startswith(" "), line
        value = _parse_value(rest[1:].strip())
        family = families.get(sample_name)
        if family is None:
            base = re.sub(r"_(bucket|sum|count)$", "", sample_name)
            family = families.get(base)
            assert family is not None and family.type == "histogram", (
                f"sample {sample_name} before its TYPE line"
            )
        else:
            assert family.type != "histogram", sample_name
        family.samples.append((sample_name, labels, value))
    for name, family in families.items():
        if family.type == "counter":
            assert name.endswith("_total"), name
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    series: Dict[Tuple[Tuple[str, str], ...], List[Tuple[float, float]]] = {}
    counts: Dict[Tuple[Tuple[str, str], ...], float] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            series.setdefault(key, []).append((_parse_value(labels["le"]), value))
        elif name.endswith("_count"):
            counts[key] = value
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1])
        values = [v for _, v in buckets]
        assert values == sorted(values), "buckets must be cumulative"
        assert values[-1] == counts[key], "+Inf bucket must equal _count"


def sample_value(families: Dict[str, Family], name: str, **labels: str) -> float:
    for fam in families.values():
        for sname, slabels, value in fam.samples:
            if sname == name and slabels == labels:
                return value
    raise KeyError((name, labels))


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
def test_counter_names_prefix_and_total_suffix() -> None:
    reg = MetricsRegistry()
    c = reg.counter("things", "Things.")
    assert c.name == "acagent_things_total"
    c2 = reg.counter("acagent_other_total", "Other.")
    assert c2.name == "acagent_other_total"
    c.inc()
    c.inc(2.5)
    assert c.value() == 3.5
    with pytest.raises(ValueError):
        c.inc(-1)
    fams = parse_exposition(reg.render_prometheus())
    assert fams["acagent_things_total"].type == "counter"
    assert fams["acagent_things_total"].help == "Things."
    assert sample_value(fams, "acagent_things_total") == 3.5
    assert sample_value(fams, "acagent_other_total") == 0


def test_labels_are_validated() -> None:
    reg = MetricsRegistry()
    with pytest.raises(ValueError):
        reg.counter("bad", "x", ("1abc",))
    with pytest.raises(ValueError):
        reg.counter("bad2", "x", ("__reserved",))
    with pytest.raises(ValueError):
        reg.counter("bad3", "x", ("a", "a"))
    with pytest.raises(ValueError):
        reg.histogram("bad4", "x", labelnames=("le",))
    with pytest.raises(ValueError):
        reg.gauge("bad-name", "x")
    c = reg.counter("ok", "x", ("endpoint", "status"))
    with pytest.raises(ValueError):
        c.inc(endpoint="get-task")  # missing label
    with pytest.raises(ValueError):
        c.inc(endpoint="get-task", status="200", extra="x")
    with pytest.raises(ValueError):
        c.inc(endpoint="get-task", stat="200")


def test_same_name_returns_same_metric_and_conflicts_raise() -> None:
    reg = MetricsRegistry()
    a = reg.counter("x", "X.", ("a",))
    assert reg.counter("x", "X.", ("a",)) is a
    with pytest.raises(ValueError):
        reg.counter("x", "X.", ("b",))
    with pytest.raises(ValueError):
        reg.gauge("x_total", "X.")


def test_label_values_escape_and_round_trip() -> None:
    reg = MetricsRegistry()
    c = reg.counter("escaped", "Help with \\ backslash\nand newline.", ("v",))
    nasty = 'a "quoted" \\ back\\slash\nnew line, {brace}=x'
    c.inc(v=nasty)
    c.inc(3, v="plain")
    text = reg.render_prometheus()
    assert "\n\n" not in text
    fams = parse_exposition(text)
    assert sample_value(fams, "acagent_escaped_total", v=nasty) == 1
    assert sample_value(fams, "acagent_escaped_total", v="plain") == 3
    assert "# HELP acagent_escaped_total Help with \\\\ backslash\\nand newline." in text


def test_gauge_set_inc_dec_and_function() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("level", "Level.")
    g.set(5)
    g.inc()
    g.dec(2)
    assert g.value() == 4
    items = [1, 2, 3]
    g.set_function(lambda: len(items))
    assert g.value() == 3
    items.append(4)
    fams = parse_exposition(reg.render_prometheus())
    assert sample_value(fams, "acagent_level") == 4
    g.set(7)  # a set() replaces the function
    items.append(5)
    assert g.value() == 7


def test_broken_gauge_function_does_not_break_the_scrape() -> None:
    reg = MetricsRegistry()
    reg.gauge("broken", "Broken.").set_function(lambda: 1 / 0)
    reg.counter("fine", "Fine.").inc()
    fams = parse_exposition(reg.render_prometheus())
    assert math.isnan(sample_value(fams, "acagent_broken"))
    assert sample_value(fams, "acagent_fine_total") == 1


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0, 10.0), labelnames=("op",))
    for v in (0.05, 0.1, 0.5, 2.0, 50.0):
        h.observe(v, op="a")
    fams = parse_exposition(reg.render_prometheus())
    fam = fams["acagent_latency_seconds"]
    assert fam.type == "histogram"
    b = "acagent_latency_seconds_bucket"
    assert sample_value(fams, b, op="a", le="0.1") == 2  # le is inclusive
    assert sample_value(fams, b, op="a", le="1.0") == 3
    assert sample_value(fams, b, op="a", le="10.0") == 4
    assert sample_value(fams, b, op="a", le="+Inf") == 5
    assert sample_value(fams, "acagent_latency_seconds_count", op="a") == 5
    assert sample_value(fams, "acagent_latency_seconds_sum", op="a") == pytest.approx(52.65)
    assert h.count(op="a") == 5
    assert h.sum(op="a") == pytest.approx(52.65)
    with pytest.raises(ValueError):
        reg.histogram("unsorted", "x", buckets=(1.0, 0.5))


def test_histogram_timer_observes_also_on_error() -> None:
    reg = MetricsRegistry()
    h = reg.histogram("work_seconds", "Work.")
    assert h.buckets[-1] == math.inf and h.buckets[:-1] == DEFAULT_BUCKETS
    with h.time() as timer:
        pass
    assert h.count() == 1
    assert timer.elapsed >= 0
    with pytest.raises(RuntimeError), h.time():
        raise RuntimeError("boom")
    assert h.count() == 2
    with pytest.raises(ValueError):
        h.time(op="x")  # unknown label rejected at entry


def test_concurrent_updates_are_not_lost() -> None:
    reg = MetricsRegistry()
    c = reg.counter("hits", "Hits.", ("k",))
    h = reg.histogram("obs", "Obs.")
    n_threads, per_thread = 8, 5000
    barrier = threading.Barrier(n_threads, timeout=10)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            c.inc(k=str(i % 2))
            h.observe(0.01)

    threads = [threading.Thread(target=work, args=(i,), name=f"t-metrics-{i}") for i in range(8)]
    for t in threads:
        t.start()
    stop_render = threading.Event()

    def render_loop() -> None:  # scrapes while writers run
        while not stop_render.is_set():
            parse_exposition(reg.render_prometheus())

    renderer = threading.Thread(target=render_loop, name="t-metrics-render")
    renderer.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    stop_render.set()
    renderer.join(30)
    assert not renderer.is_alive()
    assert c.total() == n_threads * per_thread
    assert c.value(k="0") == c.value(k="1") == n_threads * per_thread / 2
    assert h.count() == n_threads * per_thread


# ---------------------------------------------------------------------------
# AgentMetrics and rates
# ---------------------------------------------------------------------------
EXPECTED = {
    "acagent_tasks_fetched_total": "counter",
    "acagent_tasks_processed_total": "counter",
    "acagent_tasks_uploaded_total": "counter",
    "acagent_tasks_failed_total": "counter",
    "acagent_ac_requests_total": "counter",
    "acagent_ac_inflight": "gauge",
    "acagent_ac_permits_max": "gauge",
    "acagent_task_queue_size": "gauge",
    "acagent_result_queue_size": "gauge",
    "acagent_executor_busy_threads": "gauge",
    "acagent_spool_size": "gauge",
    "acagent_get_task_seconds": "histogram",
    "acagent_target_request_seconds": "histogram",
    "acagent_upload_seconds": "histogram",
}


def test_agent_metrics_exposes_the_fixed_set() -> None:
    m = AgentMetrics()
    m.tasks_fetched_total.inc()
    m.tasks_processed_total.inc(outcome="ok")
    m.tasks_uploaded_total.inc(via="inline")
    m.tasks_failed_total.inc(reason="timeout")
    m.ac_requests_total.inc(endpoint="get-task", status="200")
    m.ac_requests_total.inc(endpoint="put-result", status="error")
    m.ac_permits_max.set(2)
    m.ac_inflight.inc()
    m.task_queue_size.set_function(lambda: 4)
    m.get_task_seconds.observe(0.2)
    with m.upload_seconds.time():
        pass
    m.target_request_seconds.observe(1.5)
    fams = parse_exposition(m.registry.render_prometheus())
    for name, kind in EXPECTED.items():
        assert fams[name].type == kind, name
    assert (
        sample_value(fams, "acagent_ac_requests_total", endpoint="put-result", status="error") == 1
    )
    assert sample_value(fams, "acagent_task_queue_size") == 4

    snap = m.status_snapshot()
    assert snap["fetched"] == 1
    assert snap["processed"] == 1 and snap["processed_ok"] == 1
    assert snap["uploaded"] == 1 and snap["failed"] == 1
    assert snap["ac_inflight"] == 1 and snap["ac_permits_max"] == 2
    assert snap["task_queue_size"] == 4
    line = m.status_line()
    assert "fetched=1" in line and "ac_inflight=1/2" in line


def test_two_agent_metrics_can_share_a_registry() -> None:
    reg = MetricsRegistry()
    a = AgentMetrics(reg)
    b = AgentMetrics(reg)
    a.tasks_fetched_total.inc()
    assert b.tasks_fetched_total.value() == 1


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
    m.tasks_processed_total.inc(6, outcome="ok")
    m.tasks_processed_total.inc(4, outcome="error")
    m.tasks_failed_total.inc(4, reason="timeout")
    now[0] = 130.0
    rates = m.rates_per_minute()
    assert rates["fetched"] == pytest.approx(20.0)
    assert rates["processed"] == pytest.approx(20.0)
    assert rates["failed"] == pytest.approx(8.0)
    assert rates["uploaded"] == 0


# ---------------------------------------------------------------------------
# JSON-lines metrics file
# ---------------------------------------------------------------------------
def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _check_line(line: str) -> Dict[str, Any]:
    pairs = json.loads(line, object_pairs_hook=list)
    assert [k for k, _ in pairs] == ["@timestamp", "metric_name", "value", "tags"]
    obj = dict(pairs)
    assert type(obj["@timestamp"]) is int
    assert isinstance(obj["metric_name"], str)
    assert type(obj["value"]) in (int, float)
    tags = dict(obj["tags"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    assert json.dumps(json.loads(line)) == line  # default separators, nothing extra
    return obj


def test_metrics_file_lines_have_the_exact_shape(tmp_path: Path) -> None:
    path = str(tmp_path / "metrics" / "metrics_test.json")
    before = int(time.time() * 1000)
    writer = MetricsFileWriter(path, retention_days=3, flush_interval=0)
    try:
        tags = request_tags("T1", "target", "https://jira.local/rest?jql=secret#x", "get", 200)
        writer.write_metric("http.request.duration_ms", 12.5, tags)
        writer.write_metric("tasks.fetched", 3)
        writer.write_metric("bad", float("nan"))  # skipped, never invalid JSON
        with pytest.raises(TypeError):
            writer.write_metric("bad", "1")  # type: ignore[arg-type]
    finally:
        writer.close()
    lines = _read_lines(path)
    assert len(lines) == 2
    first, second = (_check_line(line) for line in lines)
    assert first["metric_name"] == "http.request.duration_ms"
    assert first["value"] == 12.5
    assert first["@timestamp"] >= before
    assert first["tags"] == [
        ("task_id", "T1"),
        ("operation", "target"),
        ("url", "https://jira.local/rest"),
        ("domain", "jira.local"),
        ("method", "GET"),
        ("status_code", "200"),
    ]
    assert second["value"] == 3 and type(second["value"]) is int
    assert second["tags"] == []
    assert "secret" not in "\n".join(lines)
    assert writer._handler.backupCount == 3
    assert (os.stat(tmp_path / "metrics").st_mode & 0o777) == 0o700


def test_metrics_file_flush_thread_writes_and_stops(tmp_path: Path) -> None:
    path = str(tmp_path / "m.json")
    writer = MetricsFileWriter(path, flush_interval=0.02)
    thread = writer._thread
    assert thread is not None and thread.name == "acagent-metrics-file" and thread.is_alive()
    writer.write_metric("a", 1, {"k": "v"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if os.path.exists(path) and _read_lines(path):
            break
        threading.Event().wait(0.01)
    assert len(_read_lines(path)) == 1, "the flush thread did not write within 5 s"
    writer.write_metric("b", 2)
    writer.close(timeout=5)
    assert not thread.is_alive()
    assert [_check_line(x)["metric_name"] for x in _read_lines(path)] == ["a", "b"]
    writer.write_metric("after-close", 1)  # ignored, no error
    writer.close()


def test_metrics_file_many_writers(tmp_path: Path) -> None:
    path = str(tmp_path / "m.json")
    with MetricsFileWriter(path, flush_interval=0.01, max_buffer=50) as writer:

        def write(i: int) -> None:
            for j in range(500):
                writer.write_metric("x", j, {"t": str(i)})

        threads = [
            threading.Thread(target=write, args=(i,), name=f"t-writer-{i}") for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
    lines = _read_lines(path)
    assert len(lines) == 2000
    for line in lines:
        _check_line(line)


def test_request_tags_strip_query_and_credentials() -> None:
    tags = request_tags(
        "T9",
        "upload",
        "https://user:pw@s3.amazonaws.com/b/k?X-Amz-Signature=abc",
        "put",
        None,
        size=10,
    )
    assert tags["url"] == "https://s3.amazonaws.com/b/k"
    assert tags["domain"] == "s3.amazonaws.com"
    assert tags["status_code"] == ""
    assert tags["size"] == "10"
    assert "pw" not in json.dumps(tags) and "Signature" not in json.dumps(tags)


def test_default_metrics_path() -> None:
    path = default_metrics_path("_prod")
    assert path.endswith(os.path.join("armorcode", "log", "metrics", "metrics_prod.json"))
