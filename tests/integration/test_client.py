"""ACClient against a real fake AC server on 127.0.0.1.

Covers the concurrency invariant (never more than ``ac_max_concurrent``
requests open at the server), connection reuse, the wire details of every
endpoint (query, auth, content types) and how bad replies are reported.
Retry behaviour lives in test_retry.py.
"""

from __future__ import annotations

import gzip
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import requests
from helpers import FAST_CLIENT as FAST
from helpers import make_client
from helpers import result_payload as result

from acagent import __version__
from acagent.ac.client import ACClient
from acagent.ac.multipart import MultipartBody
from acagent.config import AgentConfig
from acagent.errors import (
    ACConnectionError,
    ACHTTPError,
    AgentStopping,
    BadReplyError,
    TaskError,
)
from acagent.models import Task
from acagent.testing import FakeACServer, closed_port_url, expected_body

JOIN = 15.0  # upper bound for any thread join in this file


def task(task_id: str, **extra: Any) -> Dict[str, Any]:
    obj: Dict[str, Any] = {"taskId": task_id, "url": "http://tool.internal/x", "method": "GET"}
    obj.update(extra)
    return obj


def run_together(n: int, work: Callable[[int], None]) -> List[BaseException]:
    """Run ``work(i)`` in ``n`` threads released together by a barrier; return their errors."""
    barrier = threading.Barrier(n)
    errors: List[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=JOIN)
            work(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), name=f"w{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not [t.name for t in threads if t.is_alive()], "worker threads hung"
    return errors


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    with FakeACServer(api_key="k") as server:
        yield server
        assert server.errors == []


@pytest.fixture
def client(ac: FakeACServer) -> Iterator[ACClient]:
    with make_client(ac) as c:
        yield c


# ------------------------------------------------------------ concurrency


def test_16_threads_never_exceed_two_requests_at_the_server() -> None:
    # latency keeps each request open long enough for the threads to overlap
    with FakeACServer(api_key="k", max_concurrent=2, latency=0.05) as ac:
        with make_client(ac) as client:
            errors = run_together(16, lambda i: client.put_result(result(f"t{i}")))
        assert errors == []
        assert ac.max_inflight == 2  # both permits used, never a third
        assert ac.count_429 == 0
        assert ac.rejected_concurrent == 0
        assert sorted(ac.results) == sorted(f"t{i}" for i in range(16))
        assert ac.count("put-result") == 16  # no retries were needed
        assert client.inflight == 0


def test_16_threads_with_one_permit_are_fully_serialised() -> None:
    with FakeACServer(api_key="k", max_concurrent=1, latency=0.02) as ac:
        with make_client(ac, ac_max_concurrent=1) as client:
            errors = run_together(16, lambda i: client.put_result(result(f"t{i}")))
        assert errors == []
        assert ac.max_inflight == 1
        assert ac.count_429 == 0
        assert len(ac.results) == 16


def test_control_the_fake_server_does_reject_a_third_concurrent_request() -> None:
    """Without the client's permits the server's limit trips: the counters can fail."""
    with FakeACServer(max_concurrent=2) as ac:
        url = ac.url + "/api/http-teleport/put-result"
        release = ac.stall("put-result")
        statuses: List[int] = []
        lock = threading.Lock()

        def post(task_id: str) -> None:
            reply = requests.post(url, json=result(task_id), timeout=JOIN)
            with lock:
                statuses.append(reply.status_code)

        held = [threading.Thread(target=post, args=(f"h{i}",)) for i in range(2)]
        try:
            for thread in held:
                thread.start()
            assert ac.wait_for(lambda: ac.inflight >= 2, timeout=JOIN)
            third = requests.post(url, json=result("third"), timeout=JOIN)
        finally:
            release.set()
            for thread in held:
                thread.join(JOIN)
        assert not any(t.is_alive() for t in held)
        assert third.status_code == 429
        assert third.text == "Too many concurrent requests"
        assert sorted(statuses) == [200, 200]
        assert ac.count_429 == 1
        assert ac.rejected_concurrent == 1
        assert ac.max_inflight == 3


def test_200_sequential_calls_reuse_the_connection(ac: FakeACServer, client: ACClient) -> None:
    ac.add_tasks(task(f"t{i}") for i in range(50))
    got = 0
    for i in range(200):
        if i % 2:
            got += client.get_task() is not None
        else:
            client.put_result(result(f"r{i}"))
    assert got == 50
    assert ac.count("get-task") == 100
    assert ac.count("put-result") == 100
    assert ac.connections_opened <= 2
    assert ac.connections_opened >= 1


