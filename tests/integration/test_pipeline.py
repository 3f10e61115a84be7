"""End-to-end tests of the Pipeline over real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
from helpers import bytes_task, make_config, spool_names, wait_until

import acagent
from acagent import Pipeline
from acagent.config import INLINE_BODY_LIMIT, RECORD_BODY_LIMIT
from acagent.testing import FakeACServer, FakeTarget, expected_body, expected_sha256


def assert_exact_results(ac: FakeACServer, expected: Dict[str, tuple[int, int]]) -> Dict[str, int]:
    """Every task has exactly one result whose bytes equal the target's body."""
    by_via: Dict[str, int] = {}
    results = ac.results
    for task_id, (size, seed) in expected.items():
        got = results.get(task_id, [])
        assert len(got) == 1, f"{task_id}: {len(got)} results"
        r = got[0]
        by_via[r.via] = by_via.get(r.via, 0) + 1
        assert r.body_len == size, (task_id, r.via, r.body_len, size)
        if size:
            assert r.body_sha256 == expected_sha256(size, seed), task_id
        assert r.fields["statusCode"] == 200
    return by_via


SIZES = [1_024, 4_096, 60_000, INLINE_BODY_LIMIT, INLINE_BODY_LIMIT + 1, 1_200_000, 5_000_000]
WEIGHTS = [40, 25, 15, 5, 5, 7, 3]


@pytest.mark.parametrize("upload_to_ac", [True, False], ids=["upload-result", "s3"])
def test_500_mixed_tasks_exactly_once_within_two_permits(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path, upload_to_ac: bool
) -> None:
    rng = random.Random(42)
    expected: Dict[str, tuple[int, int]] = {}
    for i in range(500):
        size = rng.choices(SIZES, WEIGHTS)[0]
        expected[f"task-{i}"] = (size, i)
        ac.add_task(bytes_task(target, f"task-{i}", size, i, customField={"n": i}))
    config = make_config(
        ac.url, tmp_path / "spool", executor_pool_size=20, upload_to_ac=upload_to_ac
    )
    with Pipeline(config):
        assert ac.wait_for_results(500, timeout=120)
    by_via = assert_exact_results(ac, expected)
    large = sum(1 for size, _ in expected.values() if size > INLINE_BODY_LIMIT)
    assert by_via.get("upload" if upload_to_ac else "s3", 0) == large > 0
    assert by_via.get("inline", 0) == 500 - large
    assert ac.max_inflight <= 2
    assert ac.count_429 == 0
    # unknown fields are echoed back unchanged
    assert ac.results["task-7"][0].fields["customField"] == {"n": 7}
    # keep-alive: no new connection per task
    assert ac.connections_opened <= 2


