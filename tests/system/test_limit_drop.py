"""The adaptive AC limit against a server whose limit drops from 2 to 1 and comes back.

Real servers on 127.0.0.1: the fake AC server allows 2 requests at once; for
a while another client takes one slot (``FakeACServer.occupy``), then gives
it back. One agent in this process, then three agent processes sharing their
budget through a real redis-server: the effective limit goes down to 1 (the
gauge, the status line, the log line), every result is delivered exactly
once, the "Too many concurrent requests" 429s stay few (without the adaptive
limit every call above the lowered limit gets one: hundreds over the same
drop), and the limit climbs back to 2 once the slot is free.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import redis
from helpers import WAIT, make_config, make_pipeline, running, wait_until
from redis_fixture import redis_server  # noqa: F401 - the fixture

from acagent.ac.permits import key_prefix
from acagent.cli.demo_multi import agent_command, stop_agents
from acagent.metrics import metric_value
from acagent.testing import FakeACServer, FakeTarget, LocalRedis

LATENCY = 0.02
#: how long the limit stays lowered, counted in results delivered at limit 1
RESULTS_AT_ONE = 60
#: generous bounds on the 429s over the whole run (the drop lasts a few
#: probe pauses; each probe costs about one 429, the first halving one more)
MOST_429_ONE_AGENT = 15
MOST_429_THREE_AGENTS = 25


def _tasks(target: FakeTarget, n: int) -> List[dict]:
    return [
        {"taskId": f"t-{i:05d}", "method": "GET", "url": f"{target.url}/bytes/256?seed={i}"}
        for i in range(n)
    ]


def _delivered_once(ac: FakeACServer, n: int) -> None:
    results = ac.results
    assert len(results) == n
    assert all(len(v) == 1 for v in results.values())


def test_one_agent_halves_on_the_drop_and_climbs_back(
    tmp_path: Path, target: FakeTarget, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="acagent.permits")
    tasks = 400
    with FakeACServer(max_concurrent=2, latency=LATENCY) as ac:
        config = make_config(ac.url, tmp_path / "spool", executor_pool_size=4)
        pipeline = make_pipeline(config)
        permits = pipeline.client.permits
        gauge = pipeline.metrics.ac_effective_limit
        with running(pipeline):
            ac.add_tasks(_tasks(target, tasks))
            assert wait_until(lambda: len(ac.results) >= 20), "no results before the drop"
            assert metric_value(gauge) == 2
            assert "ac_limit=" not in pipeline.status_line()  # at the cap: not shown

            ac.occupy(1)
            assert wait_until(lambda: permits.effective_limit == 1), "the limit never came down"
            assert wait_until(lambda: "ac_limit=1/2" in pipeline.status_line())
            assert wait_until(lambda: metric_value(gauge) == 1)
            lowered_at = len(ac.results)
            # The drop lasts while RESULTS_AT_ONE results go through at 1, and
            # at least one probe (a step up the server refuses) was made.
            assert wait_until(lambda: len(ac.results) >= lowered_at + RESULTS_AT_ONE, WAIT * 2)
            assert wait_until(lambda: ac.rejected_concurrent >= 2, WAIT), "no probe seen"
            assert ac.max_inflight <= 2

            ac.release_occupied()
            assert wait_until(lambda: permits.effective_limit == 2, WAIT), "never climbed back"
            assert wait_until(lambda: metric_value(gauge) == 2)
            assert "ac_limit=" not in pipeline.status_line()
            assert wait_until(lambda: len(ac.results) >= tasks, WAIT * 3)
        rejected = ac.rejected_concurrent
    _delivered_once(ac, tasks)
    assert 2 <= rejected <= MOST_429_ONE_AGENT, rejected
    messages = [r.getMessage() for r in caplog.records if r.name == "acagent.permits"]
    assert any(
        m.startswith('AC limit 2 -> 1: "Too many concurrent requests" on ') for m in messages
    )
    assert any(m.startswith("AC limit 1 -> 2: ") and "clean calls" in m for m in messages)


class Agents:
    def __init__(self, tmp: Path, ac: FakeACServer, url: str) -> None:
        self.tmp, self.ac, self.url = tmp, ac, url
        self.procs: List[subprocess.Popen[bytes]] = []

    def start(self, n: int) -> None:
        cmd = agent_command(
            self.ac.url,
            str(self.tmp / f"spool-{n}"),
            coordination_url=self.url,
            lease=2.0,
            extra=["--statusInterval", "0.5"],
        )
        with open(self.tmp / f"agent-{n}.log", "ab") as log:
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=dict(os.environ)))

    def log(self, n: int) -> str:
        path = self.tmp / f"agent-{n}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(self.log(n) for n in range(len(self.procs)))

    def stop(self) -> None:
        stop_agents(self.procs)


@pytest.fixture
def agents(tmp_path: Path, redis_server: LocalRedis) -> Iterator[Callable[[FakeACServer], Agents]]:  # noqa: F811
    made: List[Agents] = []

    def make(ac: FakeACServer) -> Agents:
        made.append(Agents(tmp_path, ac, redis_server.url))
        return made[-1]

    yield make
    for group in made:
        group.stop()


def test_three_coordinated_agents_share_one_lowered_limit(
    agents: Callable[[FakeACServer], Agents],
    target: FakeTarget,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    tasks = 600
    store = redis.Redis.from_url(redis_server.url)
    shared = key_prefix("demo-key") + "limit"

    def shared_limit() -> int:
        value = store.hget(shared, "limit")
        return 2 if value is None else int(value)  # none set: the cap

    def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        if not wait_until(predicate, timeout):
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{group.logs()[-6000:]}")

    with FakeACServer(max_concurrent=2, latency=LATENCY) as ac:
        group = agents(ac)
        ac.add_tasks(_tasks(target, tasks))
        for n in range(3):
            group.start(n)
        until(lambda: len(ac.results) >= 30, 60, "results before the drop")
        assert shared_limit() == 2

        ac.occupy(1)
        until(lambda: shared_limit() == 1, WAIT, "the shared limit to come down")
        lowered_at = len(ac.results)
        until(lambda: len(ac.results) >= lowered_at + RESULTS_AT_ONE, WAIT * 2, "results at 1")
        until(lambda: ac.rejected_concurrent >= 2, WAIT, "a probe")
        until(
            lambda: any("ac_limit=1/2" in group.log(n) for n in range(3)),
            WAIT,
            "a status line showing the lowered limit",
        )
        assert ac.max_inflight <= 2

        ac.release_occupied()
        until(lambda: shared_limit() == 2, WAIT, "the shared limit to climb back")
        until(lambda: len(ac.results) >= tasks, 120, f"{tasks} results")
        group.stop()
        rejected = ac.rejected_concurrent
        logs = [group.log(n) for n in range(3)]
    _delivered_once(ac, tasks)
    assert 2 <= rejected <= MOST_429_THREE_AGENTS, rejected
    assert any('AC limit 2 -> 1: "Too many concurrent requests" on ' in text for text in logs)
    assert any("AC limit 1 -> 2: " in text for text in logs)
    # every agent followed the shared limit down (its own 429 or another's)
    assert all("AC limit 2 -> 1" in text for text in logs), logs
