"""ResultSpool.size: exact at every instant, through every change of a key's state."""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path
from typing import List, Set

from acagent.spool import Origin, ResultSpool


def new_key() -> str:
    return uuid.uuid4().hex


def test_each_state_change_moves_the_count_as_it_should(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "spool")
    key = new_key()
    spool.journal(key, {"answer": "interrupted"})
    assert spool.size() == 0  # a running task's journal is not a result
    with spool.open_body(key) as body:
        body.write(b"x" * 10)
    spool.save(key, {"n": 1})
    assert spool.size() == 1
    spool.save(key, {"n": 2})  # saved again: still one result
    assert spool.size() == 1
    spool.delivered(key)
    assert spool.size() == 0  # the server has it: gone from the count at once
    spool.delivered(key)
    assert spool.size() == 0
    spool.remove(key)
    assert spool.size() == 0
    assert list(spool.directory.iterdir()) == []
    spool.delivered(new_key())  # a key the spool never saw changes nothing
    assert spool.size() == 0


def test_quarantine_and_discard_body(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "spool")
    kept, refused = new_key(), new_key()
    for key in (kept, refused):
        with spool.open_body(key) as body:
            body.write(b"abc")
        spool.save(key, {"k": key})
    assert spool.size() == 2
    spool.discard_body(kept)  # a body that went inline: the record stays counted
    assert spool.size() == 2
    assert spool.quarantine(refused, "refused") is not None
    assert spool.size() == 1


def test_records_found_at_start_are_counted_by_origin(tmp_path: Path) -> None:
    first = ResultSpool(tmp_path / "spool")
    first.set_origin(Origin.of("https://ac.example", "key-a"))
    mine, journal = new_key(), new_key()
    first.save(mine, {"n": 1}, has_body=False)
    first.journal(journal, {"n": 2})
    other = ResultSpool(tmp_path / "spool")
    other.set_origin(Origin.of("https://ac.example", "key-b"))
    foreign = new_key()
    other.save(foreign, {"n": 3}, has_body=False)

    again = ResultSpool(tmp_path / "spool")
    assert again.size() == 3  # records on disk, not yet sorted
    again.set_origin(Origin.of("https://ac.example", "key-a"))
    found = again.recover()
    assert sorted(key for key, _ in found.records) == sorted([mine, journal])
    assert again.size() == 2  # the other key's record is not this agent's
    again.delivered(foreign)  # never delivered by this agent: changes nothing
    assert again.size() == 2
    again.delivered(mine)
    again.remove(mine)
    assert again.size() == 1


def test_removal_on_another_thread_never_shows_a_delivered_result(tmp_path: Path) -> None:
    """The cleanup thread unlinks delivered results while the gauge is read:
    the count, already down when they were delivered, never moves."""
    spool = ResultSpool(tmp_path / "spool")
    keys = [new_key() for _ in range(60)]
    for key in keys:
        spool.save(key, {"k": key}, has_body=False)
    waiting = new_key()
    spool.save(waiting, {"k": waiting}, has_body=False)
    for key in keys:
        spool.delivered(key)
    assert spool.size() == 1
    seen: Set[int] = set()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change hands as often as they can
    try:
        _remove_while_watched(spool, keys, seen)
    finally:
        sys.setswitchinterval(switch)
    assert seen == {1}
    assert spool.size() == 1


def _remove_while_watched(spool: ResultSpool, keys: List[str], seen: Set[int]) -> None:
    for _ in range(10):  # many rounds: each remove is a window for a torn read
        done = threading.Event()

        def watch(done: threading.Event = done) -> None:
            while not done.is_set():
                seen.add(spool.size())

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for key in keys:
                spool.remove(key)
        finally:
            done.set()
            watcher.join()
        for key in keys:
            spool.save(key, {"k": key}, has_body=False)
            spool.delivered(key)
