"""Observability of a running Pipeline over real HTTP on 127.0.0.1.

What the operator sees is checked against what really happened at the fake
AC server: ``/metrics`` counters against the fake's own request counts,
``/readyz`` and ``/healthz`` against real outages and a real dead thread, the
JSON-lines metrics file line by line, and the status line.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import pytest
import requests
from helpers import WAIT, FastFetcher, bytes_task, make_config, make_pipeline, wait_until

from acagent import AgentConfig, Pipeline
from acagent.executor import Executor
from acagent.health import METRICS_CONTENT_TYPE
from acagent.metrics import metric_value
from acagent.models import Task
from acagent.stage import StageContext
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

HTTP_TIMEOUT = 5.0
API_KEY = "obs-secret-key-6f1d2c"


class PausableFetcher(FastFetcher):
    """Stops asking for tasks when told to, and says so once it is idle.

    Once ``parked`` is set no get-task is in flight or will be sent, so the
    agent's counters and the fake server's counts can be compared exactly.
    """

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.pause = threading.Event()
        self.parked = threading.Event()

    def fetch_one(self) -> Optional[Task]:
        if self.pause.is_set():
            self.parked.set()
            self.stopping.wait(WAIT * 3)
            return None
        return super().fetch_one()


class DyingFetcher(FastFetcher):
    """A Fetcher whose thread dies (BaseException, not caught by the loop) on demand."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.die = threading.Event()

    def fetch_one(self) -> Optional[Task]:
        if self.die.is_set():
            raise SystemExit("fetcher killed by the test")
        return super().fetch_one()


def obs_config(ac: FakeACServer, tmp_path: Path, **changes: Any) -> AgentConfig:
    values: Dict[str, Any] = {"api_key": API_KEY, "health_addr": "127.0.0.1:0", **changes}
    return make_config(ac.url, tmp_path / "spool", **values)


def obs_pipeline(config: AgentConfig, fetcher: Any = FastFetcher) -> Pipeline:
    return make_pipeline(config, fetcher=fetcher, executor=Executor)


def health_url(pipeline: Pipeline) -> str:
    assert pipeline.health is not None, "health_addr is set: the listener must run"
    url = pipeline.health.url
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
    assert not url.endswith(":0"), "the bound port must be exposed, not the configured 0"
    return url


def probe(url: str) -> Tuple[int, str]:
    r = requests.get(url, timeout=HTTP_TIMEOUT)
    return r.status_code, r.text


# ---------------------------------------------------------------------------
# a strict reader of the Prometheus text format 0.0.4
# ---------------------------------------------------------------------------
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_KINDS = ("counter", "gauge", "histogram", "summary", "untyped")

LabelSet = Tuple[Tuple[str, str], ...]


@dataclass
class MetricFamily:
    name: str
    kind: str
    help: str
    samples: Dict[Tuple[str, LabelSet], float] = field(default_factory=dict)


def _read_labels(text: str, line: str) -> Tuple[LabelSet, str]:
    assert text.startswith("{"), line
    pos = 1
    labels: List[Tuple[str, str]] = []
    while text[pos] != "}":
        m = _LABEL.match(text, pos)
        assert m is not None, f"bad label name in {line!r}"
        pos = m.end()
        assert text[pos : pos + 2] == '="', f"bad label in {line!r}"
        pos += 2
        chars: List[str] = []
        while text[pos] != '"':
            if text[pos] == "\\":
                escaped = text[pos + 1]
                assert escaped in '\\"n', f"bad escape in {line!r}"
                chars.append("\n" if escaped == "n" else escaped)
                pos += 2
            else:
                chars.append(text[pos])
                pos += 1
        pos += 1
        assert m.group(0) not in dict(labels), f"label repeated in {line!r}"
        labels.append((m.group(0), "".join(chars)))
        if text[pos] == ",":
            pos += 1
        else:
            assert text[pos] == "}", f"expected , or }} in {line!r}"
    return tuple(labels), text[pos + 1 :]


