"""Real signals to the CLI agent (``python -m acagent``) in a subprocess.

- one SIGTERM (or SIGINT) while tasks run: stop fetching, finish the running
  tasks and the one waiting for a thread (prefetch), upload every result,
  exit 0 well within ``--shutdownTimeout``;
- the deadline passes with tasks still running: exit 3 (``EXIT_KEPT``) at
  the deadline, the unfinished tasks answered "agent shutting down" in the spool;
- a second SIGTERM during the graceful stop: exit 3 at once, the rest spooled;
  the next start delivers what was spooled.

Every task the server handed out must end with a result at the server or a
record in the spool. The fake server counts a task handed out once it takes
it from its queue (``handout="decided"``), as a real server does: a reply
that could not be written is not put back for the next poll.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Dict, List

import pytest
from helpers import WAIT, AgentProcess, make_config, make_pipeline, spool_records, wait_until

from acagent import Pipeline
from acagent.cli.main import EXIT_KEPT
from acagent.testing import FakeACServer, FakeTarget, expected_sha256


def _tasks(target: FakeTarget, prefix: str, n: int, latency: float) -> List[Dict[str, object]]:
    return [
        {
            "taskId": f"{prefix}-{i}",
            "method": "GET",
            "url": f"{target.url}/bytes/{500 + i}?seed={i}&latency={latency}",
        }
        for i in range(n)
    ]


def _spooled(spool: Path) -> Dict[str, dict]:
    return {str(r["fields"]["taskId"]): r for r in spool_records(spool)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_signal_mid_run_finishes_running_tasks_and_exits_0(tmp_path: Path, signum: int) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with FakeTarget() as target, FakeACServer(handout="decided") as ac:
        # 4 threads and the default prefetch of 1, 10 tasks of ~1 s: 4 run
        # and 1 waits for a thread when the signal comes; 5 are never fetched.
        ac.add_tasks(_tasks(target, "graceful", 10, latency=1.0))
        with AgentProcess(
            ac.url,
            spool,
            tmp_path / "agent.log",
            ["--executorPoolSize", "4", "--shutdownTimeout", "10"],
        ) as agent:
            assert target.wait_for(lambda: target.inflight == 4, WAIT), agent.output()
            assert wait_until(lambda: ac.tasks_handed_out == 5, WAIT), agent.output()
            sent = time.monotonic()
            agent.signal(signum)
            code = agent.wait(12)
            took = time.monotonic() - sent
            assert code == 0, agent.output()
        # well within the deadline: the running tasks needed ~1 s, then the
        # waiting one ran too (it was taken from the server: it gets a real answer)
        assert took < 10, took
        handed_out = ac.tasks_handed_out
        assert handed_out == 5
        assert ac.pending_tasks() == 10 - handed_out  # nothing fetched after the signal
        results = ac.results
        assert len(results) == handed_out
        for task_id, got in results.items():
            assert len(got) == 1
            i = int(task_id.split("-")[1])
            assert got[0].via == "inline" and got[0].body_sha256 == expected_sha256(500 + i, i)
        assert spool_records(spool) == []
        assert "stopping" in agent.output()


@pytest.mark.timeout(60)
def test_deadline_passes_with_tasks_running_rest_is_spooled(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with FakeTarget() as target, FakeACServer(handout="decided") as ac:
        fast = _tasks(target, "fast", 2, latency=0.0)
        slow = _tasks(target, "slow", 3, latency=30.0)
        ac.add_tasks(fast + slow)
        with AgentProcess(
            ac.url,
            spool,
            tmp_path / "agent.log",
            ["--executorPoolSize", "5", "--shutdownTimeout", "1.5"],
        ) as agent:
            assert ac.wait_for_results(2, WAIT), agent.output()
            assert target.wait_for(lambda: target.inflight == 3, WAIT), agent.output()
            sent = time.monotonic()
            agent.signal(signal.SIGTERM)
            code = agent.wait(10)
            took = time.monotonic() - sent
            assert code == EXIT_KEPT, agent.output()  # work was cut short: kept in the spool
        # the deadline (1.5 s) plus the short join grace, not the targets' 30 s
        assert took < 6, took
        assert ac.tasks_handed_out == 5
        spooled = _spooled(spool)
        assert sorted(ac.results) == ["fast-0", "fast-1"]
        assert sorted(spooled) == ["slow-0", "slow-1", "slow-2"]
        for record in spooled.values():
            assert record["statusCode"] == 500
            assert record["error"] == "agent shutting down"


@pytest.mark.timeout(60)
def test_second_sigterm_exits_at_once_and_spools_the_rest(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with FakeTarget() as target, FakeACServer(handout="decided") as ac:
        # Targets that take 30 s: the running tasks cannot finish.
        ac.add_tasks(_tasks(target, "stuck", 3, latency=30.0))
        with AgentProcess(
            ac.url,
            spool,
            tmp_path / "first.log",
            ["--executorPoolSize", "3", "--shutdownTimeout", "25"],
        ) as agent:
            assert target.wait_for(lambda: target.inflight == 3, WAIT), agent.output()
            agent.signal(signal.SIGTERM)
            # the graceful stop has begun (and would wait up to 25 s)
            assert wait_until(lambda: "stopping" in agent.output(), WAIT), agent.output()
            assert agent.wait(0.5) is None
            sent = time.monotonic()
            agent.signal(signal.SIGTERM)
            code = agent.wait(10)
            took = time.monotonic() - sent
            assert code == EXIT_KEPT, agent.output()
        assert took < 3, took
        assert ac.results == {}
        spooled = _spooled(spool)
        assert sorted(spooled) == ["stuck-0", "stuck-1", "stuck-2"]
        for record in spooled.values():
            assert record["statusCode"] == 500
            assert record["error"] == "agent shutting down"

        # The next start sends what the spool holds.
        with AgentProcess(ac.url, spool, tmp_path / "second.log") as again:
            assert ac.wait_for_results(3, WAIT), again.output()
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
            again.signal(signal.SIGTERM)
            assert again.wait(15) == 0, again.output()
        for task_id, got in ac.results.items():
            assert len(got) == 1, task_id
            assert got[0].via == "error"
            assert got[0].fields["output"] == "Agent Side Error: agent shutting down"
            assert got[0].fields["statusCode"] == 500


def test_the_signal_path_takes_no_lock_and_run_forever_acts_on_it(tmp_path: Path) -> None:
    """A signal handler runs on the main thread between two of its bytecodes,
    maybe while it holds the lock an ``Event.set`` takes (each time
    ``run_forever``'s wait ends): a handler that locks can hang the agent for
    good (seen once in CI: no "stopping" line 30 s after SIGTERM). So
    ``signal_stop``/``signal_status`` may call nothing in ``threading``; the
    main loop acts on them."""
    with FakeACServer(handout="decided") as ac:
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool"))
        entered: List[str] = []

        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event == "call" and frame.f_code.co_filename == threading.__file__:
                entered.append(frame.f_code.co_name)
            elif event == "c_call" and getattr(arg, "__name__", "") in ("acquire", "__enter__"):
                entered.append(str(arg))

        sys.setprofile(profile)
        try:
            pipeline.signal_status()
            pipeline.signal_stop()
            pipeline.signal_stop(hurry=True)
        finally:
            sys.setprofile(None)
        assert entered == []

        # run_forever acts on the flags: a stop, hurried by the second call
        # (a hurried stop reports "not drained" even with nothing to drain).
        assert _run_forever(pipeline) == [False]
        calm = make_pipeline(make_config(ac.url, tmp_path / "spool-2"))
        calm.signal_stop()
        assert _run_forever(calm) == [True]  # nothing fetched: everything delivered


def _run_forever(pipeline: Pipeline) -> List[bool]:
    """Run ``pipeline.run_forever()`` on a thread; its answer once it returned."""
    outcome: List[bool] = []
    runner = threading.Thread(target=lambda: outcome.append(pipeline.run_forever()))
    runner.start()
    runner.join(WAIT)
    assert not runner.is_alive() and pipeline.wait_stopped(0)
    return outcome


def test_request_stop_would_take_a_lock_from_a_handler() -> None:
    """The control for the test above: the thread-safe ``request_stop`` does
    enter ``threading`` (an ``Event.set``), which is why handlers must not call it."""
    with FakeACServer() as ac, tempfile.TemporaryDirectory() as spool:
        pipeline = make_pipeline(make_config(ac.url, Path(spool)))
        entered: List[str] = []

        def profile(frame: FrameType, event: str, arg: object) -> None:
            if event == "call" and frame.f_code.co_filename == threading.__file__:
                entered.append(frame.f_code.co_name)

        sys.setprofile(profile)
        try:
            pipeline.request_stop()
        finally:
            sys.setprofile(None)
        assert "set" in entered
