"""Spool records say where they belong and what they hold.

A result goes only to the AC server and API key it was taken from: two
agents of two servers and keys share one spool folder in turn, and neither
sends the other's results. A result is what the target sent, or an error: a
body changed in the spool is quarantined and its task answered with an error
result. A damaged record whose taskId can still be read is answered too.
Against real fake servers on 127.0.0.1; the pure rules have table tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

import pytest
from helpers import (
    WAIT,
    bytes_tasks,
    leave_results_in_spool,
    make_config,
    make_pipeline,
    running,
    spool_records,
    wait_until,
)

from acagent.cli.check import run_check
from acagent.config import AgentConfig
from acagent.models import Result, new_result_key
from acagent.spool import (
    MINE,
    OTHER,
    QUARANTINE_DIR,
    RECENT_BODIES,
    SPOOL_FIELD,
    UNMARKED,
    Origin,
    ResultSpool,
    body_mismatch,
    origin_verdict,
    survey_spool,
    task_id_in_record,
    task_id_in_text,
    tasks_that_fit,
)
from acagent.testing import FakeACServer, FakeTarget, expected_sha256

KEY_A = "key-of-agent-a"
KEY_B = "key-of-agent-b"
MIB = 1024 * 1024


def _config(ac: FakeACServer, spool: Path, key: str) -> AgentConfig:
    return make_config(ac.url, spool, api_key=key, executor_pool_size=2, shutdown_timeout=1.0)


# ------------------------------------------------------------------ where a result belongs


def test_two_agents_on_one_spool_each_deliver_only_their_own_results(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    n = 3
    with FakeTarget() as target, FakeACServer(api_key=KEY_A) as a, FakeACServer(api_key=KEY_B) as b:
        origin_a = Origin.of(a.url, KEY_A)
        tasks = bytes_tasks(target, "a", n, 2048)
        leave_results_in_spool(a, spool, KEY_A, tasks)
        assert all(r[SPOOL_FIELD]["server"] == origin_a.server for r in spool_records(spool))

        # Agent 2: another server and key on the same folder.
        caplog.clear()
        agent2 = make_pipeline(_config(b, spool, KEY_B))
        with caplog.at_level(logging.WARNING, logger="acagent.pipeline"), running(agent2):
            assert len(agent2.ledger.results) == 0  # nothing of agent 1's was queued at start
            assert agent2.spool.size() == 0  # nor counted as waiting
            b.add_task({"taskId": "b-own", "method": "GET", "url": f"{target.url}/bytes/10?seed=1"})
            assert b.wait_for_results(1, WAIT)
            assert wait_until(lambda: agent2.ledger.outstanding() == 0, WAIT)
        assert set(b.results) == {"b-own"}  # agent 1's results never reached server B
        assert len(spool_records(spool)) == n  # ... and are still there, untouched
        told = [r.getMessage() for r in caplog.records if "another AC server" in r.getMessage()]
        assert len(told) == 1, told
        assert f"{n} result(s)" in told[0] and f"{n} of {origin_a}" in told[0]
        assert origin_a.server in told[0] and origin_a.key_digest in told[0]
        assert KEY_A not in caplog.text and KEY_B not in caplog.text

        # acagent check, as agent 2 would run it, shows them.
        out = io.StringIO()
        assert run_check(_config(b, spool, KEY_B), out) == 0, out.getvalue()
        (note,) = [line for line in out.getvalue().splitlines() if line.startswith("NOTE  spool")]
        assert f"{n} kept for another AC server or API key" in note and str(origin_a) in note

        # Agent 1 again: it delivers them, byte for byte.
        agent1 = make_pipeline(_config(a, spool, KEY_A))
        with running(agent1):
            assert a.wait_for_results(n, WAIT)
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
        for i in range(n):
            (got,) = a.results[f"a-{i}"]
            assert got.via == "inline" and got.body_sha256 == expected_sha256(2048, i)
        assert set(b.results) == {"b-own"}


def test_a_record_of_no_origin_is_adopted_and_stamped(tmp_path: Path) -> None:
    """Written before origins were recorded: delivered by the next agent, which
    stamps it first, so from then on only its server and key get it."""
    spool_dir = tmp_path / "spool"
    old = Result(fields={"taskId": "old-1"}, status_code=204)
    ResultSpool(spool_dir).save(old.key, old.to_record(), has_body=False)
    with FakeACServer() as ac:
        pipeline = make_pipeline(make_config(ac.url, spool_dir))
        pipeline.uploader.stop()  # deliver nothing yet: look at the stamp first
        origin = Origin.of(ac.url, "k")
        with running(pipeline):
            (record,) = spool_records(spool_dir)
            assert record[SPOOL_FIELD] == {"server": origin.server, "keyDigest": origin.key_digest}
        assert ac.results == {}


def test_records_and_journals_carry_the_origin_and_never_the_key(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "spool")
    origin = Origin.of("https://ac.example.com/", "s3cret-api-key")
    spool.set_origin(origin)
    journal, saved = new_result_key(), new_result_key()
    spool.journal(journal, {"fields": {"taskId": "j"}})
    with spool.open_body(saved) as body:
        body.write(b"x" * 1000)
    spool.save(saved, {"fields": {"taskId": "s"}})
    for key in (journal, saved):
        raw = spool.record_path(key).read_text()
        assert "s3cret" not in raw
        assert json.loads(raw)[SPOOL_FIELD]["server"] == "https://ac.example.com"
    own = json.loads(spool.record_path(saved).read_text())[SPOOL_FIELD]
    assert own["bodySha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    # pending() gives the records back as they were saved, without the spool's field
    assert sorted(r["fields"]["taskId"] for _, r in spool.pending()) == ["j", "s"]
    assert all(SPOOL_FIELD not in r for _, r in spool.pending())


def test_survey_counts_by_origin_and_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    mine, other = Origin.of("https://a.example", "ka"), Origin.of("https://b.example", "kb")
    for origin, count in ((mine, 2), (other, 3)):
        spool = ResultSpool(folder)
        spool.set_origin(origin)
        for _ in range(count):
            spool.save(new_result_key(), {"fields": {"taskId": "t"}}, has_body=False)
    ResultSpool(folder).save(new_result_key(), {"fields": {}}, has_body=False)  # no origin
    (folder / f"{new_result_key()}.json.corrupt").write_text('{"fields":{"taskId":"x"')
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    found = survey_spool(folder, mine)
    assert (found.mine, found.unmarked, found.damaged) == (2, 1, 1)
    assert found.aside == {str(other): 3}
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    assert survey_spool(tmp_path / "absent", mine).mine == 0


# ------------------------------------------------------------------ what a result holds


@pytest.mark.parametrize(
    ("size", "damage"),
    [
        (100_000, "truncated"),  # inline put-result: the length tells
        (100_000, "one byte changed"),  # same length: the sha256 tells
        (700_000, "one byte changed"),  # upload-result from the executor's gzip copy
    ],
)
def test_a_body_changed_in_the_spool_is_quarantined_and_answered_as_an_error(
    tmp_path: Path, size: int, damage: str
) -> None:
    spool = tmp_path / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        leave_results_in_spool(ac, spool, "k", bytes_tasks(target, "t", 1, size))
        (body,) = spool.glob("*.body")
        data = body.read_bytes()
        assert len(data) == size
        if damage == "truncated":
            os.truncate(body, size // 2)
        else:
            body.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
        pipeline = make_pipeline(make_config(ac.url, spool))
        with running(pipeline):
            assert ac.wait_for_results(1, WAIT)
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
        (got,) = ac.results["t-0"]  # answered once, as an error, never as the result
        assert got.via == "error" and "damaged" in got.fields["output"]
        (folder,) = (spool / QUARANTINE_DIR).iterdir()
        assert folder.name == body.name[: -len(".body")]
        assert (folder / "body").stat().st_size == (size // 2 if damage == "truncated" else size)
        reason = (folder / "reason.txt").read_text()
        assert (f"holds {size // 2} bytes" if damage == "truncated" else "sha256") in reason


# ------------------------------------------------------------------ damaged records


def test_a_damaged_record_is_answered_when_its_task_id_can_be_read(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    keys = {name: new_result_key() for name in ("cut", "fields", "nothing", "other")}
    other = Origin.of("https://other.example", "their-key")
    texts = {
        "cut": '{"fields":{"taskId":"cut-1","method":"GET","url":"http://t',
        "fields": json.dumps({"fields": {"taskId": "fields-1"}, "key": keys["fields"]}),
        "nothing": "{garbage",
        "other": '{"fields":{"taskId":"other-1"},"spool":'
        + json.dumps(
            {"server": other.server, "keyDigest": other.key_digest}, separators=(",", ":")
        )[:-1],
    }
    for name, text in texts.items():
        (spool / f"{keys[name]}.json").write_text(text)
    with FakeACServer() as ac:
        pipeline = make_pipeline(make_config(ac.url, spool))
        with running(pipeline):
            assert ac.wait_for_results(2, WAIT)
            assert wait_until(lambda: pipeline.ledger.outstanding() == 0, WAIT)
            assert wait_until(lambda: spool_records(spool) == [], WAIT)
        assert set(ac.results) == {"cut-1", "fields-1"}
        for task_id in ("cut-1", "fields-1"):
            (got,) = ac.results[task_id]
            assert got.via == "error" and "damaged" in got.fields["output"]
    quarantined = {p.name for p in (spool / QUARANTINE_DIR).iterdir()}
    assert quarantined == {keys["cut"], keys["fields"], keys["nothing"]}
    assert (spool / QUARANTINE_DIR / keys["cut"] / "record.json.corrupt").read_text() == texts[
        "cut"
    ]
    # another agent's damaged record stays in place, for that agent
    assert (spool / f"{keys['other']}.json.corrupt").read_text() == texts["other"]


# ------------------------------------------------------------------ the pure rules


@pytest.mark.parametrize(
    ("found", "marked", "ours", "verdict"),
    [
        (Origin("https://a", "sha256:1"), True, Origin("https://a", "sha256:1"), MINE),
        (Origin("https://a", "sha256:2"), True, Origin("https://a", "sha256:1"), OTHER),
        (Origin("https://b", "sha256:1"), True, Origin("https://a", "sha256:1"), OTHER),
        (None, True, Origin("https://a", "sha256:1"), OTHER),  # an origin that cannot be read
        (None, False, Origin("https://a", "sha256:1"), UNMARKED),
        (Origin("https://b", "sha256:1"), True, None, MINE),  # a spool used without origins
    ],
)
def test_origin_verdict(
    found: Optional[Origin], marked: bool, ours: Optional[Origin], verdict: str
) -> None:
    assert origin_verdict(found, marked, ours) == verdict


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("https://AC.Example.com/", "https://ac.example.com"),
        ("https://ac.example.com", "https://ac.example.com"),
        ("https://user:pw@ac.example.com:8443/base/?q=1#f", "https://ac.example.com:8443/base"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("https://ac.example.com:443/base/", "https://ac.example.com/base"),
        ("http://ac.example.com:80", "http://ac.example.com"),
        ("http://ac.example.com:443", "http://ac.example.com:443"),
        ("https://[::1]:443", "https://[::1]"),
    ],
)
def test_origin_server_is_normalised(url: str, server: str) -> None:
    assert Origin.of(url, "k").server == server


def test_origin_key_digest_tells_keys_apart_and_hides_them() -> None:
    one, two = Origin.of("https://a", "key-one"), Origin.of("https://a", "key-two")
    assert one.key_digest != two.key_digest
    assert one == Origin.of("https://a/", "key-one")
    assert one.key_digest.startswith("sha256:") and len(one.key_digest) == len("sha256:") + 16
    # salted: not the plain sha256 of the key
    assert one.key_digest[7:] not in hashlib.sha256(b"key-one").hexdigest()
    assert "key-one" not in str(one)


@pytest.mark.parametrize(
    ("text", "task_id"),
    [
        ('{"fields":{"taskId":"t-1","url":"http://x', "t-1"),
        ('{"fields": {"taskId" : 42}, "statusCode"', "42"),
        ('{"fields":{"taskId":"a \\"quoted\\" id"', 'a "quoted" id'),
        ('{"fields":{"taskId":"', None),
        ('{"fields":{"taskId":""}}', None),
        ("{garbage", None),
        ("", None),
    ],
)
def test_task_id_in_text(text: str, task_id: Optional[str]) -> None:
    assert task_id_in_text(text) == task_id


@pytest.mark.parametrize(
    ("record", "task_id"),
    [
        ({"fields": {"taskId": "t-1"}}, "t-1"),
        ({"fields": {"taskId": 42}}, "42"),
        ({"fields": {"taskId": "  "}}, None),
        ({"fields": {"taskId": True}}, None),
        ({"fields": {"taskId": ["t"]}}, None),
        ({"fields": "not an object"}, None),
        ({"statusCode": 200}, None),
    ],
)
def test_task_id_in_record(record: Dict[str, object], task_id: Optional[str]) -> None:
    assert task_id_in_record(record) == task_id


@pytest.mark.parametrize(
    ("size", "sha", "got_size", "got_sha", "problem"),
    [
        (100, "aa", 100, "aa", None),
        (100, None, 100, None, None),  # no checksum recorded: the length alone
        (100, "aa", 50, "aa", "holds 50 bytes, its record says 100"),
        (100, "aa", 100, "bb", "sha256"),
        (100, None, 100, "bb", None),
    ],
)
def test_body_mismatch(
    size: int, sha: Optional[str], got_size: int, got_sha: Optional[str], problem: Optional[str]
) -> None:
    found = body_mismatch(size, sha, got_size, got_sha)
    assert found == problem if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("free", "largest", "max_body", "fit"),
    [
        (3_000_000, 700_000, 0, 1),  # a body is assumed 1 MiB until a larger one came
        (4 * MIB, 0, 0, 2),
        (4 * MIB, 2 * MIB, 0, 1),  # the largest body seen, and its gzip copy
        (4 * MIB, 2 * MIB, MIB // 2, 4),  # never more than --maxResponseBytes
        (4 * MIB, 0, 100, 4 * MIB // 200),
        (0, 0, 0, 0),
    ],
)
def test_tasks_that_fit(free: int, largest: int, max_body: int, fit: int) -> None:
    assert tasks_that_fit(free, largest, max_body) == fit


def test_the_largest_body_is_that_of_the_latest_bodies(tmp_path: Path) -> None:
    """One huge body shapes the headroom rule for the next bodies only."""
    spool = ResultSpool(tmp_path / "spool")

    def write(size: int) -> None:
        key = new_result_key()
        with spool.open_body(key) as body:
            body.write(b"b" * size)
        spool.discard_body(key)

    write(50_000)
    assert spool.largest_body == 50_000
    for _ in range(RECENT_BODIES - 1):
        write(10)
    assert spool.largest_body == 50_000
    write(10)
    assert spool.largest_body == 10
