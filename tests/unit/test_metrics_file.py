"""The JSON-lines metrics file of today's agent: line shape, flushing, tags, paths."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from acagent.metricsfile import MetricsFileWriter, default_metrics_path, request_tags


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
    assert path.endswith(os.path.join("acagent", "log", "metrics", "metrics_prod.json"))