def test_abort_ends_a_wait_for_a_permit() -> None:
    with FakeACServer(api_key="k") as ac, make_client(ac, ac_max_concurrent=1) as client:
        release = ac.stall("put-result")
        outcome: Dict[str, BaseException] = {}

        def call(name: str) -> None:
            try:
                client.put_result(result(name))
            except BaseException as exc:
                outcome[name] = exc

        holder = threading.Thread(target=call, args=("holder",))
        waiter = threading.Thread(target=call, args=("waiter",))
        try:
            holder.start()
            assert ac.wait_for(lambda: ac.inflight == 1, timeout=JOIN)
            waiter.start()
            client.abort.set()
            stopped = time.monotonic()
            waiter.join(JOIN)
            took = time.monotonic() - stopped
        finally:
            release.set()
            holder.join(JOIN)
        assert not waiter.is_alive() and not holder.is_alive()
        assert isinstance(outcome.get("waiter"), AgentStopping)
        assert took < 2.0  # the permit wait polls the abort flag every 0.5 s
        assert "holder" not in outcome  # the call already sent was not broken
        assert list(ac.results) == ["holder"]


# ------------------------------------------------------------ wire details


def test_get_task_query_without_env_name(ac: FakeACServer, client: ACClient) -> None:
    assert client.get_task() is None
    (record,) = ac.requests
    assert record.method == "GET"
    assert record.path == "/api/http-teleport/get-task"
    assert set(record.query) == {"agentId", "agentVersion"}
    assert record.query["agentVersion"] == __version__
    assert re.fullmatch(r"\d+_[0-9a-f]{6}", record.query["agentId"])
    assert record.query["agentId"] == client.agent_id


def test_get_task_query_with_env_name(ac: FakeACServer) -> None:
    with make_client(ac, env_name="prod-eu") as client:
        client.get_task()
        client.get_task()
    first, second = ac.requests
    assert first.query["envName"] == "prod-eu"
    assert set(first.query) == {"agentId", "agentVersion", "envName"}
    assert first.query["agentId"] == second.query["agentId"]  # one id per process


