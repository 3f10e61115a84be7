"""A full or read-only spool pauses work and recovers by itself (issue: delivery).

A real small file system: a tmpfs mounted for the test (CI runs as root; the
test fails, it does not skip, where it cannot mount). Every task is answered
(an error result says why when its body could not be written), no
reservation or executor slot leaks, fetching pauses while the spool cannot
be written, ``/readyz`` says why, work resumes by itself when space returns,
and SIGTERM stops the agent with exit 0 in that state.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from helpers import WAIT, AgentProcess, make_config, make_pipeline, running, wait_until

from acagent.ledger import SPOOL_HOLD
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

BODY = 700_000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full; returns its path."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
    return filler


def _tasks(target: FakeTarget, prefix: str, n: int) -> list:
    return [
        {"taskId": f"{prefix}-{i}", "method": "GET", "url": f"{target.url}/bytes/{BODY}?seed={i}"}
        for i in range(n)
    ]


def test_full_spool_pauses_fetching_answers_every_task_and_recovers(
    small_fs: Path, tmp_path: Path
) -> None:
    # (A read-only remount cannot be forced on a file system with files open
    # for writing, which a running agent always has; EROFS takes the same
    # path in the Ledger and the executor as ENOSPC.)
    fault = "full"
    n = 6
    spool = small_fs / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        config = make_config(ac.url, spool, executor_pool_size=2, health_addr="127.0.0.1:0")
        pipeline = make_pipeline(config)
        with running(pipeline):
            filler = fill(small_fs)
            ac.add_tasks(_tasks(target, fault, n))
            # The first tasks cannot write their bodies: error results, and fetching pauses.
            assert wait_until(lambda: SPOOL_HOLD in pipeline.ledger.holds(), WAIT)
            assert ac.wait_for(lambda: len(ac.results) >= 1, WAIT)
            handed_out = ac.tasks_handed_out
            assert handed_out < n
            ready = requests.get(pipeline.health.url + "/readyz", timeout=5)
            assert ready.status_code == 503
            why = "no space left"
            assert why in ready.text, ready.text
            time.sleep(1.0)  # a window in which a paused fetcher must not fetch
            assert ac.tasks_handed_out == handed_out, "fetched while the spool was unwritable"
            # Space returns: work resumes by itself.
            filler.unlink()
            assert ac.wait_for_results(n, WAIT), sorted(ac.results)
            assert wait_until(lambda: pipeline.ledger.holds() == {}, WAIT)
            assert wait_until(lambda: pipeline.ledger.outstanding() == 0, WAIT)
            assert pipeline.ledger.executing == 0 and pipeline.ledger.waiting_results == 0
            assert wait_until(lambda: pipeline.spool.size() == 0, WAIT)
        errors = 0
        for i in range(n):
            (got,) = ac.results[f"{fault}-{i}"]  # every task answered, exactly once
            if got.via == "error":
                errors += 1
                assert "no space for the response body" in got.fields["output"]
            else:
                assert got.body_sha256 == expected_sha256(BODY, i)
        assert 1 <= errors <= handed_out
        assert errors < n  # the later ones ran normally once space returned


def test_sigterm_with_a_full_spool_exits_0_and_answers_every_task(
    small_fs: Path, tmp_path: Path
) -> None:
    spool = small_fs / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        with AgentProcess(
            ac.url, spool, tmp_path / "agent.log", ["--executorPoolSize", "2"]
        ) as agent:
            assert ac.wait_for(lambda: ac.count("get-task") >= 1, WAIT), agent.output()
            fill(small_fs)
            ac.add_tasks(_tasks(target, "term", 4))
            assert ac.wait_for(lambda: len(ac.results) >= 1, WAIT), agent.output()
            agent.signal(15)
            code = agent.wait(30)
            assert code == 0, agent.output()
        # every task the server handed out has its answer
        assert len(ac.results) == ac.tasks_handed_out
        assert all(r.via == "error" for rs in ac.results.values() for r in rs)
        assert "spool" in agent.output()
