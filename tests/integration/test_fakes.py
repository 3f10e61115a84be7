"""Tests of the fakes in acagent.testing, driven with requests against the real servers."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import ssl
import threading
import time
import tracemalloc
import types
import zipfile
import zlib
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests

from acagent.testing import (
    REDIS_SERVER_MISSING,
    FakeACServer,
    FakeTarget,
    LocalRedis,
    body_chunks,
    closed_port_url,
    expected_body,
    expected_sha256,
    find_redis_server,
    localredis,
)

API = "/api/http-teleport/"
GT = API + "get-task?agentId=1700000000_abcdef&agentVersion=2.0.0"
WAIT = 5.0


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("Fake") and t.is_alive()]
    assert leaked == []


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name="test-client", daemon=True)
    thread.start()
    return thread, out


def _multipart(parts: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    """(name, filename, content type, data) parts -> (body, content-type header)."""
    boundary = "testboundary7f3a"
    out = io.BytesIO()
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"'
        if filename:
            disp += f'; filename="{filename}"'
        out.write(f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode())
        out.write(f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------
# body_chunks
# --------------------------------------------------------------------------


def test_body_chunks_deterministic_prefix_and_rechunking() -> None:
    assert isinstance(body_chunks(10, 1), types.GeneratorType)
    whole = expected_body(300_001, 9)
    assert len(whole) == 300_001
    assert whole == expected_body(300_001, 9)
    assert expected_body(100_000, 9) == whole[:100_000]
    assert b"".join(body_chunks(300_001, 9, chunk=1000)) == whole
    assert max(len(c) for c in body_chunks(300_001, 9, chunk=1000)) == 1000
    assert expected_body(1000, 10) != whole[:1000]
    # blocks differ from each other, so offsets matter
    assert whole[:65536] != whole[65536:131072]
    assert expected_sha256(300_001, 9) == hashlib.sha256(whole).hexdigest()
    assert expected_body(0, 1) == b""
    with pytest.raises(ValueError):
        list(body_chunks(-1, 0))


# --------------------------------------------------------------------------
# FakeACServer: tasks
# --------------------------------------------------------------------------


def test_task_fifo_then_null_reply() -> None:
    with FakeACServer() as ac:
        ac.add_task({"taskId": "t1", "url": "http://x"})
        ac.add_tasks([{"taskId": "t2"}, {"taskId": "t3"}])
        assert ac.pending_tasks() == 3
        s = requests.Session()
        ids = [s.get(ac.url + GT, timeout=WAIT).json()["data"]["taskId"] for _ in range(3)]
        assert ids == ["t1", "t2", "t3"]
        r = s.get(ac.url + GT, timeout=WAIT)
        assert r.status_code == 200 and r.json() == {"data": None}
        # counted once the reply is written, which may be just after the client read it
        assert ac.wait_for(lambda: ac.tasks_handed_out == 3, WAIT) and ac.pending_tasks() == 0
        rec = ac.requests[0]
        assert rec.endpoint == "get-task" and rec.query["agentVersion"] == "2.0.0"
        assert s.get(ac.url + API + "get-task", timeout=WAIT).status_code == 400  # no agentId
        assert s.get(ac.url + API + "nope", timeout=WAIT).status_code == 404
        assert s.post(ac.url + GT, timeout=WAIT).status_code == 405
        assert ac.errors == []


def test_add_task_keyword_form_builds_the_task_dict() -> None:
    with FakeACServer() as ac:
        first = ac.add_task(url="http://tool/a")
        second = ac.add_task(
            url="http://tool/b",
            method="POST",
            task_id="given",
            headers={"X-A": "1"},
            input="body",
            expiry_ts_ms=1_700_000_000_000,
            globalConfig={"poolSize": 4},
            echoMe="x",
        )
        third = ac.add_task(url="http://tool/c")
        assert ac.add_task({"taskId": "dict-form", "url": "http://tool/d"}) is None
        assert second == "given"
        assert first != third and first.startswith("fake-task-") and third.startswith("fake-task-")
        s = requests.Session()
        got = [s.get(ac.url + GT, timeout=WAIT).json()["data"] for _ in range(4)]
        assert got[0] == {"taskId": first, "url": "http://tool/a", "method": "GET"}
        assert got[1] == {
            "taskId": "given",
            "url": "http://tool/b",
            "method": "POST",
            "requestHeaders": {"X-A": "1"},
            "input": "body",
            "expiryTsMs": 1_700_000_000_000,
            "globalConfig": {"poolSize": 4},
            "echoMe": "x",
        }
        assert got[2]["taskId"] == third
        assert got[3] == {"taskId": "dict-form", "url": "http://tool/d"}
        with pytest.raises(TypeError):
            ac.add_task({"taskId": "x"}, url="http://tool/e")  # type: ignore[call-overload]
        with pytest.raises(TypeError):
            ac.add_task()  # type: ignore[call-overload]
        with pytest.raises(TypeError):
            ac.add_task(url="http://tool/f", taskId="camel")
        assert ac.pending_tasks() == 0


def test_empty_reply_204() -> None:
    with FakeACServer(empty_reply="204") as ac:
        r = requests.get(ac.url + GT, timeout=WAIT)
        assert r.status_code == 204 and r.content == b""
        assert ac.count("get-task", 204) == 1
    with pytest.raises(ValueError):
        FakeACServer(empty_reply="nothing")


def test_raw_replies_are_served_in_order() -> None:
    with FakeACServer() as ac:
        ac.add_raw_reply(200, b"not json at all")
        ac.add_raw_reply(200, b'{"data": 5}', {"X-Test": "1"})
        ac.add_task({"taskId": "after"})
        s = requests.Session()
        assert s.get(ac.url + GT, timeout=WAIT).content == b"not json at all"
        r = s.get(ac.url + GT, timeout=WAIT)
        assert r.json() == {"data": 5} and r.headers["X-Test"] == "1"
        assert s.get(ac.url + GT, timeout=WAIT).json()["data"]["taskId"] == "after"
        assert ac.wait_for(lambda: ac.tasks_handed_out == 1, WAIT)


def test_hold_poll_returns_early_when_task_added() -> None:
    with FakeACServer(hold_poll=30) as ac:
        thread, out = _in_thread(lambda: requests.get(ac.url + GT, timeout=40))
        assert ac.wait_for(lambda: ac.inflight == 1, WAIT)
        t0 = time.monotonic()
        ac.add_task({"taskId": "held"})
        thread.join(WAIT)
        assert not thread.is_alive()
        assert out["value"].json()["data"]["taskId"] == "held"
        assert time.monotonic() - t0 < WAIT


def test_hold_poll_expires_empty() -> None:
    with FakeACServer(hold_poll=0.2) as ac:
        t0 = time.monotonic()
        r = requests.get(ac.url + GT, timeout=WAIT)
        assert r.json() == {"data": None}
        assert time.monotonic() - t0 >= 0.19


def test_stop_releases_held_poll_and_keepalive_connections() -> None:
    ac = FakeACServer(hold_poll=60).start()
    s = requests.Session()
    s.get(ac.url + API + "upload-url?fileName=x", timeout=WAIT)  # an idle kept-alive connection
    thread, _ = _in_thread(lambda: requests.get(ac.url + GT, timeout=70))
    assert ac.wait_for(lambda: ac.inflight == 1, WAIT)
    t0 = time.monotonic()
    ac.stop(timeout=5)
    assert time.monotonic() - t0 < 3
    thread.join(WAIT)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        _ = ac.url


# --------------------------------------------------------------------------
# FakeACServer: concurrency, connections, auth, latency
# --------------------------------------------------------------------------


def test_concurrency_limit_answers_429() -> None:
    with FakeACServer(max_concurrent=2) as ac:
        gate = ac.stall("get-task")
        ac.add_tasks([{"taskId": "a"}, {"taskId": "b"}])
        held = [_in_thread(lambda: requests.get(ac.url + GT, timeout=20)) for _ in range(2)]
        assert ac.wait_for(lambda: ac.inflight >= 2, WAIT)
        r = requests.get(ac.url + GT, timeout=WAIT)
        assert r.status_code == 429 and r.text == "Too many concurrent requests"
        gate.set()
        for thread, _ in held:
            thread.join(WAIT)
        assert sorted(out["value"].json()["data"]["taskId"] for _, out in held) == ["a", "b"]
        assert ac.count_429 == 1 and ac.rejected_concurrent == 1
        assert ac.count("get-task", 429) == 1
        assert ac.max_inflight == 3  # the rejected request was in flight too
        assert ac.wait_for(lambda: ac.inflight == 0, WAIT)
        ac.reset_counters()
        assert ac.count_429 == 0 and ac.max_inflight == 0 and ac.requests == []


def test_keepalive_session_uses_one_connection() -> None:
    with FakeACServer() as ac:
        s = requests.Session()
        for _ in range(20):
            assert s.get(ac.url + GT, timeout=WAIT).status_code == 200
        assert ac.connections_opened == 1
        requests.get(ac.url + GT, timeout=WAIT)
        assert ac.connections_opened == 2
        assert ac.count("get-task") == 21 and ac.max_inflight == 1


def test_connection_cost_only_on_new_connections_and_latency() -> None:
    with FakeACServer(connection_cost=0.3) as ac:
        s = requests.Session()
        t0 = time.monotonic()
        s.get(ac.url + GT, timeout=WAIT)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        s.get(ac.url + GT, timeout=WAIT)
        second = time.monotonic() - t0
        assert first >= 0.29 and second < 0.25
    with FakeACServer(latency=0.2) as ac:
        t0 = time.monotonic()
        requests.get(ac.url + GT, timeout=WAIT)
        assert time.monotonic() - t0 >= 0.19


def test_api_key_required() -> None:
    with FakeACServer(api_key="sekrit") as ac:
        assert requests.get(ac.url + GT, timeout=WAIT).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert requests.get(ac.url + GT, headers=bad, timeout=WAIT).status_code == 401
        good = {"Authorization": "Bearer sekrit"}
        assert requests.get(ac.url + GT, headers=good, timeout=WAIT).status_code == 200


def test_tls(tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeACServer(ssl_context=ctx) as ac, FakeTarget(ssl_context=ctx) as target:
        assert ac.url.startswith("https://") and ac.s3_url.startswith("https://")
        s = requests.Session()
        ca = str(ca_file)  # per call: REQUESTS_CA_BUNDLE in the env overrides Session.verify
        for _ in range(3):
            assert s.get(ac.url + GT, verify=ca, timeout=WAIT).status_code == 200
        assert ac.connections_opened == 1
        r = s.get(target.url + "/bytes/70000?seed=2", verify=ca, timeout=WAIT)
        assert r.content == expected_body(70000, 2)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(ac.url + GT, timeout=WAIT)  # untrusted by default


# --------------------------------------------------------------------------
# FakeACServer: results
# --------------------------------------------------------------------------


def test_put_result_inline_empty_error_and_duplicates() -> None:
    body = expected_body(5000, 3)
    with FakeACServer() as ac:
        s = requests.Session()
        inline = {
            "taskId": "i1",
            "statusCode": 200,
            "responseBase64": True,
            "output": base64.b64encode(body).decode(),
            "extra": {"kept": True},
        }
        assert s.post(ac.url + API + "put-result", json=inline, timeout=WAIT).status_code == 200
        s.post(ac.url + API + "put-result", json={"taskId": "e1", "statusCode": 204}, timeout=WAIT)
        err = {"taskId": "x1", "statusCode": 500, "output": "Agent Side Error: boom"}
        s.post(ac.url + API + "put-result", json=err, timeout=WAIT)
        s.post(ac.url + API + "put-result", json=err, timeout=WAIT)
        assert s.post(ac.url + API + "put-result", data=b"{nope", timeout=WAIT).status_code == 400
        assert s.post(ac.url + API + "put-result", json=[1], timeout=WAIT).status_code == 400
        bad64 = {"taskId": "b", "responseBase64": True, "output": "!!!"}
        assert s.post(ac.url + API + "put-result", json=bad64, timeout=WAIT).status_code == 400

        res = ac.results
        assert set(res) == {"i1", "e1", "x1"}
        r = res["i1"][0]
        assert r.via == "inline" and r.body == body and r.body_len == 5000
        assert r.body_sha256 == hashlib.sha256(body).hexdigest()
        assert r.fields["extra"] == {"kept": True}
        assert res["e1"][0].via == "empty" and res["e1"][0].body is None
        assert [x.via for x in res["x1"]] == ["error", "error"]
        assert res["x1"][0].body is None
        assert [x.task_id for x in ac.all_results()] == ["i1", "e1", "x1", "x1"]
        assert ac.wait_for_results(3, timeout=0.1)
        assert not ac.wait_for_results(4, timeout=0.05)
        ac.clear_results()
        assert ac.all_results() == []


def test_wait_for_results_wakes_on_arrival() -> None:
    with FakeACServer() as ac:
        go = threading.Event()

        def post() -> int:
            assert go.wait(WAIT)
            r = requests.post(ac.url + API + "put-result", json={"taskId": "w"}, timeout=WAIT)
            return r.status_code

        thread, out = _in_thread(post)
        go.set()
        assert ac.wait_for_results(1, timeout=WAIT)
        assert ac.wait_for_requests("put-result", 1, timeout=WAIT, completed=True)
        thread.join(WAIT)
        assert out["value"] == 200


def test_upload_result_gzip_and_raw_with_requests_multipart() -> None:
    body = expected_body(700_000, 4)
    with FakeACServer() as ac:
        s = requests.Session()
        task = {"taskId": "u1", "statusCode": 200, "responseZipped": True}
        files = {
            "file": ("u1_" + "0" * 32 + ".zip", gzip.compress(body), "application/zip"),
            "task": (None, json.dumps(task), "application/json"),
        }
        r = s.post(ac.url + API + "upload-result", files=files, timeout=WAIT)
        assert r.status_code == 200, r.text
        task2 = {"taskId": "u2", "statusCode": 200, "responseZipped": False}
        files = {
            "file": ("u2_" + "1" * 32 + ".txt", body, "text/plain"),
            "task": (None, json.dumps(task2), "application/json"),
        }
        assert s.post(ac.url + API + "upload-result", files=files, timeout=WAIT).status_code == 200
        res = ac.results
        assert res["u1"][0].via == "upload" and res["u1"][0].body == body
        assert res["u1"][0].fields == task
        assert res["u1"][0].file_name is not None and res["u1"][0].file_name.endswith(".zip")
        assert res["u1"][0].file_content_type == "application/zip"
        assert res["u2"][0].body == body and res["u2"][0].file_content_type == "text/plain"
        assert ac.count("upload-result", 200) == 2


def test_upload_result_bad_inputs_get_400() -> None:
    with FakeACServer() as ac:
        url = ac.url + API + "upload-result"
        task = json.dumps({"taskId": "z"}).encode()
        cases = [
            _multipart(
                [
                    ("file", "z.zip", "application/zip", b"not gzip"),
                    ("task", None, "application/json", task),
                ]
            ),
            _multipart([("task", None, "application/json", task)]),
            _multipart(
                [("file", "z.txt", "text/plain", b"x"), ("task", None, "application/json", b"[")]
            ),
        ]
        s = requests.Session()
        for data, ctype in cases:
            r = s.post(url, data=data, headers={"Content-Type": ctype}, timeout=WAIT)
            assert r.status_code == 400
        assert s.post(url, data=b"x", timeout=WAIT).status_code == 400  # not multipart
        assert ac.all_results() == []
        # the kept-alive connection survived the 400s
        assert ac.connections_opened == 1


def test_large_chunked_upload_keeps_digest_not_bytes() -> None:
    size = 20 * 1024 * 1024
    boundary = "bndry42"
    task = json.dumps({"taskId": "big", "responseZipped": True}).encode()

    def stream() -> Iterator[bytes]:
        yield (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="task"\r\n'
                f"Content-Type: application/json\r\n\r\n"
            ).encode()
            + task
            + b"\r\n"
        )
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big_{"a" * 32}.zip"\r\nContent-Type: application/zip\r\n\r\n'
        ).encode()
        comp = zlib.compressobj(1, zlib.DEFLATED, 31)
        for piece in body_chunks(size, 11):
            yield comp.compress(piece)
        yield comp.flush()
        yield f"\r\n--{boundary}--\r\n".encode()

    with FakeACServer(keep_bodies_up_to=1024 * 1024) as ac:
        tracemalloc.start()
        try:
            r = requests.post(
                ac.url + API + "upload-result",
                data=stream(),  # a generator: requests sends it chunked
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                timeout=30,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        res = ac.results["big"][0]
        assert res.body is None and res.body_len == size
        assert res.body_sha256 == expected_sha256(size, 11)
        assert ac.requests[-1].body_len > size // 2
        assert peak < 8 * 1024 * 1024


def test_s3_flow() -> None:
    body = expected_body(600_000, 5)
    with FakeACServer(api_key="k") as ac:
        s = requests.Session()
        s.headers["Authorization"] = "Bearer k"
        name = "s1" + "f" * 32
        r = s.get(ac.url + API + "upload-url", params={"fileName": name}, timeout=WAIT)
        urls = r.json()["data"]
        assert urls["putUrl"].startswith(ac.s3_url)
        put = requests.put(urls["putUrl"], data=body, timeout=WAIT)  # no auth on S3
        assert put.status_code == 200
        assert requests.get(urls["getUrl"], timeout=WAIT).content == body
        result = {"taskId": "s1", "statusCode": 200, "s3Url": urls["getUrl"]}
        assert s.post(ac.url + API + "put-result", json=result, timeout=WAIT).status_code == 200
        got = ac.results["s1"][0]
        assert got.via == "s3" and got.body == body and got.body_len == len(body)
        stored = ac.s3_object(name)
        assert stored is not None and stored[2] == len(body)
        # S3 traffic is recorded but neither in flight nor a connection of the AC server
        assert ac.count("s3") == 2 and ac.connections_opened == 1
        assert "Authorization" not in ac.requests[1].headers
        assert s.get(ac.url + API + "upload-url", timeout=WAIT).status_code == 400


def test_upload_logs() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app_log_prod.log", "hello log\n")
    data = buf.getvalue()
    with FakeACServer() as ac:
        files = {
            "file": ("logs.zip", data, "application/zip"),
            "task": (None, json.dumps({"taskId": "fetchLogs-1"}), "application/json"),
        }
        r = requests.post(
            ac.url + API + "upload-logs", params={"envName": "qa"}, files=files, timeout=WAIT
        )
        assert r.status_code == 200
        got = ac.results["fetchLogs-1"][0]
        assert got.via == "logs" and got.body == data
        assert ac.requests[-1].query == {"envName": "qa"}


# --------------------------------------------------------------------------
# FakeACServer: faults
# --------------------------------------------------------------------------


def test_inject_status_times_and_headers() -> None:
    with FakeACServer() as ac:
        s = requests.Session()
        ac.inject("put-result", status=503, times=2)
        codes = [
            s.post(ac.url + API + "put-result", json={"taskId": "f"}, timeout=WAIT).status_code
            for _ in range(3)
        ]
        assert codes == [503, 503, 200] and len(ac.results["f"]) == 1

        ac.inject("get-task", status=429, headers={"X-Rate-Limit-Retry-After-Seconds": "2"})
        ac.inject("get-task", status=429, headers={"Retry-After": "1"})
        ac.inject("get-task", status=429, body=b"Too many concurrent requests")
        r1, r2, r3 = (s.get(ac.url + GT, timeout=WAIT) for _ in range(3))
        assert r1.status_code == 429 and r1.headers["X-Rate-Limit-Retry-After-Seconds"] == "2"
        assert r2.headers["Retry-After"] == "1"
        assert r3.text == "Too many concurrent requests"
        assert ac.count_429 == 3 and ac.rejected_concurrent == 0

        ac.inject("*", status=500)
        assert s.get(ac.url + API + "upload-url?fileName=a", timeout=WAIT).status_code == 500
        assert s.get(ac.url + API + "upload-url?fileName=a", timeout=WAIT).status_code == 200

        ac.inject("s3", status=503)
        assert requests.put(ac.s3_url + "/s3/obj", data=b"x", timeout=WAIT).status_code == 503
        assert requests.put(ac.s3_url + "/s3/obj", data=b"x", timeout=WAIT).status_code == 200
        assert ac.connections_opened == 1


def test_inject_reset_and_lost_reply() -> None:
    with FakeACServer() as ac:
        ac.add_task({"taskId": "r1"})
        ac.inject("get-task", reset=True)
        with pytest.raises(requests.ConnectionError):
            requests.get(ac.url + GT, timeout=WAIT)
        assert ac.pending_tasks() == 1  # not handed out
        assert ac.count("get-task", status=0) == 1
        assert requests.get(ac.url + GT, timeout=WAIT).json()["data"]["taskId"] == "r1"

        ac.inject("put-result", reset=True, process=True)  # processed, then the reply is lost
        with pytest.raises(requests.ConnectionError):
            requests.post(ac.url + API + "put-result", json={"taskId": "r1"}, timeout=WAIT)
        assert len(ac.results["r1"]) == 1
        assert ac.wait_for(lambda: ac.inflight == 0, WAIT) and ac.errors == []


def test_get_task_reply_that_cannot_be_written_is_requeued() -> None:
    with FakeACServer() as ac:
        ac.add_task({"taskId": "q1"})
        gate = ac.stall("get-task")
        thread, out = _in_thread(lambda: requests.get(ac.url + GT, timeout=WAIT))
        assert ac.wait_for_requests("get-task", 1, WAIT)
        ac.set_down(True)  # closes the connection under the stalled request
        gate.set()
        thread.join(WAIT)
        assert isinstance(out.get("error"), requests.ConnectionError)
        assert ac.wait_for(lambda: ac.inflight == 0, WAIT)
        assert ac.tasks_handed_out == 0 and ac.pending_tasks() == 1
        ac.set_down(False)
        ac.unstall("get-task")
        assert requests.get(ac.url + GT, timeout=WAIT).json()["data"]["taskId"] == "q1"
        assert ac.wait_for(lambda: ac.tasks_handed_out == 1, WAIT)

        ac.add_task({"taskId": "q2"})
        ac.inject("get-task", reset=True, process=True)  # popped, then lost on purpose
        with pytest.raises(requests.ConnectionError):
            requests.get(ac.url + GT, timeout=WAIT)
        assert ac.pending_tasks() == 0 and ac.tasks_handed_out == 2


def test_inject_delay_counts_in_flight() -> None:
    with FakeACServer() as ac:
        ac.add_task({"taskId": "slow"})
        ac.inject("get-task", delay=0.3)
        t0 = time.monotonic()
        thread, out = _in_thread(lambda: requests.get(ac.url + GT, timeout=WAIT))
        assert ac.wait_for(lambda: ac.inflight == 1, WAIT)
        thread.join(WAIT)
        assert time.monotonic() - t0 >= 0.29
        assert out["value"].json()["data"]["taskId"] == "slow"


def test_stall_and_unstall() -> None:
    with FakeACServer(max_concurrent=5) as ac:
        ac.stall("put-result")
        thread, out = _in_thread(
            lambda: requests.post(ac.url + API + "put-result", json={"taskId": "p"}, timeout=20)
        )
        assert ac.wait_for(lambda: ac.inflight == 1, WAIT)
        assert ac.wait_for_requests("put-result", 1, WAIT)  # arrived, still stalled
        assert not ac.wait_for_requests("put-result", 1, 0.05, completed=True)
        assert ac.arrivals("put-result") == 1 and ac.count("put-result") == 0
        assert requests.get(ac.url + GT, timeout=WAIT).status_code == 200  # other endpoints flow
        assert ac.all_results() == []
        ac.unstall("put-result")
        thread.join(WAIT)
        assert out["value"].status_code == 200 and ac.wait_for_results(1, WAIT)


def _statuses(ac: FakeACServer, n: int) -> list[int]:
    out = []
    for _ in range(n):
        try:
            out.append(requests.get(ac.url + GT, timeout=WAIT).status_code)
        except requests.ConnectionError:
            out.append(0)
    return out


def test_fault_rate_is_seeded_and_covers_kinds() -> None:
    kinds = ("503", "429s", "429d", "reset", "slow")
    with FakeACServer() as a, FakeACServer() as b:
        a.fault_rate(0.6, seed=42, kinds=kinds, slow_delay=0.01, retry_after=3)
        b.fault_rate(0.6, seed=42, kinds=kinds, slow_delay=0.01, retry_after=3)
        sa, sb = _statuses(a, 40), _statuses(b, 40)
        assert sa == sb
        assert {0, 200, 429, 503} <= set(sa)
        assert all(r.status in (0, 200, 429, 503) for r in a.requests)
        assert a.count_429 == sa.count(429)
        a.fault_rate(1.0, seed=1, kinds=("429d",), retry_after=3)
        r = requests.get(a.url + GT, timeout=WAIT)
        when = parsedate_to_datetime(r.headers["Retry-After"]).timestamp()
        assert r.status_code == 429 and 1 <= when - time.time() <= 4
        a.fault_rate(1.0, seed=1, kinds=("429s",), retry_after=3)
        r = requests.get(a.url + GT, timeout=WAIT)
        assert r.headers["X-Rate-Limit-Retry-After-Seconds"] == "3"
        a.fault_rate(1.0, seed=1, kinds=("503",), endpoints=("put-result",))
        assert requests.get(a.url + GT, timeout=WAIT).status_code == 200
        a.clear_faults()
        assert _statuses(a, 3) == [200, 200, 200]
        with pytest.raises(ValueError):
            a.fault_rate(0.5, seed=1, kinds=("bogus",))


def test_set_down_refuses_then_recovers() -> None:
    with FakeACServer() as ac:
        s = requests.Session()
        assert s.get(ac.url + GT, timeout=WAIT).status_code == 200
        url = ac.url
        ac.set_down(True)
        with pytest.raises(requests.ConnectionError):
            requests.get(url + GT, timeout=WAIT)  # refused
        with pytest.raises(requests.ConnectionError):
            s.get(url + GT, timeout=WAIT)  # the kept-alive connection was reset
        ac.set_down(False)
        assert ac.url == url
        assert s.get(url + GT, timeout=WAIT).status_code == 200


# --------------------------------------------------------------------------
# FakeTarget
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 300_000])
def test_target_bytes_identity(size: int) -> None:
    with FakeTarget() as t:
        r = requests.get(f"{t.url}/bytes/{size}?seed=3", timeout=WAIT)
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(size)
        assert r.content == expected_body(size, 3)


def test_target_encodings_chunked_status_head() -> None:
    with FakeTarget() as t:
        s = requests.Session()
        want = expected_body(200_000, 8)
        for enc in ("gzip", "deflate"):
            for chunked in ("0", "1"):
                r = s.get(
                    f"{t.url}/bytes/200000?seed=8&encoding={enc}&chunked={chunked}", timeout=WAIT
                )
                assert r.headers["Content-Encoding"] == enc
                assert ("Content-Length" in r.headers) == (chunked == "0")
                assert r.content == want
        r = s.get(f"{t.url}/bytes/100000?seed=8&chunked=1", timeout=WAIT)
        assert r.headers["Transfer-Encoding"] == "chunked" and r.content == want[:100000]
        r = s.post(f"{t.url}/bytes/10?seed=8&status=503&ctype=text/plain", data=b"in", timeout=WAIT)
        assert r.status_code == 503 and r.headers["Content-Type"] == "text/plain"
        assert r.content == want[:10]
        r = s.head(f"{t.url}/bytes/1234", timeout=WAIT)
        assert r.headers["Content-Length"] == "1234" and r.content == b""
        assert s.get(f"{t.url}/bytes/5?encoding=br", timeout=WAIT).status_code == 400
        assert t.connections_opened == 1
        assert [r.body_len for r in t.requests if r.method == "POST"] == [2]


def test_target_echo_redirect_and_slow_headers() -> None:
    with FakeTarget() as t:
        body = b"caf\xc3\xa9 \xff"
        r = requests.put(
            f"{t.url}/echo?a=1&b=x", data=body, headers={"X-Custom": "v"}, timeout=WAIT
        )
        info = r.json()
        assert info["method"] == "PUT" and info["path"] == "/echo"
        assert info["query"] == {"a": "1", "b": "x"}
        assert info["headers"]["X-Custom"] == "v"
        assert base64.b64decode(info["body_base64"]) == body
        assert info["body"].encode("utf-8", "surrogateescape") == body
        r = requests.get(f"{t.url}/redirect", params={"to": f"{t.url}/echo"}, timeout=WAIT)
        assert r.status_code == 200 and r.history[0].status_code == 302
        r = requests.get(
            f"{t.url}/redirect",
            params={"to": "/x", "code": "301"},
            allow_redirects=False,
            timeout=WAIT,
        )
        assert r.status_code == 301 and r.headers["Location"] == "/x"
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.get(f"{t.url}/slow-headers?latency=2", timeout=(WAIT, 0.2))
        r = requests.get(f"{t.url}/slow-headers?latency=0.05&jitter=0.05", timeout=WAIT)
        assert r.text == "ok"
        assert requests.get(f"{t.url}/nothing", timeout=WAIT).status_code == 404


def test_target_faults_raise() -> None:
    with FakeTarget() as t:
        with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            requests.get(f"{t.url}/reset/2000000", timeout=WAIT)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(f"{t.url}/wrong-length/100000", timeout=WAIT)
        with pytest.raises(requests.exceptions.ContentDecodingError):
            requests.get(f"{t.url}/bad-encoding/1000", timeout=WAIT)
        with requests.get(f"{t.url}/forever", stream=True, timeout=WAIT) as r:
            got = 0
            for piece in r.iter_content(65536):
                got += len(piece)
                if got >= 2_000_000:
                    break
        assert t.wait_for(lambda: t.count("forever") == 1, WAIT)
        with pytest.raises(requests.ConnectionError):
            requests.get(closed_port_url(), timeout=WAIT)
        assert t.errors == []


def test_target_large_body_streams_with_flat_memory() -> None:
    size = 50 * 1024 * 1024
    with FakeTarget() as t:
        tracemalloc.start()
        try:
            digest = hashlib.sha256()
            n = 0
            with requests.get(f"{t.url}/bytes/{size}?seed=21", stream=True, timeout=30) as r:
                for piece in r.iter_content(65536):
                    digest.update(piece)
                    n += len(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n == size
        assert digest.hexdigest() == expected_sha256(size, 21)
        assert peak < 8 * 1024 * 1024
        assert t.wait_for(lambda: t.inflight == 0, WAIT) and t.max_inflight == 1


def test_stop_ends_forever_stream_quickly() -> None:
    t = FakeTarget().start()
    r = requests.get(f"{t.url}/forever", stream=True, timeout=WAIT)
    chunks = r.iter_content(65536)  # keep the generator: dropping it closes the stream
    assert len(next(chunks)) > 0
    assert t.inflight == 1
    t0 = time.monotonic()
    t.stop(timeout=5)
    assert time.monotonic() - t0 < 3
    r.close()


def test_find_redis_server_takes_path_first_then_the_bundled_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    on_path = folder / "redis-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))
    assert find_redis_server() == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_redis_server() == localredis.bundled_redis_server()
    monkeypatch.setattr(localredis, "bundled_redis_server", lambda: None)
    assert find_redis_server() is None
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        LocalRedis()
    assert "pip install 'acagent[test]'" in REDIS_SERVER_MISSING
