"""Scale-out: real agent processes on one API key share one AC budget through a real Redis.

Every concurrency claim is counted at the fake AC server (``max_inflight``,
``count_429``); the server allows 2 requests at once and answers 429 above.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Set

import pytest
import redis
from redis_fixture import redis_server, require_redis_server  # noqa: F401 - the fixture

from acagent.ac.permits import key_prefix
from acagent.cli.demo_multi import agent_command, stop_agents
from acagent.testing import FakeACServer, FakeTarget, LocalRedis


class Agents:
    """Agent processes (``python -m acagent run``) with their own spools and logs."""

    def __init__(self, tmp: Path, ac: FakeACServer, coordination_url: str, lease: float) -> None:
        self.tmp, self.ac, self.url, self.lease = tmp, ac, coordination_url, lease
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(self, n: int) -> subprocess.Popen[bytes]:
        cmd = agent_command(
            self.ac.url,
            str(self.tmp / f"spool-{n}"),
            coordination_url=self.url,
            lease=self.lease,
        )
        log = open(self.tmp / f"agent-{n}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ))
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in self.tmp.glob("agent-*.log")
        )

    def stop(self) -> None:
        stop_agents(self.procs)


@pytest.fixture
def world(tmp_path: Path, redis_server: LocalRedis) -> Iterator[Callable[..., Agents]]:  # noqa: F811
    made: List[Agents] = []
    servers: List[object] = []

    def make(tasks: int, latency: float, lease: float = 2.0) -> Agents:
        target = FakeTarget().start()
        ac = FakeACServer(max_concurrent=2, latency=latency).start()
        servers.extend([target, ac])
        ac.add_tasks(
            {"taskId": f"t-{i:05d}", "method": "GET", "url": f"{target.url}/bytes/512?seed={i}"}
            for i in range(tasks)
        )
        agents = Agents(tmp_path, ac, redis_server.url, lease)
        made.append(agents)
        return agents

    yield make
    for agents in made:
        agents.stop()
    for server in servers:
        server.stop()  # type: ignore[attr-defined]


def _wait(predicate: Callable[[], bool], timeout: float, what: str, agents: Agents) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{agents.logs()}")
        time.sleep(0.02)


def _agent_pids_holding(store: redis.Redis, prefix: str) -> List[int]:
    leases = store.zrangebyscore(prefix + "holders", "-inf", "(+inf")  # not the sentinel
    return [int(t.decode().split("-", 1)[0]) for t in leases]


def test_three_agents_600_tasks_within_two_in_flight_and_no_429(world) -> None:
    tasks, latency = 600, 0.02
    agents = world(tasks, latency)
    for n in range(3):
        agents.start(n)
    ac = agents.ac
    _wait(lambda: len(ac.results) >= 1, 60, "the first result", agents)
    first = time.monotonic()
    _wait(lambda: len(ac.results) >= tasks, 120, f"{tasks} results", agents)
    steady = time.monotonic() - first
    agents.stop()
    assert all(len(v) == 1 for v in ac.results.values()) and len(ac.results) == tasks
    assert ac.max_inflight == 2  # the whole budget used, never more (counted server-side)
    assert ac.count_429 == 0
    got_tasks: Set[str] = {
        r.query.get("agentId", "") for r in ac.requests if r.endpoint == "get-task"
    }
    assert len(got_tasks) == 3  # all three agents took part
    bound = 2 / (2 * latency)
    print(
        f"\n3 agents, {tasks} tasks: {tasks / steady * 60:.0f} tasks/min after the first result, "
        f"AC bound {bound * 60:.0f}/min ({tasks / steady / bound:.0%}), "
        f"max in flight {ac.max_inflight}, 429s {ac.count_429}"
    )


def test_kill_9_of_a_holder_frees_its_permits_and_its_spool_comes_back(
    world,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    tasks, lease = 300, 2.0
    agents = world(tasks, 0.01, lease=lease)
    procs = [agents.start(n) for n in range(3)]
    ac = agents.ac
    store = redis.Redis.from_url(redis_server.url)
    prefix = key_prefix("demo-key")
    _wait(lambda: len(ac.results) >= 60, 90, "60 results", agents)
    # Hold every upload at the server: both permits end up held by stalled put-results.
    ac.stall("put-result")
    stable: List[List[int]] = []

    def both_permits_held_and_stable() -> bool:
        holders = sorted(_agent_pids_holding(store, prefix))  # zset order follows renewals
        stable.append(holders)
        return len(holders) == 2 and ac.inflight == 2 and stable[-10:] == [holders] * 10

    _wait(both_permits_held_and_stable, 30, "two stalled holders", agents)
    victim_pid = _agent_pids_holding(store, prefix)[0]
    victim = next(p for p in procs if p.pid == victim_pid)
    n_victim = procs.index(victim)
    spooled = len(list((agents.tmp / f"spool-{n_victim}").glob("*.json")))
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(10)
    ac.unstall("put-result")
    # The dead agent's leases expire within the lease; the others go on.
    _wait(
        lambda: victim_pid not in _agent_pids_holding(store, prefix),
        lease + 3,
        "lease expiry",
        agents,
    )
    freed = time.monotonic() - killed
    before = len(ac.results)
    _wait(lambda: len(ac.results) >= before + 20, 30, "the others to go on", agents)
    resumed = time.monotonic() - killed
    # Restart the victim on its spool: its results come back.
    agents.start(n_victim)
    _wait(lambda: len(ac.results) >= tasks, 120, f"all {tasks} results", agents)
    _wait(lambda: ac.pending_tasks() == 0, 10, "an empty queue", agents)
    agents.stop()
    store.close()
    assert set(ac.results) == {f"t-{i:05d}" for i in range(tasks)}  # 0 lost
    dupes = [k for k, v in ac.results.items() if len(v) > 1]
    assert len(dupes) <= 2  # only the uploads in flight at the kill may arrive twice
    assert ac.max_inflight <= 2 and ac.count_429 == 0
    assert spooled >= 1  # the victim had results waiting in its spool
    assert freed <= lease + 1.5
    print(
        f"\nkill -9 holder: leases freed after {freed:.2f}s (lease {lease}s), others resumed "
        f"after {resumed:.2f}s; {spooled} spooled results re-sent after restart; duplicates {len(dupes)}"
    )


def test_redis_stopped_mid_run_pauses_ac_calls_and_loses_nothing(
    world,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    tasks = 400
    agents = world(tasks, 0.01, lease=1.5)
    for n in range(3):
        agents.start(n)
    ac = agents.ac
    _wait(lambda: len(ac.results) >= 100, 90, "100 results", agents)
    redis_server.stop()
    _wait(lambda: ac.inflight == 0, 10, "calls in flight to end", agents)
    time.sleep(0.3)  # a call holding a permit from before the stop may still start its request
    calls_at_stop = len(ac.requests)
    results_at_stop = len(ac.results)
    time.sleep(3.0)  # the outage
    calls_during_outage = len(ac.requests) - calls_at_stop
    redis_server.start()
    back = time.monotonic()
    _wait(lambda: len(ac.results) >= tasks, 120, f"all {tasks} results after Redis is back", agents)
    recovered = time.monotonic() - back
    agents.stop()
    assert calls_during_outage == 0  # fail safe: no AC call without the shared budget
    assert results_at_stop < tasks
    assert set(ac.results) == {f"t-{i:05d}" for i in range(tasks)}
    assert all(len(v) == 1 for v in ac.results.values())
    assert ac.max_inflight <= 2 and ac.count_429 == 0
    print(
        f"\nRedis down 3 s at {results_at_stop}/{tasks}: {calls_during_outage} AC calls meanwhile; "
        f"all {tasks} delivered {recovered:.1f}s after it came back; max in flight {ac.max_inflight}"
    )


def test_demo_with_agents_runs_processes_with_a_private_redis() -> None:
    import sys

    require_redis_server()
    cmd = [sys.executable, "-m", "acagent", "demo", "--agents", "2", "--tasks", "40"]
    out = subprocess.run([*cmd, "--acLatency", "0.02"], capture_output=True, timeout=120)
    text = out.stdout.decode()
    assert out.returncode == 0, text + out.stderr.decode()
    assert "a private redis-server" in text
    assert "results exactly once   40/40" in text
    assert "AC 429 replies         0" in text