def test_backpressure_caps_fetching_while_uploads_stall(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    slots, threshold = 4, 3
    for i in range(40):
        ac.add_task(bytes_task(target, f"t{i}", 100, i))
    release = ac.stall("put-result")
    config = make_config(
        ac.url, tmp_path / "spool", executor_pool_size=slots, response_queue_threshold=threshold
    )
    cap = slots + threshold
    with Pipeline(config) as agent:
        try:
            # Fetching stops on its own once results pile up...
            assert wait_until(lambda: agent.ledger.outstanding() >= threshold, timeout=20)
            assert wait_until(lambda: agent.ledger.executing == 0, timeout=20)
            handed = ac.tasks_handed_out
            # ...and stays stopped: no further get-task succeeds in a 1 s window.
            assert not ac.wait_for(lambda: ac.tasks_handed_out > handed, timeout=1.0)
            assert threshold <= ac.tasks_handed_out <= cap
            assert ac.pending_tasks() == 40 - ac.tasks_handed_out
        finally:
            release.set()
        # Fetching resumes when uploads flow again.
        assert ac.wait_for_results(40, timeout=60)
    assert ac.tasks_handed_out == 40
    assert ac.max_inflight <= 2


def test_prefetch_adds_to_the_cap(ac: FakeACServer, target: FakeTarget, tmp_path: Path) -> None:
    for i in range(30):
        ac.add_task(bytes_task(target, f"t{i}", 10, i))
    release = ac.stall("put-result")
    config = make_config(
        ac.url, tmp_path / "spool", executor_pool_size=2, prefetch=2, response_queue_threshold=2
    )
    with Pipeline(config) as agent:
        try:
            assert wait_until(
                lambda: agent.ledger.executing == 0 and ac.tasks_handed_out >= 2, timeout=20
            )
            handed = ac.tasks_handed_out
            assert not ac.wait_for(lambda: ac.tasks_handed_out > handed, timeout=1.0)
            assert ac.tasks_handed_out <= 2 + 2 + 2
        finally:
            release.set()
        assert ac.wait_for_results(30, timeout=60)


def test_slow_upload_does_not_block_fetching_or_executing(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    ac.add_task(bytes_task(target, "big", 2_000_000, 1))
    release = ac.stall("upload-result")
    config = make_config(ac.url, tmp_path / "spool", executor_pool_size=4)
    with Pipeline(config) as agent:
        try:
            # the uploader holds the big result and its request hangs at the server
            assert wait_until(
                lambda: (
                    ac.tasks_handed_out == 1 and len(agent.ledger.results) == 0 and ac.inflight >= 1
                ),
                timeout=20,
            )
            before = len(target.requests)
            for i in range(10):
                ac.add_task(bytes_task(target, f"small-{i}", 100, i))
            # While the big upload hangs, the small tasks are fetched and executed.
            assert ac.wait_for(lambda: ac.tasks_handed_out == 11, timeout=20)
            assert target.wait_for(lambda: len(target.requests) >= before + 10, timeout=20)
        finally:
            release.set()
        assert ac.wait_for_results(11, timeout=60)
    assert ac.results["big"][0].via == "upload"


def test_expired_task_is_answered_without_running(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    ac.add_task(bytes_task(target, "old", 10, 1, expiryTsMs=1_000))
    with Pipeline(make_config(ac.url, tmp_path / "spool")):
        assert ac.wait_for_results(1, timeout=20)
    result = ac.results["old"][0]
    assert result.via == "error"
    assert result.fields["statusCode"] == 500
    assert result.fields["output"].startswith("Agent Side Error: ")
    assert "responseBase64" not in result.fields
    assert len(target.requests) == 0


def test_request_shape_body_method_headers_and_checkmarx(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    ac.add_task(
        {
            "taskId": "post",
            "method": "post",
            "url": f"{target.url}/echo?a=1",
            "requestHeaders": {"X-Custom": "yes", "Content-Type": "application/json"},
            "input": '{"q": "é"}',
        }
    )
    ac.add_task(
        {
            "taskId": "cx",
            "method": "POST",
            "url": f"{target.url}/echo?next=/cxrestapi/auth/identity/connect/token",
            "requestHeaders": {"Content-Type": "application/json"},
            "input": "grant_type=password",
        }
    )
    with Pipeline(make_config(ac.url, tmp_path / "spool")):
        assert ac.wait_for_results(2, timeout=20)
    import json

    post = json.loads(ac.results["post"][0].body or b"{}")
    assert post["method"] == "POST"
    assert post["headers"].get("X-Custom") == "yes"
    assert post["body"] == '{"q": "é"}'
    assert "Authorization" not in post["headers"]  # the AC key never goes to a target
    cx = json.loads(ac.results["cx"][0].body or b"{}")
    assert cx["headers"]["Content-Type"] == "application/x-www-form-urlencoded"


def test_content_encodings_are_decoded(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    for i, enc in enumerate(("gzip", "deflate", "identity")):
        ac.add_task(
            {
                "taskId": enc,
                "method": "GET",
                "url": f"{target.url}/bytes/70000?seed={i}&encoding={enc}",
            }
        )
    ac.add_task(
        {"taskId": "chunked", "method": "GET", "url": f"{target.url}/bytes/90000?seed=9&chunked=1"}
    )
    with Pipeline(make_config(ac.url, tmp_path / "spool")):
        assert ac.wait_for_results(4, timeout=20)
    for i, enc in enumerate(("gzip", "deflate", "identity")):
        assert ac.results[enc][0].body == expected_body(70000, i)
    assert ac.results["chunked"][0].body == expected_body(90000, 9)


def test_global_config_applied_at_runtime(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    config = make_config(ac.url, tmp_path / "spool", executor_pool_size=2, rate_limit_per_min=0)
    with Pipeline(config) as agent:
        ac.add_task(
            bytes_task(
                target,
                "cfg",
                600_000,
                1,
                globalConfig={"poolSize": 6, "uploadToAC": False, "rateLimitPerMin": 5000},
            )
        )
        assert ac.wait_for_results(1, timeout=20)
        assert agent.executor.size == 6
        assert agent.ledger.slots == 6 + config.prefetch  # pool plus the prefetch allowance
        assert agent.rate_limits.per_minute == 5000
        assert ac.results["cfg"][0].via == "s3"  # uploadToAC false applied before upload
        # wrong types are ignored and absent keys keep their values
        ac.add_task(
            bytes_task(target, "bad", 10, 2, globalConfig={"poolSize": "many", "debugMode": 3})
        )
        ac.add_task(bytes_task(target, "after", 10, 3, globalConfig={"verifyCert": True}))
        for i in range(20):
            ac.add_task(bytes_task(target, f"more-{i}", 1000, i))
        assert ac.wait_for_results(23, timeout=30)
        assert agent.executor.size == 6
        assert agent.rate_limits.per_minute == 5000
        assert agent.settings.upload_to_ac is False


def test_resize_while_busy_loses_nothing(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    for i in range(30):
        ac.add_task(
            {
                "taskId": f"t{i}",
                "method": "GET",
                "url": f"{target.url}/bytes/100?seed={i}&latency=0.1",
                "globalConfig": {"poolSize": 2 + (i % 3) * 3},
            }
        )
    with Pipeline(make_config(ac.url, tmp_path / "spool", executor_pool_size=3)):
        assert ac.wait_for_results(30, timeout=60)
    assert all(len(v) == 1 and v[0].via == "inline" for v in ac.results.values())


def test_fetch_logs_task_uploads_a_zip(ac: FakeACServer, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "app_log_prod.log").write_text("hello log\n")
    ac.add_task({"taskId": "fetchLogs-1", "method": "GET", "url": "https://ac/agent/fetch-logs"})
    config = make_config(ac.url, tmp_path / "spool", log_dir=str(log_dir))
    with Pipeline(config):
        assert ac.wait_for_requests("upload-logs", 1, timeout=20)
    upload = ac.results["fetchLogs-1"][0]
    assert upload.via == "logs"
    archive = zipfile.ZipFile(io.BytesIO(upload.body or b""))
    names = archive.namelist()
    assert any(n.endswith("app_log_prod.log") for n in names)
    assert archive.read(next(n for n in names if n.endswith("app_log_prod.log"))) == b"hello log\n"
    assert ac.count("put-result") == 0


def test_results_echo_all_fields_and_version(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    ac.add_task(bytes_task(target, "echo", 5, 1, extra=[1, 2], nested={"a": None}))
    with Pipeline(make_config(ac.url, tmp_path / "spool")):
        assert ac.wait_for_results(1, timeout=20)
    fields = ac.results["echo"][0].fields
    assert fields["extra"] == [1, 2] and fields["nested"] == {"a": None}
    assert fields["version"] == acagent.__version__
    assert fields["responseBase64"] is True
    assert isinstance(fields["responseHeaders"], dict)


def test_spool_is_empty_after_clean_run(
    ac: FakeACServer, target: FakeTarget, tmp_path: Path
) -> None:
    for i in range(10):
        ac.add_task(bytes_task(target, f"t{i}", 700_000 if i % 2 else 10, i))
    with Pipeline(make_config(ac.url, tmp_path / "spool")) as agent:
        assert ac.wait_for_results(10, timeout=30)
        assert agent.ledger.wait_drained(timeout=10)
    leftovers: List[str] = spool_names(tmp_path / "spool")
    assert leftovers == []


def test_gzip_upload_is_real_gzip(ac: FakeACServer, target: FakeTarget, tmp_path: Path) -> None:
    ac.add_task(bytes_task(target, "z", 600_000, 5))
    with Pipeline(make_config(ac.url, tmp_path / "spool")):
        assert ac.wait_for_results(1, timeout=20)
    r = ac.results["z"][0]
    assert r.via == "upload" and r.fields["responseZipped"] is True
    assert "output" not in r.fields
    assert r.body == expected_body(600_000, 5)  # the fake gunzipped the file part


class _SpoolAtReady(acagent.Observer):
    """What the spool holds for each result when it is queued for delivery."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.seen: Dict[str, tuple] = {}

    def on_result_ready(self, result: acagent.Result) -> None:
        body_file = (self.spool_dir / f"{result.key}.body").exists()
        record = (self.spool_dir / f"{result.key}.json").read_text()
        self.seen[result.task_id] = (result.body_base64 is not None, body_file, record)


@pytest.mark.parametrize(
    "limit, chunked",
    [(RECORD_BODY_LIMIT, False), (100_000, True)],
    ids=["default-limit", "spill-after-held-chunks"],
)
def test_small_bodies_live_in_their_record_larger_ones_in_a_body_file(
    ac: FakeACServer,
    target: FakeTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    limit: int,
    chunked: bool,
) -> None:
    """A body of at most RECORD_BODY_LIMIT bytes is kept (base64) in its spool
    record, with no body file; one byte more and it is streamed to a body file.
    With 64 KiB chunks and a 100,000-byte limit, the first chunk is held in
    memory and written to the body file when the second one crosses the limit."""
    monkeypatch.setattr(acagent.executor, "RECORD_BODY_LIMIT", limit)
    flag = "&chunked=1" if chunked else ""
    sizes = {"one": 1, "at-limit": limit, "over": limit + 1, "several-chunks": 200_000}
    for seed, (task_id, size) in enumerate(sizes.items()):
        task = bytes_task(target, task_id, size, seed)
        task["url"] += flag
        ac.add_task(task)
    spool = tmp_path / "spool"
    watch = _SpoolAtReady(spool)
    with Pipeline(make_config(ac.url, tmp_path / "spool"), observers=[watch]):
        assert ac.wait_for_results(len(sizes), timeout=30)
    for task_id, size in sizes.items():
        in_record, body_file, record = watch.seen[task_id]
        assert in_record == (size <= limit), task_id
        assert body_file == (size > limit), task_id
        assert ('"bodyBase64"' in record) == (size <= limit), task_id
    by_via = assert_exact_results(ac, {t: (n, seed) for seed, (t, n) in enumerate(sizes.items())})
    assert by_via == {"inline": 4}
    assert spool_names(spool) == []
