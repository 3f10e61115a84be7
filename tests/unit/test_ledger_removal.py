"""The Ledger's deferred removal and its wait, and the journal of a fetched task.

An idle agent must not poll (<= 0.5% of a core): the cleanup thread sleeps in
``remove_delivered`` until there is something to remove, and
``wake_remover()`` (a stage stopping) ends that sleep, not before. These
tests sequence a waiting thread with the ledger's own notifications.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, List

from helpers import WAIT

from acagent.ledger import INTERRUPTED, Ledger
from acagent.models import Result, Task
from acagent.spool import ResultSpool


def _start_waiting(
    wait: Callable[[], Any], out: List[Any], started: threading.Event
) -> threading.Thread:
    """Run ``wait`` on a thread (its answer goes to ``out``); return once it started."""

    def run() -> None:
        started.set()
        out.append(wait())

    thread = threading.Thread(target=run, name="test-ledger-waiter")
    thread.start()
    assert started.wait(WAIT)
    return thread


def _finish_one(ledger: Ledger, n: int) -> None:
    assert ledger.reserve(timeout=WAIT)
    ledger.finished(Result.agent_error({"taskId": f"t{n}"}, "test", key=f"{n:032x}"))


# ---------------------------------------------------------------- deferred removal


def test_delivered_leaves_the_spool_files_to_remove_delivered(tmp_path: Path) -> None:
    """The delivering thread does not touch the disk; the cleanup call removes the files."""
    spool = ResultSpool(tmp_path / "spool")
    ledger = Ledger(slots=5, threshold=3, spool=spool)
    for n in (1, 2):
        _finish_one(ledger, n)
    deliveries = [ledger.take_result(WAIT) for _ in range(2)]
    for delivery in deliveries:
        assert delivery is not None
        ledger.delivered(delivery)
    assert ledger.outstanding() == 0  # backpressure is released at once
    # the count is exact at once; the files are still there
    assert spool.size() == 0
    assert len(list((tmp_path / "spool").glob("*.json"))) == 2
    assert ledger.remove_delivered(WAIT) == 2  # both in one call
    assert spool.size() == 0
    assert list((tmp_path / "spool").glob("*.json")) == []
    assert ledger.remove_delivered(0.0) == 0  # nothing queued: no wait


def test_wake_remover_ends_the_cleanup_wait(tmp_path: Path) -> None:
    ledger = Ledger(slots=5, threshold=3, spool=ResultSpool(tmp_path / "spool"))
    out: List[Any] = []
    thread = _start_waiting(lambda: ledger.remove_delivered(WAIT), out, threading.Event())
    thread.join(0.2)
    assert thread.is_alive()  # nothing delivered: still waiting
    ledger.wake_remover()
    thread.join(WAIT)
    assert not thread.is_alive() and out == [0]


def test_fetched_journals_the_task_before_it_is_queued(tmp_path: Path) -> None:
    # A kill at any moment after get-task's reply was read must leave the
    # task's answer: the journal is on disk when ``fetched`` returns, before
    # any Executor thread has taken the task.
    spool = ResultSpool(str(tmp_path / "spool"))
    ledger = Ledger(slots=2, threshold=2, spool=spool)
    task = Task.parse({"taskId": "j1", "method": "GET", "url": "http://t.example/"})
    assert ledger.reserve(timeout=WAIT)
    ledger.fetched(task)
    (key, record), *others = spool.pending()
    assert others == []
    assert record["fields"]["taskId"] == "j1"
    assert record["error"] == INTERRUPTED
    queued = ledger.take_task(timeout=WAIT)
    assert queued is not None and queued.key == key
