"""HealthServer over real HTTP, and ReadinessTracker."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from typing import Iterator, List, Tuple

import pytest
import requests
from helpers import FakeClock
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from acagent.health import METRICS_CONTENT_TYPE, HealthServer, ReadinessTracker
from acagent.metrics import AgentMetrics

TIMEOUT = 5.0


class Flags:
    def __init__(self) -> None:
        self.live: Tuple[bool, str] = (True, "")
        self.ready: Tuple[bool, str] = (False, "no AC exchange yet")
        self.metrics_calls = 0

    def liveness(self) -> Tuple[bool, str]:
        return self.live

    def readiness(self) -> Tuple[bool, str]:
        return self.ready


@pytest.fixture
def flags() -> Flags:
    return Flags()


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics()


@pytest.fixture
def server(flags: Flags, metrics: AgentMetrics) -> Iterator[HealthServer]:
    srv = HealthServer(
        "127.0.0.1",
        0,
        liveness=flags.liveness,
        readiness=flags.readiness,
        registry=metrics.registry,
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(timeout=TIMEOUT)


def _health_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("acagent-health")]


def test_binds_a_free_port_and_names_its_thread(server: HealthServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.url == f"http://127.0.0.1:{port}"
    assert server.running
    assert any(t.name == "acagent-health" for t in threading.enumerate())


def test_healthz_ok_and_failing(server: HealthServer, flags: Flags) -> None:
    r = requests.get(server.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.text.strip() == "ok"
    flags.live = (False, "executor stuck for 120s")
    r = requests.get(server.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 503
    assert "executor stuck" in r.text


def test_readyz_follows_readiness(server: HealthServer, flags: Flags) -> None:
    r = requests.get(server.url + "/readyz", timeout=TIMEOUT)
    assert r.status_code == 503
    assert "no AC exchange" in r.text
    flags.ready = (True, "ok")
    r = requests.get(server.url + "/readyz?verbose=1", timeout=TIMEOUT)
    assert r.status_code == 200


def test_a_raising_check_is_a_503(server: HealthServer, flags: Flags) -> None:
    def boom() -> Tuple[bool, str]:
        raise RuntimeError("secret detail")

    server.readiness = boom
    r = requests.get(server.url + "/readyz", timeout=TIMEOUT)
    assert r.status_code == 503
    assert "RuntimeError" in r.text and "secret detail" not in r.text


def test_metrics_endpoint(server: HealthServer, metrics: AgentMetrics) -> None:
    metrics.tasks_fetched_total.inc(7)
    r = requests.get(server.url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == METRICS_CONTENT_TYPE
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "acagent_tasks_fetched_total 7.0\n" in r.text
    assert "# TYPE acagent_get_task_seconds histogram" in r.text


def test_unknown_path_is_404_and_head_works(server: HealthServer) -> None:
    r = requests.get(server.url + "/nope", timeout=TIMEOUT)
    assert r.status_code == 404
    r = requests.post(server.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 501  # only GET and HEAD
    r = requests.head(server.url + "/healthz", timeout=TIMEOUT)
    assert r.status_code == 200 and r.text == ""


def test_keep_alive_reuses_one_connection(server: HealthServer) -> None:
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        first_sock = None
        for path in ["/healthz", "/readyz", "/metrics", "/nope"] * 5:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert not resp.will_close
            first_sock = first_sock or conn.sock
            assert conn.sock is first_sock
    finally:
        conn.close()


def test_many_parallel_probes(server: HealthServer) -> None:
    errors: List[BaseException] = []

    def probe() -> None:
        try:
            with requests.Session() as s:
                for _ in range(10):
                    assert s.get(server.url + "/metrics", timeout=TIMEOUT).status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=probe, name=f"t-probe-{i}") for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert errors == []


def test_stop_is_prompt_with_an_idle_keep_alive_connection(flags: Flags) -> None:
    srv = HealthServer(
        "127.0.0.1",
        0,
        liveness=flags.liveness,
        readiness=flags.readiness,
        registry=CollectorRegistry(),
    )
    srv.start()
    s = requests.Session()
    try:
        assert s.get(srv.url + "/healthz", timeout=TIMEOUT).status_code == 200
        # the connection stays open in the session's pool; stop must not wait for it
        started = time.monotonic()
        srv.stop(timeout=TIMEOUT)
        assert time.monotonic() - started < 3.0
    finally:
        s.close()
    assert not srv.running
    deadline = time.monotonic() + TIMEOUT
    while _health_threads() and time.monotonic() < deadline:
        for t in _health_threads():
            t.join(0.1)
    assert _health_threads() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/healthz", timeout=TIMEOUT)
    srv.stop()  # twice is fine


def test_context_manager_and_port_in_use(flags: Flags) -> None:
    with HealthServer(
        "127.0.0.1",
        0,
        liveness=flags.liveness,
        readiness=flags.readiness,
        registry=CollectorRegistry(),
    ) as srv:
        port = srv.address[1]
        assert requests.get(srv.url + "/healthz", timeout=TIMEOUT).status_code == 200
        other = HealthServer(
            "127.0.0.1",
            port,
            liveness=flags.liveness,
            readiness=flags.readiness,
            registry=CollectorRegistry(),
        )
        with pytest.raises(OSError):
            other.start()
    assert not srv.running


def test_a_half_open_client_does_not_block_others(server: HealthServer) -> None:
    host, port = server.address
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finishes its request
        r = requests.get(server.url + "/healthz", timeout=TIMEOUT)
        assert r.status_code == 200


# ---------------------------------------------------------------------------
def test_readiness_tracker() -> None:
    clock = FakeClock()
    tracker = ReadinessTracker(60.0, clock=clock)
    ok, reason = tracker.check()
    assert not ok and "yet" in reason
    tracker.record_failure()
    assert not tracker.check()[0]
    tracker.record_success()
    assert tracker.check() == (True, "ok")
    clock.now += 59
    assert tracker.check()[0]
    tracker.record_failure()
    ok, reason = tracker.check()
    assert not ok and "failed" in reason
    tracker.record_success()
    assert tracker.check()[0]
    clock.now += 61
    ok, reason = tracker.check()
    assert not ok and "61s" in reason
    with pytest.raises(ValueError):
        ReadinessTracker(0)


def test_readiness_tracker_behind_the_server(flags: Flags) -> None:
    clock = FakeClock()
    tracker = ReadinessTracker(30.0, clock=clock)
    with HealthServer(
        "127.0.0.1",
        0,
        liveness=flags.liveness,
        readiness=tracker.check,
        registry=CollectorRegistry(),
    ) as srv:
        assert requests.get(srv.url + "/readyz", timeout=TIMEOUT).status_code == 503
        tracker.record_success()
        assert requests.get(srv.url + "/readyz", timeout=TIMEOUT).status_code == 200


# ---------------------------------------------------------------------------
# errors go through logging, never raw to stderr
def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_for_record(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "acagent.health" and text in record.getMessage():
                return record
        time.sleep(0.01)
    raise AssertionError(f"no acagent.health record with {text!r}: {caplog.records}")


def test_a_client_reset_during_metrics_is_debug_and_prints_nothing(
    flags: Flags, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    reset_done = threading.Event()
    entered = threading.Event()

    class SlowCollector:
        """A collector that waits for the reset, then yields more than a socket buffer."""

        def collect(self) -> Iterator[Metric]:
            entered.set()
            assert reset_done.wait(TIMEOUT)
            family = GaugeMetricFamily("big", "padding", labels=["pad"])
            family.add_metric(["x" * 200_000], 1.0)  # the write must hit the RST
            yield family

    slow_metrics = CollectorRegistry()
    slow_metrics.register(SlowCollector())  # type: ignore[arg-type]

    caplog.set_level(logging.DEBUG, logger="acagent.health")
    with HealthServer(
        "127.0.0.1", 0, liveness=flags.liveness, readiness=flags.readiness, registry=slow_metrics
    ) as srv:
        sock = socket.create_connection(srv.address, timeout=TIMEOUT)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert entered.wait(TIMEOUT)
        _reset(sock)
        reset_done.set()
        record = _wait_for_record(caplog, "went away")
        assert record.levelno == logging.DEBUG
        # the listener still answers
        assert requests.get(srv.url + "/healthz", timeout=TIMEOUT).status_code == 200
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_client_reset_before_the_request_line_prints_nothing(
    server: HealthServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="acagent.health")
    sock = socket.create_connection(server.address, timeout=TIMEOUT)
    sock.sendall(b"GET /metr")
    _reset(sock)
    _wait_for_record(caplog, "went away")
    assert requests.get(server.url + "/healthz", timeout=TIMEOUT).status_code == 200
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_a_failing_metrics_render_is_one_warning_line_and_a_500(
    flags: Flags, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    class BrokenCollector:
        def collect(self) -> Iterator[Metric]:
            raise RuntimeError("registry broke")

    broken = CollectorRegistry()
    broken.register(BrokenCollector())  # type: ignore[arg-type]

    caplog.set_level(logging.INFO, logger="acagent.health")
    with HealthServer(
        "127.0.0.1", 0, liveness=flags.liveness, readiness=flags.readiness, registry=broken
    ) as srv:
        reply = requests.get(srv.url + "/metrics", timeout=TIMEOUT)
    assert reply.status_code == 500 and "RuntimeError" in reply.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == "rendering /metrics failed: RuntimeError: registry broke"
    assert warnings[0].exc_info is None  # the traceback is DEBUG only
    assert capfd.readouterr().err == ""
