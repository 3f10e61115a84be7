"""A bounded soak: 2,000 tasks through the whole agent with AC faults and failing targets.

Real servers on 127.0.0.1 (``FakeACServer``, ``FakeTarget``); the agent is the
library ``Pipeline`` with 20 executor threads and short retry waits. About 10%
of all AC requests fail (503, 429 with ``X-Rate-Limit-Retry-After-Seconds``,
429 with an HTTP-date ``Retry-After``, connection resets, slow replies) and
about 17% of the tasks point at targets that fail. It checks the invariants of
SPEC.md at the fake server: every task ends in exactly one result, never more
than 2 AC requests in flight, every successful body byte-exact.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from helpers import WAIT, make_config, make_pipeline, running, spool_names, wait_until

from acagent.testing import FakeACServer, FakeTarget, closed_port_url, expected_sha256

TASKS = 2000
EXECUTOR_THREADS = 20
FAULT_RATE = 0.10
SEED = 20240611


def _task_mix(
    target: str, dead: str
) -> Tuple[List[Dict[str, Any]], Dict[str, Tuple[str, int, int]]]:
    """The tasks, and per task id (kind, size, seed) for checking its result."""
    rng = random.Random(SEED)
    tasks: List[Dict[str, Any]] = []
    plan: Dict[str, Tuple[str, int, int]] = {}
    for i in range(TASKS):
        task_id = f"soak-{i:04d}"
        seed = i
        draw = rng.random()
        if draw < 0.04:
            kind, size, url = "reset", 2000, f"{target}/reset/2000?seed={seed}"
        elif draw < 0.08:
            kind, size, url = "bad-encoding", 500, f"{target}/bad-encoding/500?seed={seed}"
        elif draw < 0.11:
            kind, size, url = "refused", 0, f"{dead}/bytes/10"
        elif draw < 0.13:
            kind, size, url = "wrong-length", 1000, f"{target}/wrong-length/1000?seed={seed}"
        elif draw < 0.17:
            size = rng.randint(1, 800)
            kind, url = "status500", f"{target}/bytes/{size}?seed={seed}&status=500"
        elif draw < 0.18:
            # a few bodies above the inline limit: gzip + multipart upload-result
            size = 600_000 + rng.randint(0, 1000)
            kind, url = "ok", f"{target}/bytes/{size}?seed={seed}"
        else:
            size = (
                rng.choice([0, rng.randint(1, 4000)])
                if rng.random() < 0.05
                else rng.randint(1, 4000)
            )
            extra = rng.choice(["", "&encoding=gzip", "&chunked=1", "&encoding=deflate&chunked=1"])
            kind, url = "ok", f"{target}/bytes/{size}?seed={seed}{extra}"
        tasks.append(
            {
                "taskId": task_id,
                "method": rng.choice(["GET", "get", "POST"]),
                "url": url,
                "requestHeaders": {"Accept": "*/*"},
                "echoMe": {"n": i},
            }
        )
        plan[task_id] = (kind, size, seed)
    return tasks, plan


@pytest.mark.timeout(120)
def test_soak_2000_tasks_with_ac_and_target_faults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeTarget() as target, FakeACServer(max_concurrent=2) as ac:
        tasks, plan = _task_mix(target.url, closed_port_url())
        # retry_after=0: the server's waits are honoured but cost no wall time;
        # slow replies take 50 ms. Every kind of fault_rate fault acts *before*
        # the fake processes the request (process=False): a reset put-result
        # was never recorded, so the agent's retry of it cannot legitimately
        # duplicate. Hence "exactly one result per task" is the right check.
        ac.fault_rate(
            FAULT_RATE,
            seed=SEED,
            kinds=("503", "429s", "429d", "reset", "slow"),
            retry_after=0,
            slow_delay=0.05,
        )
        # a burst of 429s carrying both wait headers at once, early in the run
        both = {"X-Rate-Limit-Retry-After-Seconds": "0", "Retry-After": "0"}
        ac.inject("put-result", status=429, body=b"Rate limit exceeded", headers=both, times=15)
        ac.inject("get-task", status=429, body=b"Rate limit exceeded", headers=both, times=5)
        # and "Too many concurrent requests" 429s on uploads (the Fetcher waits a
        # fixed random 0-10 s after one on get-task, too long for this test)
        ac.inject("put-result", status=429, body=b"Too many concurrent requests", times=10)
        ac.add_tasks(tasks)
        config = make_config(ac.url, tmp_path / "spool", executor_pool_size=EXECUTOR_THREADS)
        pipeline = make_pipeline(config)
        started = time.monotonic()
        with running(pipeline):
            all_in = ac.wait_for_results(TASKS, timeout=100.0)
            duration = time.monotonic() - started
            ac.fault_rate(0.0, seed=0)
            assert all_in, f"only {len(ac.results)} of {TASKS} tasks have a result"
            assert pipeline.fetcher.is_alive() and pipeline.uploader.is_alive()
            # the spool empties once the last acceptance is processed
            assert wait_until(lambda: pipeline.spool.size() == 0, WAIT)

        results = ac.results
        requests = ac.requests
        ac_requests = [r for r in requests if r.endpoint != "s3"]
        faults = Counter()
        for r in ac_requests:
            if r.status == 503:
                faults["503"] += 1
            elif r.status == 429:
                faults["429"] += 1
            elif r.status == 0:
                faults["reset"] += 1
            elif r.finished - r.started >= 0.05:
                faults["slow"] += 1
        by_via = Counter(res[0].via for res in results.values())
        by_kind = Counter(kind for kind, _, _ in plan.values())
        with capsys.disabled():
            print(
                f"\nsoak: tasks={TASKS} handed_out={ac.tasks_handed_out} results={len(results)}"
                f" duration={duration:.1f}s ({TASKS / duration:.0f} tasks/s)"
                f"\nsoak: AC requests={len(ac_requests)} faults injected={sum(faults.values())}"
                f" {dict(faults)} (rate {sum(faults.values()) / len(ac_requests):.1%})"
                f"\nsoak: results by via={dict(by_via)} task kinds={dict(by_kind)}"
                f"\nsoak: max AC in flight={ac.max_inflight} rejected_concurrent="
                f"{ac.rejected_concurrent} AC connections={ac.connections_opened}"
                f" target connections={target.connections_opened}"
            )

        # Every task exactly once, nothing extra.
        assert set(results) == set(plan)
        duplicates = {tid: len(v) for tid, v in results.items() if len(v) != 1}
        assert duplicates == {}
        # The concurrency invariant, counted at the server.
        assert ac.max_inflight <= 2
        assert ac.rejected_concurrent == 0
        # The faults really happened, at about the asked rate.
        rate = sum(faults.values()) / len(ac_requests)
        assert 0.05 < rate < 0.15, rate
        assert all(faults[k] > 0 for k in ("503", "429", "reset")), faults
        # Keep-alive: new AC connections only after resets (plus a few to start).
        assert ac.connections_opened <= faults["reset"] + 10
        assert ac.errors == [] and target.errors == []

        for task_id, (kind, size, seed) in plan.items():
            got = results[task_id][0]
            assert got.fields["echoMe"] == {"n": int(task_id[5:])}, task_id
            if kind == "ok":
                assert got.fields["statusCode"] == 200, (task_id, got.fields.get("output"))
                assert got.via == (
                    "empty" if size == 0 else "inline" if size <= 512_000 else "upload"
                )
                assert got.body_len == size, task_id
                if size:
                    assert got.body_sha256 == expected_sha256(size, seed), task_id
            elif kind == "status500":
                # the target's own 500 is a result like any other: body passed through
                assert got.via == "inline" and got.fields["statusCode"] == 500
                assert got.body_sha256 == expected_sha256(size, seed), task_id
            else:
                assert got.via == "error", (task_id, kind, got.via)
                assert got.fields["statusCode"] == 500
                assert got.fields["output"].startswith("Agent Side Error: "), got.fields["output"]
        assert pipeline.uploader.retrying == 0
        assert spool_names(tmp_path / "spool") == []