def test_every_ac_call_carries_the_bearer_key_and_s3_none(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(expected_body(10_000, 1))
    logs = tmp_path / "logs.zip"
    logs.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    ac.add_task(task("t1"))
    assert client.get_task() is not None
    client.put_result(result("t1"))
    client.upload_result(str(body), "t2_x.txt", "text/plain", result("t2"))
    put_url, _ = client.get_upload_url("t3" + "0" * 32)
    client.put_s3(put_url, str(body))
    client.upload_logs(str(logs), result("fetchLogs-1"))
    ac_records = [r for r in ac.requests if r.endpoint != "s3"]
    s3_records = [r for r in ac.requests if r.endpoint == "s3"]
    assert {r.endpoint for r in ac_records} == {
        "get-task",
        "put-result",
        "upload-result",
        "upload-url",
        "upload-logs",
    }
    for record in ac_records:
        assert record.headers.get("Authorization") == "Bearer k", record.endpoint
        assert record.status == 200, record.endpoint
    assert len(s3_records) == 1
    assert "Authorization" not in s3_records[0].headers
    assert s3_records[0].method == "PUT"
    assert s3_records[0].status == 200


def test_a_wrong_key_is_a_401_http_error(ac: FakeACServer) -> None:
    config = AgentConfig(server_url=ac.url, api_key="wrong", rate_limit_per_min=0)
    with ACClient(config, retry_policy=FAST) as client:
        with pytest.raises(ACHTTPError) as info:
            client.get_task()
    assert info.value.status == 401
    assert ac.count("get-task") == 1


def test_put_result_sends_compact_json(ac: FakeACServer, client: ACClient) -> None:
    payload = result("t1", custom={"nested": [1, "two", None]}, unicode="caf\u00e9")
    client.put_result(payload)
    (record,) = ac.requests
    assert record.method == "POST"
    assert record.headers["Content-Type"] == "application/json"
    (received,) = ac.results["t1"]
    assert received.fields == payload
    assert received.via == "empty"


def test_upload_result_is_multipart_with_content_length(
    ac: FakeACServer, client: ACClient, tmp_path: Path
) -> None:
    data = expected_body(300_000, 9)
    path = tmp_path / "body.gz"
    path.write_bytes(gzip.compress(data))
    part = result("t1", responseZipped=True)
    client.upload_result(str(path), "t1_" + "a" * 32 + ".zip", "application/zip", part)
    (record,) = ac.requests
    assert record.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    # a known length, not chunked transfer coding
    assert "Transfer-Encoding" not in record.headers
    assert int(record.headers["Content-Length"]) == record.body_len
    assert record.body_len > path.stat().st_size
    (received,) = ac.results["t1"]
    assert received.via == "upload"
    assert received.body == data
    assert received.file_name == "t1_" + "a" * 32 + ".zip"
    assert received.file_content_type == "application/zip"
    assert received.fields == part


def test_upload_logs_sends_env_name(ac: FakeACServer, tmp_path: Path) -> None:
    logs = tmp_path / "agent-logs.zip"
    logs.write_bytes(b"zip bytes \x00\xff")
    with make_client(ac, env_name="lab") as client:
        client.upload_logs(str(logs), result("fetchLogs-7"))
    (record,) = ac.requests
    assert record.query == {"envName": "lab"}
    (received,) = ac.results["fetchLogs-7"]
    assert received.via == "logs"
    assert received.body == b"zip bytes \x00\xff"
    assert received.file_name == "agent-logs.zip"


def test_upload_url_and_s3_round_trip(ac: FakeACServer, client: ACClient, tmp_path: Path) -> None:
    name = "t1" + "b" * 32
    put_url, get_url = client.get_upload_url(name)
    assert put_url.startswith(ac.s3_url)
    assert get_url.startswith(ac.s3_url) and get_url != put_url
    data = expected_body(70_000, 4)
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    client.put_s3(put_url, str(path), content_type="application/octet-stream")
    stored = ac.s3_object(name)
    assert stored is not None
    assert stored[0] == data and stored[2] == len(data)
    (upload_url_record,) = [r for r in ac.requests if r.endpoint == "upload-url"]
    assert upload_url_record.query == {"fileName": name}
    (s3_record,) = [r for r in ac.requests if r.endpoint == "s3"]
    assert s3_record.headers["Content-Length"] == str(len(data))
    assert s3_record.headers["Content-Type"] == "application/octet-stream"
    # S3 traffic never counts against the AC concurrency limit
    assert ac.max_inflight == 1


def test_multipart_body_is_re_readable_per_instance(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"\x00\x01payload\xff")
    parts = [("file", "f.bin", "application/octet-stream", str(path))]
    first = MultipartBody(parts)
    whole = first.read()
    assert len(whole) == len(first)
    assert first.tell() == len(first)
    assert first.read() == b""
    first.close()
    second = MultipartBody(parts)
    assert second.tell() == 0
    pieces = []
    while True:
        piece = second.read(7)
        if not piece:
            break
        pieces.append(piece)
    second.close()
    again = b"".join(pieces)
    # same bytes apart from the random boundary
    assert again.replace(second.boundary.encode(), b"B") == whole.replace(
        first.boundary.encode(), b"B"
    )
    assert b"\x00\x01payload\xff" in again


# ------------------------------------------------------------ get-task replies


def test_get_task_returns_a_parsed_task(ac: FakeACServer, client: ACClient) -> None:
    ac.add_task(task("t1", method="post", input="hi", extraField={"k": 1}))
    got = client.get_task()
    assert isinstance(got, Task)
    assert got.task_id == "t1"
    assert got.method == "POST"
    assert got.input == "hi"
    assert got.raw["extraField"] == {"k": 1}


@pytest.mark.parametrize("empty", ["null", "204"])
def test_no_task_is_none(empty: str) -> None:
    with FakeACServer(api_key="k", empty_reply=empty) as ac, make_client(ac) as client:
        assert client.get_task() is None
        assert ac.requests[0].status == (204 if empty == "204" else 200)


@pytest.mark.parametrize(
    ("status", "body"),
    [(204, b""), (200, b'{"data": null}'), (200, b"{}"), (200, b"")],
    ids=["204", "data-null", "no-data", "empty-200"],
)
def test_raw_empty_replies_are_none(
    ac: FakeACServer, client: ACClient, status: int, body: bytes
) -> None:
    ac.add_raw_reply(status, body)
    assert client.get_task() is None


@pytest.mark.parametrize(
    "body",
    [
        b"<html>gateway</html>",
        b'{"data": ',
        b"\xff\xfe\x00garbage",
        b'["data", {"taskId": "t1"}]',
        b'"just a string"',
        b"null",
        b'{"data": []}',
        b'{"data": [{"taskId": "t1"}]}',
        b'{"data": "t1"}',
        b'{"data": 5}',
        b'{"data": true}',
        b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=[
        "html",
        "truncated",
        "binary",
        "top-array",
        "top-string",
        "top-null",
        "data-empty-list",
        "data-list",
        "data-string",
        "data-number",
        "data-bool",
        "too-deep",
    ],
)
def test_bad_get_task_replies_are_bad_reply_errors(
    ac: FakeACServer, client: ACClient, body: bytes
) -> None:
    ac.add_raw_reply(200, body)
    with pytest.raises(BadReplyError):
        client.get_task()


def test_task_without_id_is_a_task_error_with_raw(ac: FakeACServer, client: ACClient) -> None:
    raw = {"url": "http://tool/x", "method": "GET", "other": [1, 2]}
    ac.add_task(raw)
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.raw == raw
    assert info.value.task_id is None


@pytest.mark.parametrize(
    "fields",
    [
        {"url": 5},
        {"method": ["GET"]},
        {"method": "FETCH"},
        {"url": "ftp://tool/x"},
        {"requestHeaders": "Accept: */*"},
        {"requestHeaders": {"X-A": {"nested": 1}}},
        {"input": {"json": "object"}},
        {"expiryTsMs": "tomorrow"},
    ],
    ids=["url-int", "method-list", "method-unknown", "scheme", "headers-str", "header-obj",
         "input-obj", "expiry-str"],
)  # fmt: skip
def test_task_with_wrong_field_types_is_a_task_error(
    ac: FakeACServer, client: ACClient, fields: Dict[str, Any]
) -> None:
    raw = task("t9", **fields)
    ac.add_task(raw)
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.task_id == "t9"  # the task can still be answered
    assert info.value.raw == raw


@pytest.mark.parametrize("number", [b"Infinity", b"NaN", b"1e400", b"1" + b"0" * 400])
def test_task_with_an_unusable_expiry_is_a_task_error(
    ac: FakeACServer, client: ACClient, number: bytes
) -> None:
    ac.add_raw_reply(
        200,
        b'{"data": {"taskId": "t9", "url": "http://t/x", "method": "GET", "expiryTsMs": '
        + number
        + b"}}",
    )
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.task_id == "t9"
    assert info.value.raw is not None and info.value.raw["taskId"] == "t9"


def test_get_task_http_errors_are_raised_without_retry(ac: FakeACServer, client: ACClient) -> None:
    ac.add_raw_reply(503, b"maintenance")
    with pytest.raises(ACHTTPError) as info:
        client.get_task()
    assert info.value.status == 503
    assert ac.count("get-task") == 1  # the Fetcher owns get-task retries


def test_get_task_connection_refused_is_a_connection_error() -> None:
    config = AgentConfig(
        server_url=closed_port_url(), api_key="k", rate_limit_per_min=0, ac_connect_timeout=2.0
    )
    with ACClient(config, retry_policy=FAST) as client:
        with pytest.raises(ACConnectionError):
            client.get_task()


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"data": []}', b'{"data": {"getUrl": "http://x"}}', b'{"data": {"putUrl": 1}}'],
    ids=["not-json", "data-list", "no-put-url", "put-url-int"],
)
def test_bad_upload_url_replies_are_bad_reply_errors(
    ac: FakeACServer, client: ACClient, body: bytes
) -> None:
    ac.inject("upload-url", status=200, body=body)
    with pytest.raises(BadReplyError):
        client.get_upload_url("t1" + "c" * 32)
    assert ac.count("upload-url") == 1  # a bad 2xx is not retried


def test_exchange_hook_sees_every_exchange_and_may_fail(ac: FakeACServer) -> None:
    seen: List[Optional[str]] = []

    def hook(endpoint: str, status: str, seconds: float) -> None:
        seen.append(f"{endpoint}:{status}")
        assert seconds >= 0
        raise RuntimeError("observer bug")  # must not break the call

    config = AgentConfig(server_url=ac.url, api_key="k", rate_limit_per_min=0)
    with ACClient(config, retry_policy=FAST, on_exchange=hook) as client:
        ac.inject("put-result", status=503)
        client.put_result(result("t1"))
        client.get_task()
    assert seen == ["put-result:503", "put-result:200", "get-task:200"]
