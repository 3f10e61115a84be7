"""A full or read-only spool pauses work and recovers by itself.

A real small file system: a tmpfs mounted for the test (CI runs as root; the
test fails, it does not skip, where it cannot mount). Every task is answered
(an error result says why when its body could not be written), no
reservation or executor slot leaks, fetching pauses while the spool cannot
be written, ``/readyz`` says why, work resumes by itself when space returns,
and SIGTERM stops the agent with exit 0 in that state. A spool too small for
every executor slot's body is shared out one task at a time: no pausing and
resuming in turn, and hardly a task answered "no space".
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest
import requests
from helpers import WAIT, AgentProcess, make_config, make_pipeline, running, wait_until

from acagent.ledger import SPOOL_HOLD
from acagent.observers import Observer
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

BODY = 700_000


@contextlib.contextmanager
def _tmpfs(mount: Path, size: str) -> Iterator[Path]:
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "small", "6m") as mount:
        yield mount


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """3 MB: room for the bodies (and gzip copies) of two 700 kB results at most."""
    with _tmpfs(tmp_path / "tiny", "3m") as mount:
        yield mount


class SpoolHolds(Observer):
    """Every pause (a message) and resume (None) of fetching for the spool."""

    def __init__(self) -> None:
        self.changes: List[Tuple[float, Optional[str]]] = []

    def on_hold(self, reason_key: str, message: Optional[str]) -> None:
        if reason_key != SPOOL_HOLD:
            return
        held = message is not None
        if not self.changes or (self.changes[-1][1] is not None) != held:
            self.changes.append((time.monotonic(), message))


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


def test_a_spool_too_small_for_every_slot_is_shared_out_without_flapping(tiny_fs: Path) -> None:
    """60 bodies of 700 kB through a 3 MB spool and 3 executor slots: once the
    disk first runs out, fetching pauses until a body fits, then takes one
    task at a time, each once its body fits. Only the tasks already running
    when the disk first ran out are answered "no space"; fetching is paused
    and resumed once, not again and again.
    """
    n = 60
    holds = SpoolHolds()
    with FakeTarget() as target, FakeACServer() as ac:
        config = make_config(ac.url, tiny_fs / "spool", executor_pool_size=2)
        pipeline = make_pipeline(config, observers=[holds])
        with running(pipeline):
            ac.add_tasks(_tasks(target, "tiny", n))
            assert ac.wait_for_results(n, 3 * WAIT), len(ac.results)
            assert wait_until(lambda: pipeline.ledger.outstanding() == 0, WAIT)
        no_space = 0
        for i in range(n):
            (got,) = ac.results[f"tiny-{i}"]  # every task answered, exactly once
            if got.via == "error":
                assert "no space for the response body" in got.fields["output"]
                no_space += 1
            else:
                assert got.body_sha256 == expected_sha256(BODY, i)
    pauses = [t for t, message in holds.changes if message is not None]
    resumes = [t for t, message in holds.changes if message is None]
    # Only the tasks already running when the disk first ran out, at most one per slot.
    assert no_space <= config.executor_slots, no_space
    assert len(pauses) <= 2 and len(resumes) == len(pauses), holds.changes
    assert all(r - p >= pipeline.ledger.SPOOL_PROBE_INTERVAL for p, r in zip(pauses, resumes))
