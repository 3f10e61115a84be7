"""Recovery: results survive an AC outage longer than the retry budget, and a crash.

In-process: the AC server goes away (listener closed, or every upload answered
503) after the tasks were fetched; each upload spends its retry budget and is
kept in the spool and retried on its own schedule; when the server is back
every result arrives. Subprocess: the CLI agent is SIGKILLed while its results sit in
the spool; a new agent on the same spool delivers them.
"""

from __future__ import annotations

import base64
import signal
import threading
from pathlib import Path
from typing import Dict, List, Set

import pytest
from helpers import (
    WAIT,
    AgentProcess,
    make_config,
    make_pipeline,
    running,
    spool_names,
    spool_records,
    wait_until,
)

from acagent.models import Result
from acagent.observers import Observer
from acagent.spool import QUARANTINE_DIR, ResultSpool
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

N = 6


class RetryCounter(Observer):
    """Counts failed delivery attempts per task (the uploader's retry events)."""

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.retries: Dict[str, int] = {}
        self.all_retried = threading.Event()
        self._lock = threading.Lock()

    def on_result_retry(self, result: Result, reason: str, wait: float) -> None:
        with self._lock:
            self.retries[result.task_id] = self.retries.get(result.task_id, 0) + 1
            done = [t for t, n in self.retries.items() if n >= self.wanted]
            if len(done) >= N:
                self.all_retried.set()


def _tasks(target: FakeTarget, prefix: str, latency: float) -> List[Dict[str, object]]:
    return [
        {
            "taskId": f"{prefix}-{i}",
            "method": "GET",
            "url": f"{target.url}/bytes/{1000 + i}?seed={i}&latency={latency}",
        }
        for i in range(N)
    ]


@pytest.mark.parametrize("outage", ["listener-down", "upload-503"])
def test_results_parked_during_long_outage_arrive_afterwards(tmp_path: Path, outage: str) -> None:
    with FakeTarget() as target, FakeACServer() as ac:
        if outage == "upload-503":
            ac.inject("put-result", status=503, body=b"maintenance", times=100_000)
        config = make_config(ac.url, tmp_path / "spool", executor_pool_size=N)
        retries = RetryCounter(wanted=4)
        pipeline = make_pipeline(config, observers=[retries])
        # The targets answer after 0.5 s, so every task is fetched (and the
        # listener closed) before the first result is ready for upload.
        ac.add_tasks(_tasks(target, outage, latency=0.5))
        with running(pipeline):
            assert ac.wait_for(lambda: ac.tasks_handed_out == N, WAIT)
            if outage == "listener-down":
                ac.set_down(True)
            # Every result fails again and again, each on its own schedule, and is kept.
            assert retries.all_retried.wait(WAIT), retries.retries
            assert ac.results == {}, "a result got through during the outage"
            assert pipeline.spool.size() == N
            assert pipeline.fetcher.is_alive() and pipeline.uploader.is_alive()
            if outage == "listener-down":
                ac.set_down(False)
            else:
                ac.clear_faults()
            assert ac.wait_for_results(N, WAIT), sorted(ac.results)
            assert wait_until(lambda: pipeline.spool.size() == 0, WAIT)
        results = ac.results
        assert sorted(results) == sorted(f"{outage}-{i}" for i in range(N))
        for i in range(N):
            (got,) = results[f"{outage}-{i}"]  # exactly one each
            assert got.via == "inline" and got.fields["statusCode"] == 200
            assert got.body_sha256 == expected_sha256(1000 + i, i)
        if outage == "upload-503":
            assert ac.count("put-result", 503) >= N * 4
        assert ac.max_inflight <= 2
        assert spool_names(tmp_path / "spool") == []


