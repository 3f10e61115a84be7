"""Fenced permits: an agent that cannot renew its leases stops its own AC requests.

Two agent processes share one API key through a real redis-server; the fake
AC server allows 2 requests at once, counts them in flight (``max_inflight``)
and answers 429 above. Agent A reaches Redis through a ``PausableProxy``: a
link that stalls. The fake server notices a client that closed its
connection while it holds a request (``notices_close``), as a server reading
or writing that connection does; a request the agent cuts is then no longer
counted.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest
import redis
from redis_fixture import redis_server  # noqa: F401 - the fixture

from acagent.ac.permits import key_prefix
from acagent.cli.demo_multi import agent_command, stop_agents
from acagent.testing import FakeACServer, FakeTarget, LocalRedis, PausableProxy

LEASE = 2.0
TASKS = 200


class World:
    """Agent processes on one fake AC server, with their logs."""

    def __init__(self, tmp: Path, ac: FakeACServer) -> None:
        self.tmp, self.ac = tmp, ac
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(self, name: str, coordination_url: str) -> subprocess.Popen[bytes]:
        cmd = agent_command(
            self.ac.url,
            str(self.tmp / f"spool-{name}"),
            coordination_url=coordination_url,
            lease=LEASE,
        )
        with open(self.tmp / f"agent-{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ))
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"agent-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in self.tmp.glob("agent-*.log")
        )

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(0.02)

    def close(self) -> None:
        stop_agents(self.procs)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with (
        FakeTarget() as target,
        FakeACServer(max_concurrent=2, latency=0.02, notices_close=True) as ac,
    ):
        ac.add_tasks(
            {"taskId": f"t-{i:05d}", "method": "GET", "url": f"{target.url}/bytes/256?seed={i}"}
            for i in range(TASKS)
        )
        made = World(tmp_path, ac)
        try:
            yield made
        finally:
            made.close()


def _delivered_once(ac: FakeACServer) -> Tuple[int, int]:
    """(results missing, results received more than once)."""
    results = ac.results
    missing = sum(1 for i in range(TASKS) if not results.get(f"t-{i:05d}"))
    return missing, sum(1 for got in results.values() if len(got) > 1)


def test_an_agent_whose_redis_link_stalls_cuts_its_request_before_its_lease_lapses(
    world: World,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    ac = world.ac
    with PausableProxy(redis_server.port) as link:
        world.start("a", link.url)
        world.wait(lambda: len(ac.results) >= 20, 60, "agent A's first 20 results")
        # A's next upload is held at the server for longer than a lease...
        ac.inject("put-result", delay=3 * LEASE)
        held = ac.arrivals("put-result")
        world.wait(
            lambda: (
                ac.arrivals("put-result") > held
                and ac.arrivals("put-result") - ac.count("put-result") >= 1
            ),
            10,
            "A's upload held at the server",
        )
        # ...and meanwhile A cannot reach Redis, while B takes every permit it can.
        link.pause()
        paused = time.monotonic()
        world.start("b", redis_server.url)
        world.wait(lambda: "lapsed" in world.log("a"), 3 * LEASE, "A's permit to lapse")
        lapsed_after = time.monotonic() - paused
        results_at_lapse = len(ac.results)
        world.wait(lambda: len(ac.results) >= results_at_lapse + 20, 30, "B to work on")
        world.wait(lambda: time.monotonic() - paused >= 8.0, 10, "the end of the 8 s stall")
        link.resume()
        world.wait(lambda: len(ac.results) >= TASKS, 120, f"all {TASKS} results")
        world.wait(lambda: ac.inflight == 0, 10, "nothing in flight")
        stop_agents(world.procs)
        missing, twice = _delivered_once(ac)
        print(
            f"\nA's Redis link stalled 8 s (lease {LEASE}s): A's permit lapsed after "
            f"{lapsed_after:.2f}s; max in flight at the server {ac.max_inflight}, "
            f"429s {ac.count_429}, results missing {missing}, twice {twice}"
        )
        assert ac.max_inflight <= 2
        assert ac.count_429 == 0
        assert missing == 0 and twice == 0
        assert lapsed_after < LEASE  # cut before Redis could let the lease go


def test_a_redis_that_lost_the_holders_but_kept_the_epoch_lets_no_third_request_in(
    world: World,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    ac = world.ac
    world.start("a", redis_server.url)
    world.start("b", redis_server.url)
    store = redis.Redis.from_url(redis_server.url)
    holders = key_prefix("demo-key") + "holders"
    epoch = key_prefix("demo-key") + "epoch"
    try:
        world.wait(lambda: len(ac.results) >= 30, 60, "the first 30 results")
        deletions = 0
        for _ in range(3):
            world.wait(lambda: ac.inflight == 2, 10, "both permits in use")
            assert store.exists(epoch)
            deletions += store.delete(holders)  # an eviction, a replica promoted with lag
            before = len(ac.results)
            world.wait(lambda: len(ac.results) >= before + 20, 30, "the agents to go on")
        world.wait(lambda: len(ac.results) >= TASKS, 120, f"all {TASKS} results")
    finally:
        store.close()
    stop_agents(world.procs)
    missing, twice = _delivered_once(ac)
    print(
        f"\nholders deleted {deletions} times (epoch kept): max in flight {ac.max_inflight}, "
        f"429s {ac.count_429}, results missing {missing}, twice {twice}"
    )
    assert deletions == 3
    assert ac.max_inflight <= 2
    assert ac.count_429 == 0
    assert missing == 0 and twice == 0


def test_a_long_poll_whose_permit_lapses_still_delivers_the_task_it_brings(
    tmp_path: Path,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    # A server that does not read a held long poll's socket hands a task out
    # on it even after the client shut it: the agent must still read it.
    with FakeTarget() as target, FakeACServer(hold_poll=30.0, handout="decided") as ac:
        with PausableProxy(redis_server.port) as link:
            world = World(tmp_path, ac)
            world.start("a", link.url)
            try:
                # the first get-tasks are answered at once; then one is held, with nothing queued
                ac.add_task({"taskId": "first", "method": "GET", "url": f"{target.url}/bytes/8"})
                world.wait(lambda: bool(ac.results.get("first")), 60, "the first result")
                world.wait(
                    lambda: ac.arrivals("get-task") == ac.count("get-task") + 1,
                    10,
                    "a held get-task",
                )
                link.pause()
                world.wait(
                    lambda: "lapsed" in world.log("a"), 3 * LEASE, "the poll's permit to lapse"
                )
                ac.add_task({"taskId": "late", "method": "GET", "url": f"{target.url}/bytes/64"})
                world.wait(lambda: "late" in ac.handed_out_ids(), 10, "the task handed out")
                link.resume()
                world.wait(lambda: bool(ac.results.get("late")), 30, "the late task's result")
            finally:
                world.close()
        got = ac.results["late"]
    assert len(got) == 1 and got[0].via == "inline", got
