"""A stop never loses the task a get-task in flight brings.

An HTTP server holding a get-task open (long poll) does not read its socket:
it does not see the client close the connection, and it may pick a task for
that request after the client went away, write the reply and count it
delivered. So once a stop begins the agent sends no new get-task, and one in
flight is left to end by itself until ``shutdown_poll_reserve`` seconds
before the deadline (or a second signal). The fake server here counts a task
handed out once it decides (``handout="decided"``), as a real server does.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from helpers import WAIT, AgentProcess, make_config, make_pipeline, wait_until

from acagent.testing import FakeACServer, FakeTarget

#: trials of the SIGTERM race, spread evenly over offsets 0..OFFSET_MAX seconds
TRIALS = 30
OFFSET_MAX = 2.0
#: trials run at once (each its own agent process and servers)
AT_ONCE = 5
#: the agents' stop settings: the long poll may stay open SHUTDOWN - RESERVE s
SHUTDOWN = 8.0
RESERVE = 4.0


def _get_tasks(ac: FakeACServer) -> List[float]:
    """When each get-task the server saw started (monotonic)."""
    return [r.started for r in ac.requests if r.endpoint == "get-task"]


def _one_trial(tmp_path: Path, n: int, offset: float) -> Tuple[str, Optional[str]]:
    """One agent, SIGTERM during its long poll, a task handed out ``offset`` s
    later. Returns (what happened, a failure or None)."""
    spool = tmp_path / f"spool-{n}"
    spool.mkdir()
    task_id = f"race-{n}"
    with FakeTarget() as target, FakeACServer(hold_poll=60.0, handout="decided") as ac:
        with AgentProcess(
            ac.url,
            spool,
            tmp_path / f"agent-{n}.log",
            ["--shutdownTimeout", str(SHUTDOWN), "--shutdownPollReserve", str(RESERVE)],
        ) as agent:
            if not ac.wait_for(lambda: ac.inflight >= 1, WAIT):
                return "no poll", f"trial {n}: no get-task held open\n{agent.output()}"
            signalled = time.monotonic()
            agent.signal(signal.SIGTERM)
            threading.Event().wait(offset)  # the stimulus: when the server decides
            ac.add_task({"taskId": task_id, "method": "GET", "url": f"{target.url}/bytes/64"})
            code = agent.wait(SHUTDOWN + 4)
            took = time.monotonic() - signalled
            output = agent.output()
    handed_out = ac.handed_out_ids()
    results = ac.results
    late_polls = [t for t in _get_tasks(ac) if t > signalled]
    problems = []
    if code != 0:
        problems.append(f"exit code {code}")
    if took > SHUTDOWN + 1:
        problems.append(f"took {took:.1f}s")
    if late_polls:
        problems.append(f"{len(late_polls)} get-task(s) started after the signal")
    for handed in handed_out:
        got = results.get(handed, [])
        if len(got) != 1:
            problems.append(f"{handed}: {len(got)} result(s)")
        elif got[0].via != "inline":  # run, not answered "shutting down"
            problems.append(f"{handed}: answered {got[0].via}: {got[0].fields.get('output')}")
    if handed_out != [task_id]:
        problems.append(f"handed out {handed_out}")
    if not problems:
        return "ok", None
    return "lost", f"trial {n} (offset {offset:.2f}s): {'; '.join(problems)}\n{output}"


@pytest.mark.timeout(300)
def test_sigterm_during_a_long_poll_loses_no_task_at_any_offset(tmp_path: Path) -> None:
    offsets = [OFFSET_MAX * i / (TRIALS - 1) for i in range(TRIALS)]
    outcomes: Dict[int, Tuple[str, Optional[str]]] = {}

    def run(n: int) -> None:
        try:
            outcomes[n] = _one_trial(tmp_path, n, offsets[n])
        except Exception as exc:  # reported below with the trial's number
            outcomes[n] = ("error", f"trial {n}: {type(exc).__name__}: {exc}")

    for first in range(0, TRIALS, AT_ONCE):
        threads = [
            threading.Thread(target=run, args=(n,), name=f"trial-{n}")
            for n in range(first, min(first + AT_ONCE, TRIALS))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), thread.name
    failures = [why for _, why in outcomes.values() if why is not None]
    assert len(outcomes) == TRIALS
    assert failures == [], f"{len(failures)} of {TRIALS} trials failed:\n" + "\n".join(failures)


def test_a_stop_while_waiting_for_a_rate_token_sends_no_get_task(tmp_path: Path) -> None:
    # 6 get-tasks a minute: after the first, the next waits ~10 s for a token.
    with FakeACServer() as ac:
        config = make_config(ac.url, tmp_path / "spool", rate_limit_per_min=6)
        pipeline = make_pipeline(config)
        runner = threading.Thread(target=pipeline.run_forever, name="runner")
        runner.start()
        try:
            assert wait_until(lambda: len(_get_tasks(ac)) >= 1, WAIT)
            assert wait_until(lambda: _fetcher_in("ratelimit.py", "acquire"), WAIT)
        finally:
            signalled = time.monotonic()
            pipeline.signal_stop()
            runner.join(WAIT)
        assert not runner.is_alive()
        assert time.monotonic() - signalled < 3
        assert [t for t in _get_tasks(ac) if t > signalled] == []


def _fetcher_in(file_name: str, function: str) -> bool:
    """The Fetcher's thread is inside ``function`` of ``file_name`` right now."""
    idents = [t.ident for t in threading.enumerate() if t.name == "acagent-fetcher"]
    frame = sys._current_frames().get(idents[0]) if idents else None
    while frame is not None:
        code = frame.f_code
        if code.co_name == function and code.co_filename.endswith(file_name):
            return True
        frame = frame.f_back
    return False


def test_a_long_poll_is_cut_at_the_deadline_less_the_reserve(tmp_path: Path) -> None:
    with FakeACServer(hold_poll=60.0, handout="decided") as ac:
        config = make_config(ac.url, tmp_path / "spool", shutdown_poll_reserve=1.0)
        pipeline = make_pipeline(config)
        pipeline.start()
        try:
            assert ac.wait_for(lambda: ac.inflight >= 1, WAIT)
        finally:
            started = time.monotonic()
            assert pipeline.stop(timeout=3.0)
            took = time.monotonic() - started
        # cut at 3 - 1 = 2 s, then nothing left to drain
        assert 1.8 <= took < 3.0, took
        assert not pipeline.fetcher.is_alive()
    assert len(_get_tasks(ac)) == 1  # the held one is recorded when the server stops


def test_a_second_signal_cuts_the_long_poll_at_once(tmp_path: Path) -> None:
    with FakeACServer(hold_poll=60.0, handout="decided") as ac:
        config = make_config(ac.url, tmp_path / "spool", shutdown_timeout=30.0)
        pipeline = make_pipeline(config)
        runner = threading.Thread(target=pipeline.run_forever, name="runner")
        runner.start()
        try:
            assert ac.wait_for(lambda: ac.inflight >= 1, WAIT)
            pipeline.signal_stop()
            assert wait_until(lambda: pipeline.stopping, WAIT)
            runner.join(0.5)
            assert runner.is_alive()  # the poll is left open (it may bring a task)
        finally:
            second = time.monotonic()
            pipeline.signal_stop(hurry=True)
            runner.join(WAIT)
        assert not runner.is_alive()
        assert time.monotonic() - second < 2.5
    assert len(_get_tasks(ac)) == 1
