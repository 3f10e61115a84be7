"""``kill -9`` at random moments under load loses no task.

The agent runs 300 tasks and is killed 15 times, each time at a random moment
of its work (tasks running, waiting for a thread, results uploading), and
restarted on the same spool. Every task the server handed out must end with
a result: the real one, byte-exact, or the error result that answers a task
the dead process had taken (its journal). A result that was being uploaded
at the kill may arrive twice; the duplicates are counted and must be
identical.

What the kill never interrupts here is a get-task reply on the wire: a task
the server wrote into the socket of a process killed before reading it is
lost to every client. So each kill waits until the Fetcher's next get-task is
held open by the server with nothing to hand out (the tasks not yet handed
out are withdrawn, and queued again after the kill): a single Fetcher thread
sends its next get-task only after it journaled the task of the last one.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers import WAIT, AgentProcess, spool_records, wait_until

from acagent.ledger import INTERRUPTED
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

TASKS = 300
KILLS = 15
SEED = 20261203


def _tasks(target: FakeTarget, rng: random.Random) -> Tuple[List[Dict[str, object]], Dict[str, int]]:
    tasks: List[Dict[str, object]] = []
    sizes: Dict[str, int] = {}
    for i in range(TASKS):
        # mostly inline bodies, some through upload-result (above 512,000 bytes)
        size = rng.choice((0, 200, 5_000, 60_000, 600_000)) + i
        task_id = f"k-{i}"
        sizes[task_id] = size
        tasks.append(
            {
                "taskId": task_id,
                "method": "GET",
                "url": f"{target.url}/bytes/{size}?seed={i}&latency=0.1",
            }
        )
    return tasks, sizes


def _held_with_nothing(ac: FakeACServer, arrived_before: int) -> bool:
    # A get-task arrived after the withdrawal and is held; every earlier one is done.
    arrived = ac.arrivals("get-task")
    return arrived > arrived_before and arrived == ac.count("get-task") + 1


@pytest.mark.timeout(300)
def test_kill_9_at_random_moments_loses_no_task(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    spool = tmp_path / "spool"
    spool.mkdir()
    flags = ["--executorPoolSize", "4", "--shutdownTimeout", "20"]
    with FakeTarget() as target, FakeACServer(hold_poll=0.3, handout="decided") as ac:
        tasks, sizes = _tasks(target, rng)
        ac.add_tasks(tasks)
        for kill in range(KILLS):
            with AgentProcess(ac.url, spool, tmp_path / f"run-{kill}.log", flags) as agent:
                assert ac.wait_for(lambda: ac.inflight >= 1, WAIT), agent.output()
                threading.Event().wait(rng.uniform(0.1, 1.2))  # the random moment
                withdrawn = ac.withdraw_tasks()
                arrived = ac.arrivals("get-task")
                assert ac.wait_for(lambda: _held_with_nothing(ac, arrived), WAIT), agent.output()
                agent.proc.send_signal(signal.SIGKILL)
                assert agent.wait(WAIT) == -signal.SIGKILL
            # The held get-task of the dead process ends empty before tasks return.
            assert ac.wait_for(lambda: ac.arrivals("get-task") == ac.count("get-task"), WAIT)
            ac.requeue(withdrawn)
        before = ac.arrivals("get-task")
        with AgentProcess(ac.url, spool, tmp_path / "final.log", flags) as agent:
            # up and polling (its signal handlers are in place) before it may be stopped
            assert ac.wait_for(lambda: ac.arrivals("get-task") > before, WAIT), agent.output()
            assert wait_until(
                lambda: ac.pending_tasks() == 0
                and set(ac.results) >= set(ac.handed_out_ids())
                and spool_records(spool) == [],
                120,
            ), agent.output()
            agent.signal(signal.SIGTERM)
            assert agent.wait(WAIT) == 0, agent.output()
        handed_out = ac.handed_out_ids()
        results = ac.results

    assert sorted(set(handed_out)) == sorted(sizes)  # every task was handed out
    unanswered = [t for t in sizes if not results.get(t)]
    assert unanswered == [], unanswered
    interrupted = 0
    duplicates = 0
    for task_id, got in results.items():
        duplicates += len(got) - 1
        first = got[0]
        for again in got[1:]:
            assert (again.via, again.body_sha256, again.fields) == (
                first.via,
                first.body_sha256,
                first.fields,
            ), task_id
        if first.via == "error":
            assert first.fields["output"] == f"Agent Side Error: {INTERRUPTED}", first.fields
            interrupted += 1
            continue
        i = int(task_id.split("-")[1])
        size = sizes[task_id]
        if size == 0:
            assert first.via == "empty", task_id
        else:
            assert first.body_sha256 == expected_sha256(size, i), task_id
            assert first.body_len == size
    # Shown with -s: how many were answered as interrupted, and the duplicates.
    print(f"\n{TASKS} tasks, {KILLS} kills: {interrupted} interrupted, {duplicates} duplicate(s)")
    assert interrupted > 0  # the kills did land while tasks were in hand
