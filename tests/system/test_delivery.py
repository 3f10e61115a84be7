"""Delivery that never blocks and never destroys a result.

Real servers on 127.0.0.1: the fake AC server refuses, faults and stalls;
the agent must deliver every real result byte-exact, never replace one by an
error result for a status an operator could fix or that may be transient,
never let one failing result hold up the others, and keep its accounting
(reservations, executor slots) whole on every path.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from helpers import (
    WAIT,
    AgentProcess,
    fast_policy,
    make_config,
    make_pipeline,
    running,
    spool_names,
    wait_until,
)

from acagent.ac.backoff import Backoff
from acagent.errors import SpoolLockedError
from acagent.models import Result
from acagent.observers import Observer
from acagent.spool import QUARANTINE_DIR
from acagent.testing import FakeACServer, FakeTarget, expected_body, expected_sha256


def _bytes_task(target: FakeTarget, task_id: str, size: int, seed: int) -> Dict[str, object]:
    return {"taskId": task_id, "method": "GET", "url": f"{target.url}/bytes/{size}?seed={seed}"}


def _acagent_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("acagent-")]


class Holds(Observer):
    """Records every hold set and released, in order."""

    def __init__(self) -> None:
        self.events: List[tuple] = []

    def on_hold(self, reason_key: str, message: object) -> None:
        self.events.append((reason_key, message))


# ---------------------------------------------------------------------------
# never destroy a result
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("status", [401, 403, 407, 408, 413, 429, 500, 502, 503, 504])
def test_transient_status_on_uploads_never_replaces_a_real_result(
    tmp_path: Path, status: int
) -> None:
    sizes = [300, 2_000, 700_000, 40_000]  # inline, inline, upload-result, inline
    with FakeTarget() as target, FakeACServer() as ac:
        # Every first attempt of every upload path is refused with ``status``.
        ac.inject("put-result", status=status, body=b"refused for now", times=len(sizes))
        ac.inject("upload-result", status=status, body=b"refused for now", times=1)
        ac.add_tasks(_bytes_task(target, f"t{i}", n, i) for i, n in enumerate(sizes))
        holds = Holds()
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool"), observers=[holds])
        with running(pipeline):
            assert ac.wait_for_results(len(sizes), WAIT), sorted(ac.results)
            assert wait_until(lambda: pipeline.spool.size() == 0, WAIT)
            assert pipeline.ledger.holds() == {}  # any hold was released by a success
        for i, n in enumerate(sizes):
            (got,) = ac.results[f"t{i}"]
            assert got.via in ("inline", "upload"), got.via
            assert got.fields["statusCode"] == 200
            assert got.body_sha256 == expected_sha256(n, i)
        if status in (401, 403):
            # the API key was refused: fetching paused, then resumed by itself
            assert holds.events[0][0] == "auth" and "--apiKey" in str(holds.events[0][1])
            assert holds.events[-1] == ("auth", None)
        if status == 413:
            # put-result too large for the server: the same result went through upload-result
            assert all(r.via == "upload" for rs in ac.results.values() for r in rs)
        assert ac.max_inflight <= 2


@pytest.mark.parametrize("size", [1_000, 40_000], ids=["body-in-record", "body-file"])
def test_content_refused_for_good_is_quarantined_and_answered_with_the_reason(
    tmp_path: Path, size: int
) -> None:
    with FakeTarget() as target, FakeACServer() as ac:
        ac.inject("put-result", status=422, body=b"field statusCode: bad value", times=3)
        ac.add_task(_bytes_task(target, "refused", size, 3))
        spool = tmp_path / "spool"
        pipeline = make_pipeline(make_config(ac.url, spool))
        with running(pipeline):
            assert ac.wait_for_results(1, WAIT)
        (got,) = ac.results["refused"]
        assert got.via == "error"
        assert "HTTP 422" in got.fields["output"]
        assert "field statusCode: bad value" in got.fields["output"]  # the server's reason
        (folder,) = (spool / QUARANTINE_DIR).iterdir()
        kept = {p.name for p in folder.iterdir()}
        assert kept == {"record.json", "body", "reason.txt"}
        assert (folder / "body").read_bytes() == expected_body(size, 3)  # nothing lost
        record = json.loads((folder / "record.json").read_text())
        assert record["fields"]["taskId"] == "refused"
        assert "422" in (folder / "reason.txt").read_text()
        assert spool_names(spool) == [QUARANTINE_DIR]


def test_retrying_counts_the_results_waiting_for_a_retry(tmp_path: Path) -> None:
    # Each failed result waits 30 s for its retry: the count is steady meanwhile.
    policy = fast_policy(result=Backoff(30.0, 30.0))
    refused = ["wait-0", "wait-1", "wait-2"]
    with FakeTarget() as target, FakeACServer() as ac:
        ac.refuse_results(refused, status=503, seconds=WAIT * 3)
        ac.add_tasks(
            _bytes_task(target, tid, 200 + i, i) for i, tid in enumerate([*refused, "ok-0", "ok-1"])
        )
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool"), retry_policy=policy)
        with running(pipeline):
            assert ac.wait_for(lambda: set(ac.results) == {"ok-0", "ok-1"}, WAIT)
            assert wait_until(lambda: pipeline.uploader.retrying == 3, WAIT)
            assert " retrying=3 " in pipeline.status_line()
            # fresh results queued behind a stalled put-result are not retrying
            release = ac.stall("put-result")
            try:
                ac.add_tasks(_bytes_task(target, f"new-{i}", 300 + i, i) for i in range(4))
                assert wait_until(lambda: len(pipeline.ledger.results) >= 4, WAIT)
                assert pipeline.uploader.retrying == 3
            finally:
                release.set()
            ac.refuse_results(refused, status=503, seconds=0)  # the server takes them now
            pipeline.ledger.results.make_all_due()
            assert ac.wait_for_results(9, WAIT)
            assert wait_until(lambda: pipeline.uploader.retrying == 0, WAIT)
            assert " retrying=0 " in pipeline.status_line()


# ---------------------------------------------------------------------------
# no head-of-line blocking
# ---------------------------------------------------------------------------
def test_refused_results_do_not_hold_up_the_healthy_ones(tmp_path: Path) -> None:
    n, refused = 80, ["hol-3", "hol-40", "hol-77"]
    with FakeTarget() as target, FakeACServer() as ac:
        ac.refuse_results(refused, status=503, seconds=8.0)
        refusal_ends = time.monotonic() + 8.0
        ac.add_tasks(_bytes_task(target, f"hol-{i}", 500 + i, i) for i in range(n))
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool", executor_pool_size=10))
        with running(pipeline):
            # every healthy result arrives while the three are still being refused
            healthy = n - len(refused)
            assert ac.wait_for(lambda: len(ac.results) >= healthy, WAIT)
            assert time.monotonic() < refusal_ends, "healthy results waited for refused ones"
            assert not set(refused) & set(ac.results)
            # and the refused ones arrive once the server takes them
            assert ac.wait_for_results(n, WAIT)
            assert wait_until(lambda: pipeline.spool.size() == 0, WAIT)
        for task_id in refused:
            (got,) = ac.results[task_id]
            i = int(task_id.split("-")[1])
            assert got.via == "inline" and got.body_sha256 == expected_sha256(500 + i, i)


# ---------------------------------------------------------------------------
# one agent per spool folder, all-or-nothing start
# ---------------------------------------------------------------------------
def test_a_second_agent_on_the_same_spool_exits_2_naming_folder_and_holder(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    with FakeACServer() as ac:
        with AgentProcess(ac.url, spool, tmp_path / "first.log") as first:
            assert ac.wait_for(lambda: ac.count("get-task") >= 1, WAIT), first.output()
            second = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "acagent",
                    "--serverUrl",
                    ac.url,
                    "--apiKey",
                    "k",
                    "--spoolDir",
                    str(spool),
                    "--enableFileLogging",
                    "false",
                    "--metricsFile",
                    "false",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert second.returncode == 2, second.stdout + second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert str(spool) in lines[0] and f"pid {first.proc.pid}" in lines[0]
            first.signal(15)
            assert first.wait(20) == 0


def test_in_process_second_pipeline_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    with FakeACServer() as ac:
        config = make_config(ac.url, tmp_path / "spool")
        with running(make_pipeline(config)):
            other = make_pipeline(config)
            with pytest.raises(SpoolLockedError):
                other.start()


def test_failing_start_fetches_nothing_and_leaves_no_thread(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with FakeTarget() as target, FakeACServer() as ac:
            ac.add_task(_bytes_task(target, "never", 10, 1))
            before = set(_acagent_threads())
            pipeline = make_pipeline(
                make_config(ac.url, tmp_path / "spool", health_addr=f"127.0.0.1:{port}")
            )
            with pytest.raises(OSError):
                pipeline.start()
            assert ac.count("get-task") == 0 and ac.tasks_handed_out == 0
            assert wait_until(lambda: set(_acagent_threads()) <= before, 5.0), _acagent_threads()
            # the lock went with the failed start: a new agent can use the folder
            with running(make_pipeline(make_config(ac.url, tmp_path / "spool"))):
                assert ac.wait_for_results(1, WAIT)
    finally:
        taken.close()


# ---------------------------------------------------------------------------
# expiry is a deadline; stop during a long poll
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def trickling_server() -> Iterator[str]:
    """A target that sends its headers, then one body byte a second, for a minute."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n")
                for _ in range(60):
                    if stop.wait(1.0):
                        return
                    conn.sendall(b"x")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), name="trickle-conn", daemon=True).start()

    acceptor = threading.Thread(target=accept, name="trickle-accept", daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()


def test_a_trickling_target_is_cut_at_the_task_expiry(tmp_path: Path) -> None:
    with trickling_server() as url, FakeACServer() as ac:
        expiry_ms = int(time.time() * 1000) + 2_000
        ac.add_task({"taskId": "trickle", "method": "GET", "url": url, "expiryTsMs": expiry_ms})
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool"))
        with running(pipeline):
            assert ac.wait_for_results(1, WAIT)
            answered_ms = time.time() * 1000
        (got,) = ac.results["trickle"]
        assert got.via == "error"
        assert "expired while reading the response" in got.fields["output"]
        assert answered_ms <= expiry_ms + 2_000, answered_ms - expiry_ms


def test_a_stop_whose_reserve_is_its_whole_budget_cuts_a_long_poll_at_once(
    tmp_path: Path,
) -> None:
    with FakeACServer(hold_poll=60.0) as ac:
        config = make_config(ac.url, tmp_path / "spool", shutdown_poll_reserve=20.0)
        pipeline = make_pipeline(config)
        pipeline.start()
        try:
            assert ac.wait_for(lambda: ac.inflight >= 1, WAIT)  # get-task held by the server
        finally:
            started = time.monotonic()
            assert pipeline.stop(timeout=20)
            took = time.monotonic() - started
        assert took < 5, took
        assert not pipeline.fetcher.is_alive()


# ---------------------------------------------------------------------------
# the spool: file name wins; a fetch-logs result across a restart
# ---------------------------------------------------------------------------
def test_a_spool_record_is_known_by_its_file_name(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    key, lying_key = "d" * 32, "e" * 32
    record = Result(
        fields={"taskId": "named-by-file", "method": "GET", "url": "http://x/"},
        status_code=204,
        key=lying_key,
    ).to_record()
    (spool / f"{key}.json").write_text(json.dumps(record))
    with FakeACServer() as ac:
        with running(make_pipeline(make_config(ac.url, spool))):
            assert ac.wait_for_results(1, WAIT)
            assert wait_until(lambda: spool_names(spool) == [], WAIT)
    (got,) = ac.results["named-by-file"]
    assert got.via == "empty"


def test_a_fetch_logs_result_kept_across_a_restart_is_delivered(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "app_log_prod.log").write_text("a line of the agent's log\n")
    key = "f" * 32
    record = Result(
        fields={"taskId": "fetchLogs-1", "url": "https://ac/agent/fetch-logs", "method": "GET"},
        status_code=200,
        logs_zip=str(tmp_path / "gone" / f"logs_{key}.zip"),  # the earlier run's work dir
        key=key,
    ).to_record()
    (spool / f"{key}.json").write_text(json.dumps(record))
    with FakeACServer() as ac:
        config = make_config(ac.url, spool, log_dir=str(log_dir))
        with running(make_pipeline(config)):
            assert ac.wait_for_results(1, WAIT)
    (got,) = ac.results["fetchLogs-1"]
    assert got.via == "logs"
    assert got.body_len > 0


class _ReadyTimes(Observer):
    """When each result was ready for delivery (monotonic), by task id."""

    def __init__(self) -> None:
        self.at: Dict[str, float] = {}

    def on_result_ready(self, result: Result) -> None:
        self.at[result.task_id] = time.monotonic()


#: how long the server holds the one slow upload-result
HOLD = 20.0


@pytest.mark.timeout(120)
def test_one_upload_held_20s_delays_no_small_result(tmp_path: Path) -> None:
    # One upload-result held 20 s by the server (a proxy slow on large POSTs),
    # far below any backlog; 20 small results become ready meanwhile. With
    # acMaxConcurrent 2 the one sender's lane is held: the small results go
    # out on get-task's permit, between get-tasks, each within 3 s of being
    # ready, never more than 2 requests in flight at the server.
    ready = _ReadyTimes()
    with FakeTarget() as target, FakeACServer(max_concurrent=2) as ac:
        ac.inject("upload-result", delay=HOLD)
        ac.add_task(_bytes_task(target, "held", 700_000, 1))
        config = make_config(ac.url, tmp_path / "spool", poll_interval=0.2)
        with running(make_pipeline(config, observers=[ready])):
            assert ac.wait_for(lambda: ac.arrivals("upload-result") == 1, WAIT)
            ac.add_tasks(_bytes_task(target, f"small-{i}", 100 + i, i) for i in range(20))
            assert ac.wait_for(lambda: len(ac.results) == 20, WAIT), sorted(ac.results)
            assert "held" not in ac.results  # all 20 came while the big one was held
            # the server lets the held one through after HOLD seconds: it arrives
            assert ac.wait_for_results(21, HOLD + WAIT)
        results = ac.results
        (upload,) = [r for r in ac.requests if r.endpoint == "upload-result"]
    delays = {tid: got[0].received - ready.at[tid] for tid, got in results.items() if tid != "held"}
    print(f"\nsmall results behind a held upload: slowest {max(delays.values()):.2f}s after ready")
    assert {tid: round(d, 2) for tid, d in delays.items() if d > 3.0} == {}
    assert ac.max_inflight <= 2 and ac.rejected_concurrent == 0
    (held,) = results["held"]
    assert held.via == "upload" and held.body_sha256 == expected_sha256(700_000, 1)
    assert upload.status == 200 and held.received - upload.started >= HOLD
    assert held.received > max(got[0].received for tid, got in results.items() if tid != "held")
