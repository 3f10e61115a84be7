"""Tests of acagent.spool.ResultSpool: durability, privacy, naming, threads."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, List

import pytest
from helpers import ROOT

from acagent.spool import ResultSpool

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and dir fsync")


def new_key() -> str:
    return uuid.uuid4().hex


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_body(spool: ResultSpool, key: str, data: bytes) -> None:
    with spool.open_body(key) as body:
        body.write(data)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path) -> ResultSpool:
    return ResultSpool(spool_dir)


# ---------------------------------------------------------------- permissions


@posix_only
def test_folder_and_parents_are_created_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "spool"
    spool = ResultSpool(directory)
    assert spool.directory == directory
    assert directory.is_dir()
    assert mode_of(directory) == 0o700


@posix_only
def test_existing_folder_is_made_private(spool_dir: Path) -> None:
    spool_dir.mkdir(mode=0o755)
    os.chmod(spool_dir, 0o755)
    ResultSpool(spool_dir)
    assert mode_of(spool_dir) == 0o700


def test_chmod_failure_is_a_warning(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError("not the owner")

    monkeypatch.setattr(os, "chmod", refuse)
    with caplog.at_level(logging.WARNING, logger="acagent.spool"):
        spool = ResultSpool(spool_dir)
    assert spool_dir.is_dir()
    assert any("0700" in r.getMessage() and r.name == "acagent.spool" for r in caplog.records)
    assert len(spool) == 0


@posix_only
def test_record_body_and_tmp_files_are_0600(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_umask = os.umask(0o022)
    try:
        key = new_key()
        write_body(spool, key, b"payload")
        spool.save(key, {"taskId": "t1"})
        assert mode_of(spool.body_path(key)) == 0o600
        assert mode_of(spool.record_path(key)) == 0o600

        # the temporary file is private from its creation, not only after the rename
        seen: List[int] = []
        real_replace = os.replace

        def spy(src: Any, dst: Any) -> None:
            seen.append(mode_of(Path(src)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", spy)
        spool.save(key, {"taskId": "t1", "again": True})
        assert seen == [0o600]
    finally:
        os.umask(old_umask)


# ---------------------------------------------------------------- bodies


def test_body_path_and_exclusive_open(spool: ResultSpool, spool_dir: Path) -> None:
    key = new_key()
    assert spool.body_path(key) == spool_dir / f"{key}.body"
    assert not spool.has_body(key)
    write_body(spool, key, b"\x00\x01binary\xff")
    assert spool.has_body(key)
    assert spool.body_path(key).read_bytes() == b"\x00\x01binary\xff"
    with pytest.raises(FileExistsError):
        spool.open_body(key)
    assert spool.body_path(key).read_bytes() == b"\x00\x01binary\xff"


def test_discard_body_removes_only_the_body(spool: ResultSpool) -> None:
    key = new_key()
    write_body(spool, key, b"x" * 10)
    spool.save(key, {"taskId": "t"})
    spool.discard_body(key)
    spool.discard_body(key)  # missing is fine
    assert not spool.body_path(key).exists()
    assert spool.pending() == [(key, {"taskId": "t"})]
    assert len(spool) == 1


# ---------------------------------------------------------------- save / pending


def test_save_then_pending_round_trips(spool: ResultSpool) -> None:
    key = new_key()
    record = {"taskId": "t-1", "statusCode": 200, "output": "aGk=", "nested": {"a": [1, None]}}
    spool.save(key, record)
    assert spool.pending() == [(key, record)]
    assert json.loads(spool.record_path(key).read_text("utf-8")) == record
    assert len(spool) == spool.size() == 1


def test_unicode_and_odd_strings_survive(spool: ResultSpool) -> None:
    key = new_key()
    record = {"taskId": "t", "output": "Agent Side Error: caf\u00e9 \u2603 \ud800"}
    spool.save(key, record)
    assert spool.pending() == [(key, record)]


def test_save_rejects_bad_records_without_touching_disk(spool: ResultSpool) -> None:
    key = new_key()
    with pytest.raises(TypeError):
        spool.save(key, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        spool.save(key, {"body": b"bytes are not JSON"})
    assert list(spool.directory.iterdir()) == []
    assert len(spool) == 0


def test_overwrite_keeps_one_record(spool: ResultSpool) -> None:
    key = new_key()
    spool.save(key, {"v": 1})
    spool.save(key, {"v": 2})
    assert len(spool) == 1
    assert spool.pending() == [(key, {"v": 2})]


def test_pending_order_is_mtime_then_key(spool: ResultSpool) -> None:
    keys = [new_key() for _ in range(5)]
    for i, key in enumerate(keys):
        spool.save(key, {"i": i})
    # give them explicit times: k3 oldest, then k1, then k0/k2/k4 tied (key order)
    base = 1_700_000_000_000_000_000
    times = {keys[3]: base, keys[1]: base + 1_000, keys[0]: base + 5_000}
    times[keys[2]] = times[keys[4]] = base + 5_000
    for key, ns in times.items():
        os.utime(spool.record_path(key), ns=(ns, ns))
    expected = [keys[3], keys[1], *sorted([keys[0], keys[2], keys[4]])]
    assert [k for k, _ in spool.pending()] == expected


def test_records_persist_across_instances(spool_dir: Path) -> None:
    first = ResultSpool(spool_dir)
    keys = [new_key() for _ in range(3)]
    for i, key in enumerate(keys):
        write_body(first, key, b"body %d" % i)
        first.save(key, {"i": i})
        os.utime(first.record_path(key), ns=(i * 10**9, i * 10**9))
    first.remove(keys[1])
    del first

    second = ResultSpool(spool_dir)
    assert len(second) == 2  # counted from the disk at start, before any pending()
    assert second.clean_orphans() == 0
    assert second.pending() == [(keys[0], {"i": 0}), (keys[2], {"i": 2})]
    assert second.body_path(keys[2]).read_bytes() == b"body 2"


def test_record_with_missing_body_is_still_returned(spool: ResultSpool) -> None:
    key = new_key()
    write_body(spool, key, b"data")
    spool.save(key, {"taskId": "t", "bodyFile": True})
    spool.body_path(key).unlink()
    assert spool.pending() == [(key, {"taskId": "t", "bodyFile": True})]
    assert not spool.has_body(key)


# ---------------------------------------------------------------- crashes


def test_leftover_tmp_is_ignored_and_cleaned(spool: ResultSpool) -> None:
    done, crashed = new_key(), new_key()
    spool.save(done, {"ok": True})
    # a crash mid-save leaves a half-written temporary file and no record
    (spool.directory / f"{crashed}.json.tmp").write_bytes(b'{"taskId": "half')
    assert spool.pending() == [(done, {"ok": True})]
    assert len(spool) == 1
    assert spool.clean_orphans() == 1
    assert not (spool.directory / f"{crashed}.json.tmp").exists()
    # and a later save of that key works normally
    spool.save(crashed, {"ok": 2})
    assert len(spool) == 2


def test_crash_in_replace_keeps_old_record(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, fresh = new_key(), new_key()
    spool.save(old, {"version": "old"})

    def crash(src: Any, dst: Any) -> None:
        raise OSError(5, "simulated I/O error during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        spool.save(old, {"version": "new"})
    with pytest.raises(OSError, match="simulated"):
        spool.save(fresh, {"version": "new"})
    monkeypatch.undo()

    assert json.loads(spool.record_path(old).read_bytes()) == {"version": "old"}
    assert not spool.record_path(fresh).exists()
    assert not list(spool.directory.glob("*.tmp"))
    assert len(spool) == 1
    assert spool.pending() == [(old, {"version": "old"})]


def test_crash_in_write_leaves_nothing(spool: ResultSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        spool.save(key, {"a": 1})
    monkeypatch.undo()
    assert list(spool.directory.iterdir()) == []
    assert len(spool) == 0


# ---------------------------------------------------------------- corrupt records


def test_corrupt_records_are_moved_aside_and_logged_once(
    spool: ResultSpool, caplog: pytest.LogCaptureFixture
) -> None:
    good, garbage, not_object, empty = (new_key() for _ in range(4))
    spool.save(good, {"ok": True})
    spool.record_path(garbage).write_bytes(b"{not json")
    spool.record_path(not_object).write_text("[1, 2, 3]")
    spool.record_path(empty).write_bytes(b"")
    reopened = ResultSpool(spool.directory)
    assert len(reopened) == 4  # not parsed yet

    with caplog.at_level(logging.WARNING, logger="acagent.spool"):
        assert reopened.pending() == [(good, {"ok": True})]
        assert reopened.pending() == [(good, {"ok": True})]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert len(reopened) == 1
    for key in (garbage, not_object, empty):
        assert not reopened.record_path(key).exists()
        assert (reopened.directory / f"{key}.json.corrupt").exists()
    # corrupt files are kept for a human, not cleaned as orphans
    assert reopened.clean_orphans() == 0
    assert (reopened.directory / f"{garbage}.json.corrupt").read_bytes() == b"{not json"


# ---------------------------------------------------------------- orphans


def test_clean_orphans_removes_only_its_own_debris(spool: ResultSpool) -> None:
    kept, orphan, stale = new_key(), new_key(), new_key()
    write_body(spool, kept, b"keep me")
    spool.save(kept, {"k": 1})
    d = spool.directory
    (d / f"{orphan}.body").write_bytes(b"orphan")
    (d / f"{stale}.json.tmp").write_bytes(b"{")
    foreign = [
        d / "notes.txt",
        d / f"{orphan.upper()}.body",
        d / f"{orphan}.body.bak",
        d / f"x{orphan}.body",
        d / "short.body",
        d / f"{stale}.json.corrupt",
    ]
    for path in foreign:
        path.write_bytes(b"not mine")
    (d / f"{new_key()}.body").mkdir()  # a directory with a spool-like name

    assert spool.clean_orphans() == 2
    assert not (d / f"{orphan}.body").exists()
    assert not (d / f"{stale}.json.tmp").exists()
    assert spool.body_path(kept).read_bytes() == b"keep me"
    for path in foreign:
        assert path.read_bytes() == b"not mine"
    assert spool.clean_orphans() == 0


def test_clean_orphans_spares_a_body_being_written(spool: ResultSpool) -> None:
    key = new_key()
    with spool.open_body(key) as body:
        body.write(b"streaming")
        assert spool.clean_orphans() == 0
    assert spool.clean_orphans() == 0
    assert spool.body_path(key).exists()
    # a fresh instance (a restart) does not know it: it is an orphan there
    assert ResultSpool(spool.directory).clean_orphans() == 1


# ---------------------------------------------------------------- remove


def test_remove_is_idempotent(spool: ResultSpool) -> None:
    key = new_key()
    write_body(spool, key, b"b")
    spool.save(key, {"a": 1})
    spool.remove(key)
    spool.remove(key)
    spool.remove(new_key())  # never saved
    assert list(spool.directory.iterdir()) == []
    assert len(spool) == 0
    assert spool.pending() == []


def test_remove_unlinks_record_before_body(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    write_body(spool, key, b"b")
    spool.save(key, {"a": 1})
    order: List[str] = []
    real_unlink = os.unlink

    def spy(path: Any, *args: Any, **kwargs: Any) -> None:
        order.append(Path(path).name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", spy)
    spool.remove(key)
    # the record first; then the body and its (derived) gzip copy
    assert order == [f"{key}.json", f"{key}.body", f"{key}.body.gz"]


# ---------------------------------------------------------------- keys


BAD_KEYS = [
    "../x",
    "a/b",
    "",
    "A" * 32,
    "0123456789ABCDEF0123456789abcdef",
    "a" * 31,
    "a" * 33,
    "g" * 32,
    "a" * 32 + "\n",
    "../" + "a" * 29,
    "/" + "a" * 31,
    str(uuid.uuid4()),  # with dashes
]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize(
    "call",
    [
        lambda s, k: s.body_path(k),
        lambda s, k: s.record_path(k),
        lambda s, k: s.open_body(k),
        lambda s, k: s.save(k, {}),
        lambda s, k: s.remove(k),
        lambda s, k: s.discard_body(k),
        lambda s, k: s.has_body(k),
    ],
    ids=["body_path", "record_path", "open_body", "save", "remove", "discard_body", "has_body"],
)
def test_invalid_keys_are_rejected(
    spool: ResultSpool, key: str, call: Callable[[ResultSpool, str], object]
) -> None:
    with pytest.raises(ValueError, match="invalid spool key"):
        call(spool, key)
    assert list(spool.directory.iterdir()) == []
    assert list(spool.directory.parent.iterdir()) == [spool.directory]


def test_non_string_key_is_rejected(spool: ResultSpool) -> None:
    with pytest.raises(ValueError):
        spool.save(None, {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        spool.body_path(b"a" * 32)  # type: ignore[arg-type]


# ---------------------------------------------------------------- threads


def test_concurrent_save_and_remove_keep_size_right(spool: ResultSpool) -> None:
    threads_n, per_thread = 8, 40
    errors: List[BaseException] = []
    kept: List[str] = []
    kept_lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def work(n: int) -> None:
        try:
            start.wait(timeout=10)
            for i in range(per_thread):
                key = new_key()
                if i % 3 == 0:
                    write_body(spool, key, b"body")
                spool.save(key, {"thread": n, "i": i})
                if i % 2 == 0:
                    spool.save(key, {"thread": n, "i": i, "again": True})
                    spool.remove(key)
                else:
                    with kept_lock:
                        kept.append(key)
                spool.size()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a spool worker thread hung"
    assert errors == []

    expected = threads_n * per_thread // 2
    assert len(kept) == expected
    assert spool.size() == expected
    assert len(list(spool.directory.glob("*.json"))) == expected
    assert sorted(k for k, _ in spool.pending()) == sorted(kept)
    assert spool.size() == expected
    assert not list(spool.directory.glob("*.tmp"))


# ---------------------------------------------------------------- fsync


def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Patch os.fsync to record what each call synced: 'dir' or the file's name kind."""
    calls: List[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_save_fsyncs_record_and_folder(spool: ResultSpool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_fsyncs(monkeypatch)
    spool.save(new_key(), {"a": 1})
    assert calls.count("file") >= 1
    if os.name == "posix":
        assert calls.count("dir") >= 1
        assert calls[-1] == "dir"  # the rename is made durable last


def test_a_body_is_on_disk_before_its_record_is_saved(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_fsyncs(monkeypatch)
    key = new_key()
    write_body(spool, key, b"body bytes")
    assert calls == ["file"]  # open_body's file is synced as it closes
    spool.save(key, {"a": 1})
    assert calls.count("file") == 2  # plus the record; the body is not synced twice

    # A body written any other way (an earlier run, a subclass) is synced by save.
    other = new_key()
    spool.body_path(other).write_bytes(b"written elsewhere")
    calls.clear()
    spool.save(other, {"b": 2})
    assert calls.count("file") == 2  # body and record

    # A second save of the same key syncs the body again: the close-time
    # note bridges one close to one save only.
    calls.clear()
    spool.save(key, {"a": 2})
    assert calls.count("file") == 2


def test_a_body_file_writes_every_byte_and_refuses_writes_after_close(spool: ResultSpool) -> None:
    key = new_key()
    data = bytes(range(256)) * 5000  # 1.28 MB in one write call
    with spool.open_body(key) as body:
        assert body.write(data) == len(data)
        assert body.write(memoryview(b"tail")) == 4
    assert spool.body_path(key).read_bytes() == data + b"tail"
    with pytest.raises(ValueError):
        body.write(b"late")


@posix_only
def test_remove_leaves_the_folder_fsync_to_the_next_save(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key()
    spool.save(key, {"a": 1})
    calls = count_fsyncs(monkeypatch)
    spool.remove(key)
    assert calls == []  # the delivering thread does not wait for the disk
    assert not spool.record_path(key).exists()
    spool.save(new_key(), {"b": 2})
    assert calls.count("dir") == 1  # this fsync makes the unlink durable too


def test_a_record_saved_without_a_body_file_never_looks_for_one(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``has_body=False`` (a body kept in the record, an error, an empty body):
    neither ``save`` nor ``remove`` touches a body file name; each skipped
    call is a GIL hand-off less under load."""
    touched: List[str] = []
    real_open, real_unlink = os.open, os.unlink

    def spy_open(path: Any, *args: Any, **kwargs: Any) -> int:
        touched.append(os.path.basename(str(path)))
        return real_open(path, *args, **kwargs)

    def spy_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        touched.append(os.path.basename(str(path)))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    key = new_key()
    spool.save(key, {"bodyBase64": "aGk="}, has_body=False)
    spool.remove(key)
    assert not spool.record_path(key).exists()
    assert [name for name in touched if ".body" in name] == []
    assert f"{key}.json" in touched  # the record itself was removed

    # A body opened after all (a subclass) is removed with its record.
    late = new_key()
    spool.save(late, {"a": 1}, has_body=False)
    write_body(spool, late, b"late body")
    spool.remove(late)
    assert not spool.body_path(late).exists()

    # A body still being written when its task is answered without one (the
    # shutdown deadline) is removed with the record too.
    racing = new_key()
    with spool.open_body(racing) as body:
        body.write(b"half")
        spool.save(racing, {"error": "agent shutting down"}, has_body=False)
    spool.remove(racing)
    assert not spool.body_path(racing).exists()
    assert list(spool.directory.iterdir()) == []


def test_quarantine_writes_out_a_body_the_record_holds(spool: ResultSpool) -> None:
    key = new_key()
    spool.save(key, {"bodyBase64": "AAEC"}, has_body=False)
    folder = spool.quarantine(key, "HTTP 422: no", body=b"\x00\x01\x02")
    assert folder is not None
    assert sorted(p.name for p in folder.iterdir()) == ["body", "reason.txt", "record.json"]
    assert (folder / "body").read_bytes() == b"\x00\x01\x02"
    assert spool.quarantined() == [key]


# ---------------------------------------------------------------- misc


def test_bytes_used_counts_spool_files(spool: ResultSpool) -> None:
    assert spool.bytes_used() == 0
    key = new_key()
    write_body(spool, key, b"x" * 1000)
    spool.save(key, {"a": 1})
    (spool.directory / "foreign.txt").write_bytes(b"y" * 5000)
    expected = 1000 + spool.record_path(key).stat().st_size
    assert spool.bytes_used() == expected
    spool.remove(key)
    assert spool.bytes_used() == 0


def test_empty_spool_is_truthy(spool: ResultSpool) -> None:
    assert len(spool) == 0
    assert bool(spool) is True
    assert "ResultSpool(" in repr(spool)


def test_delivery_guarantee_is_documented() -> None:
    assert ResultSpool.DELIVERY_GUARANTEE == "at-least-once"
    source = ROOT / "acagent" / "spool.py"
    text = source.read_text("utf-8")
    # No stronger claim than the code keeps: a lost reply can mean a second copy.
    assert "Exactly once while the process lives" not in text
    assert "at least once" in text and "identical content" in text


def test_concurrent_saves_share_folder_fsyncs(
    spool: ResultSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: saves that overlap an fsync of the folder share the next one."""
    calls: List[int] = []
    first_started = threading.Event()
    release = threading.Event()
    real = spool._fsync_dir

    def gated() -> None:
        calls.append(1)
        if len(calls) == 1:
            first_started.set()
            assert release.wait(10)
        real()

    monkeypatch.setattr(spool, "_fsync_dir", gated)
    keys = [new_key() for _ in range(8)]
    threads = [
        threading.Thread(target=spool.save, args=(key, {"n": i}), name=f"save-{i}")
        for i, key in enumerate(keys)
    ]
    threads[0].start()
    assert first_started.wait(10)  # one folder fsync is running (and held)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 10
    while spool.size() < 8 and time.monotonic() < deadline:  # every rename is done
        time.sleep(0.01)
    assert spool.size() == 8
    assert all(t.is_alive() for t in threads)  # each waits for a folder fsync after its rename
    release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert len(calls) == 2  # the held one, then one for the seven that waited
    assert {key for key, _ in spool.pending()} == set(keys)