@pytest.mark.timeout(90)
def test_sigkill_with_results_in_spool_then_restart_delivers_everything(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with FakeTarget() as target, FakeACServer() as ac:
        # The first put-result is recorded but its reply is lost (a 503 after
        # processing): the agent cannot know, so it keeps the result and may
        # send it again: the one legitimate duplicate. Every other upload
        # fails (the agent retries with its default 5 s backoff), so the
        # results stay in the spool until the kill.
        ac.inject("put-result", status=503, process=True, times=1)
        ac.inject("put-result", status=503, body=b"maintenance", times=100_000)
        ac.inject("upload-result", status=503, body=b"maintenance", times=100_000)
        tasks = [
            {
                "taskId": f"crash-{i}",
                "method": "GET",
                "url": f"{target.url}/bytes/{700 + i}?seed={i}",
            }
            for i in range(N)
        ]
        # one body above the inline limit and one above the record's: their
        # spool body files must survive too (the small ones live in their records)
        tasks.append(
            {"taskId": "crash-big", "method": "GET", "url": f"{target.url}/bytes/600000?seed=99"}
        )
        tasks.append(
            {"taskId": "crash-mid", "method": "GET", "url": f"{target.url}/bytes/40000?seed=98"}
        )
        ac.add_tasks(tasks)
        first = AgentProcess(ac.url, spool, tmp_path / "first.log")
        with first:
            ids = {t["taskId"] for t in tasks}
            held = wait_until(lambda: _saved_result_ids(spool) >= ids, WAIT)
            assert held, (spool_records(spool), first.output())
            assert len(list(spool.glob("*.body"))) == 2  # crash-big and crash-mid
            assert ac.wait_for_results(1, WAIT)  # the lost-reply result
            accepted_before_kill = set(ac.results)
            first.kill()
            assert first.proc.returncode == -signal.SIGKILL
        assert ac.tasks_handed_out == len(tasks)
        assert len(accepted_before_kill) == 1  # only the lost-reply result got in
        assert ac.count("put-result", 503) >= 1  # it did try

        ac.clear_faults()
        second = AgentProcess(ac.url, spool, tmp_path / "second.log")
        with second:
            assert ac.wait_for_results(len(tasks), WAIT), (sorted(ac.results), second.output())
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
            second.signal(signal.SIGTERM)
            assert second.wait(15) == 0, second.output()
        results = ac.results
        assert set(results) == {t["taskId"] for t in tasks}
        for task_id, got in results.items():
            # at-least-once: a duplicate is allowed only for a result accepted before the kill
            if task_id not in accepted_before_kill:
                assert len(got) == 1, task_id
            else:
                assert all(g.fields == got[0].fields for g in got), task_id
        for i in range(N):
            for got in results[f"crash-{i}"]:
                assert got.via == "inline" and got.body_sha256 == expected_sha256(700 + i, i)
        (big,) = results["crash-big"]
        assert big.via == "upload" and big.body_sha256 == expected_sha256(600000, 99)
        (mid,) = results["crash-mid"]
        assert mid.via == "inline" and mid.body_sha256 == expected_sha256(40000, 98)
        assert ac.max_inflight <= 2
        leftovers = spool_names(spool)
        assert leftovers == []


def _saved_result_ids(spool: Path) -> Set[str]:
    """Task ids with a saved result (not a journal of a task still running)."""
    return {
        str(r["fields"]["taskId"])
        for r in spool_records(spool)
        if r.get("failure") != "interrupted"
    }


@pytest.mark.timeout(90)
def test_sigkill_while_tasks_run_answers_them_after_restart(tmp_path: Path) -> None:
    """Tasks taken but not finished at a kill -9 come back from the spool
    (their journal) as error results, once each; they are not run again."""
    spool = tmp_path / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        slow = [
            {
                "taskId": f"slow-{i}",
                "method": "POST",
                "url": f"{target.url}/bytes/100?seed={i}&latency=60",
            }
            for i in range(3)
        ]
        ac.add_tasks(slow)
        first = AgentProcess(ac.url, spool, tmp_path / "first.log", extra=["--executorPoolSize", "2", "--prefetch", "1"])
        with first:
            # two run, the third waits for a thread (prefetch): all three are journaled
            assert wait_until(lambda: ac.tasks_handed_out == 3 and target.inflight == 2, WAIT), (
                first.output()
            )
            assert wait_until(lambda: len(spool_records(spool)) == 3, WAIT)
            first.kill()
        assert ac.results == {}
        connections_before = target.connections_opened

        second = AgentProcess(ac.url, spool, tmp_path / "second.log")
        with second:
            assert ac.wait_for_results(3, WAIT), second.output()
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
            second.signal(signal.SIGTERM)
            assert second.wait(15) == 0, second.output()
        assert "not run again" in second.output()
    results = ac.results
    assert set(results) == {t["taskId"] for t in slow}
    for task_id, got in results.items():
        assert len(got) == 1, task_id
        assert got[0].via == "error" and "killed or crashed" in str(got[0].fields["output"])
        assert got[0].fields["statusCode"] == 500
    assert target.connections_opened == connections_before  # nothing sent to the target again


def test_a_record_whose_kept_body_is_damaged_is_quarantined_and_the_rest_delivered(
    tmp_path: Path,
) -> None:
    """At start, a record holding its body (base64) is delivered byte-exact; one
    whose kept body does not decode to its size is moved to quarantine with the
    reason, and its task answered with an error result, never with that body."""
    spool_dir = tmp_path / "spool"
    spool = ResultSpool(spool_dir)
    data = bytes(range(256)) * 4
    good = Result(
        fields={"taskId": "kept-good", "method": "GET", "url": "http://tool/"},
        status_code=200,
        body_size=len(data),
        body_base64=base64.b64encode(data).decode("ascii"),
    )
    damaged = Result(
        fields={"taskId": "kept-damaged", "method": "GET", "url": "http://tool/"},
        status_code=200,
        body_size=len(data) + 1,
        body_base64=base64.b64encode(data).decode("ascii"),
    )
    for result in (good, damaged):
        spool.save(result.key, result.to_record(), has_body=False)
    with FakeACServer() as ac:
        pipeline = make_pipeline(make_config(ac.url, spool_dir))
        with running(pipeline):
            assert ac.wait_for_results(2, WAIT)
            assert wait_until(lambda: spool_records(spool_dir) == [], WAIT)
        assert set(ac.results) == {"kept-good", "kept-damaged"}
        (got,) = ac.results["kept-good"]
        assert got.via == "inline" and got.body == data
        (answer,) = ac.results["kept-damaged"]
        assert answer.via == "error" and "damaged" in answer.fields["output"]
    (folder,) = (spool_dir / QUARANTINE_DIR).iterdir()
    assert folder.name == damaged.key
    assert "unusable record" in (folder / "reason.txt").read_text()
    assert "bodyBase64" in (folder / "record.json").read_text()  # kept for a human