def _read_value(text: str, line: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf"))
    assert _NUMBER.fullmatch(text), f"bad value in {line!r}"
    return float(text)


def parse_prometheus(text: str) -> Dict[str, MetricFamily]:
    """Families by name. Fails on anything the format does not allow: a sample
    before its HELP and TYPE, a family split in two, bad names, bad escapes."""
    assert text.endswith("\n") and "\r" not in text
    families: Dict[str, MetricFamily] = {}
    helps: Dict[str, str] = {}
    current: Optional[MetricFamily] = None
    for line in text[:-1].split("\n"):
        assert line and line == line.strip(), f"blank or padded line {line!r}"
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert _NAME.fullmatch(name) and name not in helps and name not in families, line
            helps[name] = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert name in helps, f"TYPE before HELP: {line!r}"
            assert kind in _KINDS and name not in families, line
            current = families[name] = MetricFamily(name, kind, helps[name])
            continue
        assert not line.startswith("#"), f"unknown comment {line!r}"
        m = _NAME.match(line)
        assert m is not None, f"bad sample line {line!r}"
        sample = m.group(0)
        rest = line[m.end() :]
        labels: LabelSet = ()
        if rest.startswith("{"):
            labels, rest = _read_labels(rest, line)
        assert rest.startswith(" ") and rest.count(" ") == 1, f"bad sample line {line!r}"
        value = _read_value(rest[1:], line)
        assert current is not None, f"sample before any TYPE: {line!r}"
        allowed = {current.name}
        if current.kind == "histogram":
            allowed = {current.name + s for s in ("_bucket", "_sum", "_count")}
        assert sample in allowed, f"{sample} outside its family {current.name}"
        assert (sample, labels) not in current.samples, f"duplicate sample {line!r}"
        current.samples[(sample, labels)] = value
    for family in families.values():
        if family.kind == "counter":
            assert family.name.endswith("_total"), family.name
            assert all(v >= 0 and not math.isnan(v) for v in family.samples.values())
        if family.kind == "histogram":
            _check_buckets(family)
    return families


def _check_buckets(family: MetricFamily) -> None:
    series: Dict[LabelSet, List[Tuple[float, float]]] = {}
    for (sample, labels), value in family.samples.items():
        if sample.endswith("_bucket"):
            rest = tuple(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((_read_value(dict(labels)["le"], sample), value))
    for rest, buckets in series.items():
        buckets.sort()
        assert math.isinf(buckets[-1][0]), f"{family.name}: no +Inf bucket"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{family.name}: buckets not cumulative"
        assert counts[-1] == family.samples[(family.name + "_count", rest)]


class Scrape:
    """One parsed ``/metrics`` answer with lookups by metric name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = parse_prometheus(text)

    def value(self, name: str, **labels: str) -> Optional[float]:
        wanted = tuple(sorted(labels.items()))
        for family in self.families.values():
            for (sample, got), value in family.samples.items():
                if sample == name and tuple(sorted(got)) == wanted:
                    return value
        return None

    def agent_lines(self) -> List[str]:
        """The agent's own lines (process metrics such as CPU time always move)."""
        return [line for line in self.text.splitlines() if "acagent_" in line]

    def total(self, name: str) -> float:
        family = self.families[name]
        return sum(v for (s, _), v in family.samples.items() if s == name)

    def by_labels(self, name: str) -> Dict[Tuple[str, ...], float]:
        family = self.families[name]
        return {tuple(v for _, v in labels): value for (_, labels), value in family.samples.items()}


def scrape(base: str) -> Scrape:
    r = requests.get(base + "/metrics", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == METRICS_CONTENT_TYPE
    return Scrape(r.text)


def test_the_prometheus_reader_rejects_what_the_format_forbids() -> None:
    good = '# HELP a_total A.\n# TYPE a_total counter\na_total{x="q\\"\\n"} 3\n'
    assert Scrape(good).value("a_total", x='q"\n') == 3
    bad = [
        "a_total 3\n",  # no HELP/TYPE
        "# HELP a_total A.\n# TYPE a_total counter\na_total 3",  # no final newline
        '# HELP a_total A.\n# TYPE a_total counter\na_total{x="\\t"} 3\n',  # bad escape
        '# HELP a_total A.\n# TYPE a_total counter\na_total{x="1",x="2"} 3\n',
        "# HELP a_total A.\n# TYPE a_total counter\nb_total 3\n",  # outside its family
        "# HELP a A.\n# TYPE a counter\na 3\n",  # counter without _total
        "# HELP a_total A.\n# TYPE a_total counter\na_total three\n",
        "# HELP h A.\n# TYPE h histogram\n"
        'h_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
    ]
    for text in bad:
        with pytest.raises((AssertionError, IndexError)):
            Scrape(text)


# ---------------------------------------------------------------------------
# /metrics during and after a real run
# ---------------------------------------------------------------------------
def _server_counts(ac: FakeACServer) -> Dict[Tuple[str, str], int]:
    counts: Counter[Tuple[str, str]] = Counter()
    for r in ac.requests:
        counts[(r.endpoint, str(r.status) if r.status else "error")] += 1
    return dict(counts)


def _agent_counts(s: Scrape) -> Dict[Tuple[str, str], int]:
    got = s.by_labels("acagent_ac_requests_total")
    return {(k[0], k[1]): int(v) for k, v in got.items()}


def test_metrics_scraped_during_and_after_a_run_match_the_server(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    n = 50
    expected = {f"m-{i}": (500 + 37 * i, i) for i in range(n)}
    ac.add_tasks(bytes_task(target, tid, size, seed) for tid, (size, seed) in expected.items())
    put_result_stalled = ac.stall("put-result")  # the first upload hangs at the server
    config = obs_config(ac, tmp_path, executor_pool_size=8)
    pipeline = obs_pipeline(config, fetcher=PausableFetcher)
    fetcher = cast(PausableFetcher, pipeline.fetcher)
    pipeline.start()
    try:
        base = health_url(pipeline)

        # -- during the run: every task ran, every upload waits behind the stalled one
        def all_ran() -> bool:
            s = scrape(base)
            return (
                s.value("acagent_tasks_processed_total", outcome="ok") == n
                and s.value("acagent_result_queue_size") == n - 1
            )

        assert wait_until(all_ran), scrape(base).text
        mid = scrape(base)
        assert mid.value("acagent_tasks_fetched_total") == n == ac.tasks_handed_out
        assert mid.value("acagent_spool_size") == n  # every result is on disk until accepted
        assert mid.value("acagent_task_queue_size") == 0
        assert mid.value("acagent_executor_busy_threads") == 0
        assert mid.value("acagent_ac_permits_max") == 2
        assert 1 <= (mid.value("acagent_ac_inflight") or 0) <= 2  # the stalled put-result
        assert not mid.families["acagent_tasks_uploaded_total"].samples
        assert mid.value("acagent_target_request_seconds_count") == n
        during = _agent_counts(mid)
        assert ("put-result", "200") not in during
        server = _server_counts(ac)
        for key, value in during.items():  # the server records a request before answering
            assert value <= server.get(key, 0), (key, value, server)
        assert during[("get-task", "200")] >= n

        # -- after the run: exact agreement once nothing is in flight
        put_result_stalled.set()
        assert ac.wait_for_results(n, timeout=WAIT)
        fetcher.pause.set()
        assert fetcher.parked.wait(WAIT), "the fetcher did not go idle"
        assert wait_until(lambda: scrape(base).total("acagent_tasks_uploaded_total") == n)
        after = scrape(base)
        assert _agent_counts(after) == _server_counts(ac)
        assert after.value("acagent_ac_requests_total", endpoint="get-task", status="200") == (
            ac.count("get-task", 200)
        )
        assert after.value("acagent_ac_requests_total", endpoint="put-result", status="200") == (
            ac.count("put-result", 200)
        )
        assert after.value("acagent_tasks_fetched_total") == ac.tasks_handed_out == n
        received = ac.all_results()
        assert len(received) == n
        vias = Counter(r.via for r in received)
        assert after.by_labels("acagent_tasks_uploaded_total") == {
            (via,): float(k) for via, k in vias.items()
        }
        assert after.value("acagent_tasks_processed_total", outcome="ok") == n
        assert not after.families["acagent_tasks_failed_total"].samples
        assert after.value("acagent_get_task_seconds_count") == ac.count("get-task")
        assert after.value("acagent_upload_seconds_count") == n
        for gauge in ("task_queue_size", "result_queue_size", "spool_size", "ac_inflight"):
            assert after.value("acagent_" + gauge) == 0, gauge
        assert scrape(base).agent_lines() == after.agent_lines()  # nothing moves any more
        for tid, (size, seed) in expected.items():
            (r,) = ac.results[tid]
            assert r.body_len == size and r.body_sha256 == expected_sha256(size, seed)
    finally:
        ac.unstall("put-result")
        assert pipeline.stop(timeout=WAIT)
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/metrics", timeout=HTTP_TIMEOUT)


# ---------------------------------------------------------------------------
# /readyz and /healthz
# ---------------------------------------------------------------------------
def test_readyz_follows_the_ac_server_and_healthz_stays_up(
    ac: FakeACServer, tmp_path: Path
) -> None:
    pipeline = obs_pipeline(obs_config(ac, tmp_path))
    pipeline.start()
    try:
        base = health_url(pipeline)
        assert wait_until(lambda: probe(base + "/readyz")[0] == 200)

        ac.set_down(True)  # connections refused
        assert wait_until(lambda: probe(base + "/readyz")[0] == 503)
        status, reason = probe(base + "/readyz")
        assert status == 503 and "AC server" in reason
        assert probe(base + "/healthz") == (200, "ok\n")  # an outage is not a dead agent
        errors = scrape(base).value(
            "acagent_ac_requests_total", endpoint="get-task", status="error"
        )
        assert errors is not None and errors >= 1

        ac.set_down(False)
        assert wait_until(lambda: probe(base + "/readyz")[0] == 200)
        assert probe(base + "/readyz") == (200, "ok\n")
        assert probe(base + "/healthz")[0] == 200
    finally:
        assert pipeline.stop(timeout=WAIT)


def test_readyz_is_503_before_the_first_good_exchange(tmp_path: Path) -> None:
    with FakeACServer() as ac:
        ac.set_down(True)
        pipeline = obs_pipeline(obs_config(ac, tmp_path))
        pipeline.start()
        try:
            base = health_url(pipeline)
            assert wait_until(lambda: ac.count("get-task") == 0 and _get_task_errors(base) >= 2)
            assert probe(base + "/readyz")[0] == 503
            ac.set_down(False)
            assert wait_until(lambda: probe(base + "/readyz")[0] == 200)
        finally:
            assert pipeline.stop(timeout=WAIT)


def _get_task_errors(base: str) -> float:
    return scrape(base).value("acagent_ac_requests_total", endpoint="get-task", status="error") or 0


def test_healthz_turns_503_when_a_stage_thread_dies(
    ac: FakeACServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="acagent.threadcrash")
    pipeline = obs_pipeline(obs_config(ac, tmp_path, shutdown_timeout=1.0), DyingFetcher)
    fetcher = cast(DyingFetcher, pipeline.fetcher)
    pipeline.start()
    try:
        base = health_url(pipeline)
        assert probe(base + "/healthz") == (200, "ok\n")
        assert wait_until(lambda: ac.count("get-task", 200) >= 2)
        assert probe(base + "/healthz") == (200, "ok\n")

        fetcher.die.set()
        assert fetcher.join(WAIT), "the fetcher thread should have died"
        status, reason = probe(base + "/healthz")
        assert status == 503
        assert "acagent-fetcher" in reason and "SystemExit" in reason
        assert pipeline.fatal_reason is not None and "acagent-fetcher" in pipeline.fatal_reason
        # not silent: a log record with the thread name and the traceback
        crashes = [r for r in caplog.records if r.name == "acagent.threadcrash"]
        assert len(crashes) == 1
        assert "acagent-fetcher" in crashes[0].getMessage()
        assert crashes[0].exc_info is not None and crashes[0].exc_info[0] is SystemExit
        assert pipeline.stopping  # the agent asked itself to stop (run_forever returns)
    finally:
        pipeline.stop(timeout=1.0)
    assert pipeline.wait_stopped(1.0)


# ---------------------------------------------------------------------------
# the JSON-lines metrics file
# ---------------------------------------------------------------------------
def test_metrics_file_of_a_real_run_has_todays_line_shape(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    ids = [f"mf-{i}" for i in range(6)]
    ac.add_tasks(bytes_task(target, tid, 1000 + i, i) for i, tid in enumerate(ids))
    log_dir = tmp_path / "log"
    config = obs_config(ac, tmp_path, enable_metrics_file=True, log_dir=str(log_dir), index="_obs")
    pipeline = obs_pipeline(config, fetcher=PausableFetcher)
    fetcher = cast(PausableFetcher, pipeline.fetcher)
    before = int(time.time() * 1000)
    pipeline.start()
    try:
        assert ac.wait_for_results(len(ids), timeout=WAIT)
        fetcher.pause.set()
        assert fetcher.parked.wait(WAIT)
    finally:
        assert pipeline.stop(timeout=WAIT)
    after = int(time.time() * 1000)

    path = log_dir / "metrics" / "metrics_obs.json"
    assert path.is_file(), sorted(p.name for p in log_dir.rglob("*"))
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    lines = raw.splitlines()
    assert lines
    seen: Counter[Tuple[str, str]] = Counter()
    put_result_ids: List[str] = []
    for line in lines:
        pairs = json.loads(line, object_pairs_hook=lambda kv: kv)
        assert [k for k, _ in pairs] == ["@timestamp", "metric_name", "value", "tags"], line
        obj = dict(pairs)
        assert type(obj["@timestamp"]) is int and before <= obj["@timestamp"] <= after
        assert obj["metric_name"] == "http.request.duration_ms"
        assert type(obj["value"]) in (int, float) and obj["value"] >= 0
        tags = dict(obj["tags"])
        assert all(type(k) is str and type(v) is str for k, v in tags.items()), line
        assert json.dumps(json.loads(line)) == line  # today's separators, nothing else
        for value in tags.values():
            assert "?" not in value and "#" not in value and "@" not in value, line
        assert tags["url"] == f"{ac.url}/api/http-teleport/{tags['operation']}"
        assert tags["domain"] == "127.0.0.1"
        seen[(tags["operation"], tags["status_code"])] += 1
        if tags["operation"] == "put-result":
            assert tags["method"] == "POST"
            put_result_ids.append(tags["task_id"])
        elif tags["operation"] == "get-task":
            assert tags["method"] == "GET" and tags["task_id"] == ""
    assert API_KEY not in raw
    assert pipeline.client.agent_id not in raw  # get-task's query string never lands in a tag
    assert sorted(put_result_ids) == sorted(ids)  # each upload line names its task
    server = Counter((r.endpoint, str(r.status)) for r in ac.requests if r.endpoint != "s3")
    assert dict(seen) == dict(server)


# ---------------------------------------------------------------------------
# the status line
# ---------------------------------------------------------------------------
class StatusLines(logging.Handler):
    """Collects the status lines the pipeline logs; ``wait_for(n)`` is bounded."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: List[str] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("status: "):
            with self._cond:
                self.lines.append(message)
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.lines) >= n, timeout)

    def count(self) -> int:
        with self._cond:
            return len(self.lines)


@pytest.fixture
def status_lines() -> Iterator[StatusLines]:
    logger = logging.getLogger("acagent.pipeline")
    handler = StatusLines()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


_STATUS_RE = re.compile(
    r"status: fetched=(\d+) processed=(\d+) uploaded=(\d+) failed=(\d+) \| "
    r"queue task=(\d+) result=(\d+) spool=(\d+) \| busy=(\d+) ac_inflight=(\d+)/(\d+) \| "
    r"per-min fetched=[\d.]+ processed=[\d.]+ uploaded=[\d.]+ failed=[\d.]+ retrying=(\d+) "
    r"rate_limit=(\d+/min|off)"
)


def test_status_line_every_interval(
    ac: FakeACServer, tmp_path: Path, status_lines: StatusLines
) -> None:
    pipeline = obs_pipeline(obs_config(ac, tmp_path, status_interval=0.1))
    started = time.monotonic()
    pipeline.start()
    try:
        assert status_lines.wait_for(3), status_lines.lines
        assert time.monotonic() - started >= 0.25  # three intervals of 0.1 s at least
    finally:
        assert pipeline.stop(timeout=WAIT)
    for line in status_lines.lines:
        assert _STATUS_RE.fullmatch(line), line


def test_status_line_on_request(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path, status_lines: StatusLines
) -> None:
    ac.add_tasks(bytes_task(target, f"st-{i}", 100, i) for i in range(3))
    pipeline = obs_pipeline(obs_config(ac, tmp_path, status_interval=3600))
    pipeline.start()
    try:
        assert ac.wait_for_results(3, timeout=WAIT)
        assert wait_until(lambda: pipeline.metrics.counter_totals()["uploaded"] == 3)
        assert status_lines.count() == 0  # the interval is an hour: nothing yet
        pipeline.request_status()
        assert status_lines.wait_for(1)
        m = _STATUS_RE.fullmatch(status_lines.lines[0])
        assert m is not None, status_lines.lines[0]
        fetched, processed, uploaded, failed, task_q, result_q, spool, busy = (
            int(x) for x in m.groups()[:8]
        )
        assert (fetched, processed, uploaded, failed) == (3, 3, 3, 0)
        assert (task_q, result_q, spool, busy) == (0, 0, 0, 0)
        assert m.group(10) == "2" and m.group(11) == "0"
        assert m.group(12) == "off"  # the tests' configs turn the rate limit off
        pipeline.rate_limits.set_rate(250)  # as globalConfig rateLimitPerMin would
        assert pipeline.status_line().endswith(" rate_limit=250/min")
        pipeline.request_status()
        assert status_lines.wait_for(2)
    finally:
        assert pipeline.stop(timeout=WAIT)
    assert status_lines.count() == 2


def test_busy_counts_the_threads_running_not_the_prefetched_task(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    """Two threads and one task of prefetch: three tasks taken, the third waits
    for a thread inside the executor; busy says two, as many as run."""
    ac.add_tasks(
        {"taskId": f"busy-{i}", "method": "GET", "url": f"{target.url}/bytes/10?latency=1.5"}
        for i in range(3)
    )
    pipeline = obs_pipeline(
        obs_config(ac, tmp_path, executor_pool_size=2, prefetch=1, status_interval=3600)
    )
    pipeline.start()
    try:
        assert wait_until(
            lambda: (
                ac.tasks_handed_out == 3
                and target.inflight == 2
                and pipeline.ledger.tasks.qsize() == 0  # the third is the executor's
                and pipeline.ledger.executing == 3
            )
        )
        m = _STATUS_RE.fullmatch(pipeline.status_line())
        assert m is not None
        assert int(m.group(8)) == 2  # busy
        assert metric_value(pipeline.metrics.executor_busy_threads) == 2
        assert ac.wait_for_results(3, timeout=WAIT)
        assert wait_until(lambda: metric_value(pipeline.metrics.executor_busy_threads) == 0)
    finally:
        assert pipeline.stop(timeout=WAIT)
