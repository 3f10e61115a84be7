"""The Ledger's accounts outside a run's flow: what it queues at start from an
earlier run's spool (``recover``), and the answers it leaves in the spool at
the shutdown deadline (``answer_unfinished``). No servers: a spool folder,
a Ledger, and its queues."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from helpers import WAIT

from acagent.ledger import INTERRUPTED, Ledger
from acagent.models import Result, Task, new_result_key
from acagent.observers import Observer, Observers
from acagent.spool import Origin, ResultSpool

ORIGIN = Origin.of("https://ac.example", "key-a")


class Ready(Observer):
    def __init__(self) -> None:
        self.results: List[Result] = []

    def on_result_ready(self, result: Result) -> None:
        self.results.append(result)


def make_ledger(spool: ResultSpool, observers: Optional[Observers] = None) -> Ledger:
    return Ledger(slots=4, threshold=10, spool=spool, observers=observers)


def new_spool(directory: Path) -> ResultSpool:
    spool = ResultSpool(directory)
    spool.set_origin(ORIGIN)
    return spool


def queued(ledger: Ledger) -> Dict[str, Result]:
    """Every result the Ledger queued for delivery, by task id."""
    found: Dict[str, Result] = {}
    while True:
        delivery = ledger.take_result(0.0)
        if delivery is None:
            return found
        assert not delivery.counted  # an earlier run's: not this run's backpressure
        found[delivery.result.task_id] = delivery.result


def task(task_id: str) -> Task:
    return Task.parse({"taskId": task_id, "method": "GET", "url": "http://t.example/x"})


def test_recover_queues_results_and_answers_interrupted_tasks(tmp_path: Path) -> None:
    earlier = new_spool(tmp_path / "spool")
    done, taken = new_result_key(), new_result_key()
    with earlier.open_body(done) as body:
        body.write(b"hello")
    result = Result(
        fields={"taskId": "done"},
        status_code=200,
        body_path="/elsewhere/not/trusted",
        body_size=5,
        key="not-trusted-either",
    )
    earlier.save(done, result.to_record())
    journal = Result.agent_error({"taskId": "taken"}, INTERRUPTED, failure="interrupted")
    earlier.journal(taken, journal.to_record())

    spool = new_spool(tmp_path / "spool")
    ledger = make_ledger(spool)
    ledger.recover()
    got = queued(ledger)
    assert set(got) == {"done", "taken"}
    assert got["done"].key == done  # the file name says which result it is ...
    assert got["done"].body_path == str(spool.body_path(done))  # ... and where its body is
    assert got["taken"].failure == "interrupted" and got["taken"].key == taken
    assert ledger.outstanding() == 0
    assert spool.size() == 2


def test_recover_quarantines_damaged_records_and_answers_their_tasks(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    spool = new_spool(folder)
    unusable, broken, nameless = new_result_key(), new_result_key(), new_result_key()
    spool.save(unusable, {"fields": {"taskId": "unusable"}}, has_body=False)  # no statusCode
    (folder / f"{broken}.json").write_text('{"fields": {"taskId": "broken"}, "statusC')
    (folder / f"{nameless}.json").write_text("{not json")

    ledger = make_ledger(new_spool(folder))
    ledger.recover()
    got = queued(ledger)
    assert set(got) == {"unusable", "broken"}
    for task_id, key in (("unusable", unusable), ("broken", broken)):
        assert got[task_id].failure == "damaged" and got[task_id].key == key
        assert json.loads((folder / f"{key}.json").read_text())["failure"] == "damaged"
    assert sorted(p.name for p in (folder / "quarantine").iterdir()) == sorted(
        [unusable, broken, nameless]
    )
    assert not (folder / f"{nameless}.json").exists()


def test_recover_leaves_another_origins_records_and_stamps_unmarked_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "spool"
    other = ResultSpool(folder)
    other.set_origin(Origin.of("https://ac.example", "key-b"))
    foreign = new_result_key()
    other.save(foreign, Result.agent_error({"taskId": "foreign"}, "x").to_record())
    unmarked = new_result_key()
    ResultSpool(folder).save(
        unmarked, Result.agent_error({"taskId": "old"}, "x").to_record(), has_body=False
    )

    spool = new_spool(folder)
    ledger = make_ledger(spool)
    with caplog.at_level(logging.INFO, logger="acagent.ledger"):
        ledger.recover()
    assert set(queued(ledger)) == {"old"}
    assert spool.size() == 1
    assert (folder / f"{foreign}.json").exists()
    stamped = json.loads((folder / f"{unmarked}.json").read_text())
    assert stamped["spool"]["keyDigest"] == ORIGIN.key_digest
    text = caplog.text
    assert "1 result(s) from an earlier run will be re-sent" in text
    assert "1 result(s) in the spool name no AC server" in text
    assert "belong to another AC server or API key" in text


def test_answer_unfinished_leaves_the_answers_in_the_spool(tmp_path: Path) -> None:
    ready = Ready()
    spool = new_spool(tmp_path / "spool")
    ledger = make_ledger(spool, Observers((ready,)))
    running: Dict[str, Task] = {}
    for n in range(2):
        assert ledger.reserve(WAIT)
        ledger.fetched(task(f"run-{n}"))
        taken = ledger.take_task(WAIT)
        assert taken is not None and taken.key is not None
        with spool.open_body(taken.key) as body:  # its body, half written
            body.write(b"partial")
        running[taken.key] = taken
    assert ledger.executing == 2 and spool.size() == 0  # journals only

    ledger.answer_unfinished(running)
    assert ledger.executing == 0 and ledger.outstanding() == 0
    assert spool.size() == 2
    assert [r.task_id for r in ready.results] == ["run-0", "run-1"]
    assert ledger.take_result(0.0) is None  # not delivered in this run: the next start does
    for key in running:
        record = json.loads(spool.record_path(key).read_text())
        assert record["failure"] == "shutdown" and record["error"] == "agent shutting down"
        assert not spool.body_path(key).exists()

    again = make_ledger(new_spool(tmp_path / "spool"))
    again.recover()
    assert {r.failure for r in queued(again).values()} == {"shutdown"}


def test_a_delivered_result_leaves_the_spool_count_before_its_files(tmp_path: Path) -> None:
    spool = new_spool(tmp_path / "spool")
    ledger = make_ledger(spool)
    assert ledger.reserve(WAIT)
    ledger.fetched(task("t"))
    taken = ledger.take_task(WAIT)
    assert taken is not None and taken.key is not None
    assert spool.size() == 0  # its journal only
    ledger.finished(Result(fields={"taskId": "t"}, status_code=204, key=taken.key))
    assert spool.size() == 1 and ledger.waiting_results == 1
    delivery = ledger.take_result(0.0)
    assert delivery is not None
    ledger.delivered(delivery)
    assert spool.size() == 0 and ledger.outstanding() == 0
    assert spool.record_path(taken.key).exists()  # the cleanup thread's work, later
    assert ledger.remove_delivered(0.0) == 1
    assert not spool.record_path(taken.key).exists() and spool.size() == 0
