"""Task parsing and validation, and the exact result shapes of docs/protocol.md."""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any, Dict

import pytest

from acagent.errors import TaskError
from acagent.models import (
    ERROR_PREFIX,
    Result,
    Task,
    echo_fields,
    error_payload,
    inline_payload,
    s3_payload,
    upload_file_name,
    upload_task_part,
)

NOW = 1_700_000_000_000  # epoch ms used as "now"
VERSION = "9.9.9"


def good(**changes: Any) -> Dict[str, Any]:
    obj: Dict[str, Any] = {
        "taskId": "t-1",
        "url": "https://tool.internal:8443/api/v1/items?page=2",
        "method": "GET",
    }
    for key, value in changes.items():
        if value is _DROP:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


_DROP = object()


def parse(obj: Any, **kw: Any) -> Task:
    return Task.parse(obj, now=NOW, **kw)


def reason_of(obj: Any) -> TaskError:
    with pytest.raises(TaskError) as info:
        parse(obj)
    return info.value


# ------------------------------------------------------------ Task.parse: valid


def test_minimal_task() -> None:
    task = parse(good())
    assert task.task_id == "t-1"
    assert task.url == "https://tool.internal:8443/api/v1/items?page=2"
    assert task.method == "GET"
    assert task.request_headers == {}
    assert task.input is None
    assert task.expiry_ts_ms == NOW + 300_000  # default ttl
    assert task.global_config is None
    assert task.raw == good()


def test_default_ttl_is_configurable() -> None:
    assert parse(good(), default_ttl=12.5).expiry_ts_ms == NOW + 12_500


def test_method_any_case() -> None:
    assert parse(good(method="post")).method == "POST"
    assert parse(good(method=" Patch ")).method == "PATCH"


def test_int_task_id_becomes_a_string() -> None:
    task = parse(good(taskId=12345))
    assert task.task_id == "12345"
    assert task.raw["taskId"] == 12345  # echoed exactly as sent


def test_full_task() -> None:
    obj = good(
        method="PUT",
        requestHeaders={"Accept": "application/json", "X-Count": 5, "X-Skip": None},
        input='{"a": "\u00e9"}',
        expiryTsMs=NOW + 1234,
        globalConfig={"debugMode": True, "poolSize": 3},
        somethingNew={"kept": [1, 2]},
    )
    task = parse(obj)
    # numbers become strings, null headers are dropped
    assert task.request_headers == {"Accept": "application/json", "X-Count": "5"}
    assert task.input == '{"a": "\u00e9"}'
    assert task.expiry_ts_ms == NOW + 1234
    assert task.global_config == {"debugMode": True, "poolSize": 3}
    assert task.raw == obj
    assert task.raw is not obj  # a copy


def test_float_expiry_is_accepted() -> None:
    assert parse(good(expiryTsMs=float(NOW) + 0.9)).expiry_ts_ms == NOW


def test_http_scheme_and_ip_hosts() -> None:
    assert parse(good(url="http://10.0.0.5/x")).url == "http://10.0.0.5/x"
    assert parse(good(url="http://[::1]:8080/x")).url == "http://[::1]:8080/x"


def test_fetch_logs_task_skips_url_and_method_checks() -> None:
    task = parse(good(taskId="fetchLogs-42", url="agent/fetch-logs", method="LOGS"))
    assert task.is_fetch_logs
    assert not parse(good()).is_fetch_logs


def test_expiry_helpers() -> None:
    task = parse(good(expiryTsMs=NOW + 10_000))
    assert task.seconds_left(now=NOW / 1000) == pytest.approx(10.0)
    assert not task.is_expired(now=NOW / 1000)
    assert task.is_expired(now=NOW / 1000 + 10)


@pytest.mark.parametrize("value", [[1], "off", 3, True])
def test_global_config_of_the_wrong_type_is_ignored(value: Any) -> None:
    task = parse(good(globalConfig=value))
    assert task.global_config is None
    assert task.raw["globalConfig"] == value


# ------------------------------------------------------------ Task.parse: invalid


@pytest.mark.parametrize(
    "obj",
    [None, [], "t-1", 5, ["taskId", "t-1"]],
    ids=["null", "list", "string", "int", "pair"],
)
def test_non_objects_are_rejected(obj: Any) -> None:
    error = reason_of(obj)
    assert error.task_id is None


@pytest.mark.parametrize(
    "task_id",
    [_DROP, None, "", "   ", True, 1.5, ["t"], {"id": 1}, "x" * 513],
    ids=["missing", "null", "empty", "blank", "bool", "float", "list", "object", "too-long"],
)
def test_bad_task_ids_are_rejected(task_id: Any) -> None:
    error = reason_of(good(taskId=task_id))
    assert error.task_id is None
    assert "taskId" in str(error)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"url": _DROP}, "no url"),
        ({"url": ""}, "no url"),
        ({"url": 42}, "no url"),
        ({"method": _DROP}, "no method"),
        ({"method": ""}, "no method"),
        ({"method": 1}, "no method"),
        ({"method": "FETCH"}, "unknown method"),
        ({"method": "GET /x"}, "unknown method"),
        ({"url": "ftp://tool/x"}, "scheme"),
        ({"url": "file:///etc/passwd"}, "scheme"),
        ({"url": "javascript:alert(1)"}, "scheme"),
        ({"url": "tool.internal/x"}, "scheme"),
        ({"url": "http://tool:99999/x"}, "malformed url"),
        ({"url": "http://tool:8o8o/x"}, "malformed url"),
        ({"url": "http://tool:0/x"}, "port 0"),
        ({"url": "http:///x"}, "no host"),
        ({"url": "http://tool/a b"}, "whitespace"),
        ({"url": "http://tool/a\r\nX-Evil: 1"}, "whitespace"),
        ({"url": "http://tool/\x00"}, "control"),
        ({"requestHeaders": "Accept: */*"}, "requestHeaders"),
        ({"requestHeaders": ["Accept"]}, "requestHeaders"),
        ({"requestHeaders": {"X-A": {"b": 1}}}, "must be a string"),
        ({"requestHeaders": {"X-A": ["b"]}}, "must be a string"),
        ({"requestHeaders": {"X-A": True}}, "must be a string"),
        ({"requestHeaders": {"X-A": "v\r\nX-Evil: 1"}}, "line break"),
        ({"requestHeaders": {"X-A": "v\nmore"}}, "line break"),
        ({"requestHeaders": {"X-A\r\nX-Evil": "1"}}, "line break"),
        ({"input": 5}, "input"),
        ({"input": {"a": 1}}, "input"),
        ({"input": ["a"]}, "input"),
        ({"input": True}, "input"),
        ({"expiryTsMs": "1700000000000"}, "expiryTsMs"),
        ({"expiryTsMs": True}, "expiryTsMs"),
        ({"expiryTsMs": [1]}, "expiryTsMs"),
        ({"expiryTsMs": float("nan")}, "expiryTsMs"),
        ({"expiryTsMs": float("inf")}, "expiryTsMs"),
        ({"expiryTsMs": float("-inf")}, "expiryTsMs"),
        ({"expiryTsMs": 10**400}, "expiryTsMs"),
    ],
)
def test_malformed_fields_are_task_errors_with_the_id(changes: Dict[str, Any], words: str) -> None:
    error = reason_of(good(**changes))
    assert error.task_id == "t-1"  # still answerable with an error result
    assert words in str(error)
    assert error.reason == str(error)


def test_expiry_from_json_infinity_is_a_task_error() -> None:
    # Python's json (and requests' .json()) accepts Infinity/NaN and huge numbers
    for text in ("Infinity", "-Infinity", "NaN", "1e400", "1" + "0" * 400):
        obj = json.loads('{"taskId": "t-1", "url": "http://t/x", "method": "GET", '
                         f'"expiryTsMs": {text}}}')  # fmt: skip
        with pytest.raises(TaskError):
            parse(obj)


# ------------------------------------------------------------ echo and payloads


def make_result(**kw: Any) -> Result:
    raw = good(
        requestHeaders={"Accept": "*/*"},
        input="body",
        expiryTsMs=NOW,
        globalConfig={"poolSize": 2},
        unknownField={"nested": [1, None, "x"]},
        anotherOne=None,
    )
    base: Dict[str, Any] = {
        "fields": echo_fields(raw),
        "status_code": 201,
        "response_headers": {"Content-Type": "text/plain", "X-Req": "abc"},
    }
    base.update(kw)
    return Result(**base)


ECHOED = {
    "taskId": "t-1",
    "url": "https://tool.internal:8443/api/v1/items?page=2",
    "method": "GET",
    "requestHeaders": {"Accept": "*/*"},
    "input": "body",
    "expiryTsMs": NOW,
    "globalConfig": {"poolSize": 2},
    "unknownField": {"nested": [1, None, "x"]},
    "anotherOne": None,
}


def common(status: int = 201) -> Dict[str, Any]:
    return {
        **ECHOED,
        "version": VERSION,
        "statusCode": status,
        "responseHeaders": {"Content-Type": "text/plain", "X-Req": "abc"},
    }


def test_echo_fields_drops_only_the_result_fields() -> None:
    raw = {
        **ECHOED,
        "version": "old",
        "statusCode": 1,
        "responseHeaders": {},
        "responseBase64": True,
        "output": "stale",
        "responseZipped": True,
        "s3Url": "http://x",
    }
    assert echo_fields(raw) == ECHOED
    assert echo_fields(["not", "a", "dict"]) == {}
    assert echo_fields(None) == {}


def test_inline_payload_shape() -> None:
    payload = inline_payload(make_result(), VERSION, b"hello")
    assert payload == {**common(), "responseBase64": True, "output": "aGVsbG8="}


def test_inline_payload_base64_is_exact_for_non_utf8_bytes() -> None:
    body = bytes(range(256)) * 3 + b"\xff\xfe\x80\x00"
    payload = inline_payload(make_result(), VERSION, body)
    assert payload["responseBase64"] is True
    assert base64.b64decode(payload["output"], validate=True) == body
    json.dumps(payload)  # JSON-serialisable as is


def test_empty_body_payload_has_no_output() -> None:
    payload = inline_payload(make_result(status_code=204), VERSION, b"")
    assert payload == common(204)
    assert "output" not in payload and "responseBase64" not in payload


def test_upload_task_part_shape() -> None:
    zipped = upload_task_part(make_result(), VERSION, zipped=True)
    assert zipped == {**common(), "responseZipped": True}
    raw = upload_task_part(make_result(), VERSION, zipped=False)
    assert raw == {**common(), "responseZipped": False}
    assert "output" not in raw and "responseBase64" not in raw


def test_s3_payload_shape() -> None:
    payload = s3_payload(make_result(), VERSION, "https://s3/bucket/key?sig=1")
    assert payload == {**common(), "s3Url": "https://s3/bucket/key?sig=1"}


def test_error_payload_shape() -> None:
    result = make_result(status_code=502, error="target timed out after 30s")
    payload = error_payload(result, VERSION)
    assert payload == {**common(500), "output": "Agent Side Error: target timed out after 30s"}
    assert ERROR_PREFIX == "Agent Side Error: "
    assert "responseBase64" not in payload


def test_agent_error_result_from_a_task_and_from_a_raw_object() -> None:
    task = parse(good(extra="kept", output="from-server"))
    result = Result.agent_error(task, "task expired", failure="expired", key="k1")
    assert result.status_code == 500
    assert result.is_error
    assert result.failure == "expired"
    assert result.key == "k1"
    assert result.fields == {**good(), "extra": "kept"}  # result fields are not echoed
    payload = error_payload(result, VERSION)
    assert payload["output"] == "Agent Side Error: task expired"
    assert payload["extra"] == "kept"

    broken = {"taskId": "t-2", "url": 5, "odd": [1]}
    result = Result.agent_error(broken, "malformed task: task has no url")
    assert result.fields == broken
    assert result.task_id == "t-2"
    assert len(result.key) == 32


def test_payload_builders_do_not_mutate_the_result() -> None:
    result = make_result()
    before = json.dumps({"fields": sorted(result.fields)})
    inline_payload(result, VERSION, b"x")["unknownField"]["nested"].append("y")
    error_payload(result, VERSION)
    upload_task_part(result, VERSION, zipped=True)
    s3_payload(result, VERSION, "u")
    # top-level keys never leak back; the builders copy the dict
    assert "output" not in result.fields and "s3Url" not in result.fields
    assert set(json.loads(before)["fields"]) == set(result.fields)


# ------------------------------------------------------------ records, file names


def test_result_record_round_trip_through_json() -> None:
    result = make_result(
        body_path="/spool/abc.body",
        body_size=123_456,
        error=None,
        failure=None,
        logs_zip="/tmp/logs.zip",
    )
    record = json.loads(json.dumps(result.to_record()))
    back = Result.from_record(record)
    # the record leaves out the task's credentials and body (SPOOL_OMITTED_FIELDS)
    kept = {k: v for k, v in result.fields.items() if k not in ("requestHeaders", "input")}
    assert back == Result(**{**vars(result), "fields": kept})
    assert back.to_record() == result.to_record()


def test_error_result_record_round_trip() -> None:
    result = Result.agent_error(good(taskId=77), "boom", failure="target_error")
    back = Result.from_record(json.loads(json.dumps(result.to_record())))
    assert back == result
    assert back.task_id == "77"


def test_from_record_tolerates_missing_optional_fields() -> None:
    back = Result.from_record({"fields": {"taskId": "t"}, "statusCode": "200", "key": "k"})
    assert back.status_code == 200
    assert back.response_headers == {}
    assert back.body_path is None and back.body_size == 0
    assert back.error is None and back.logs_zip is None


def test_a_body_kept_in_the_record_round_trips_and_is_sent_as_it_is() -> None:
    data = bytes(range(256)) * 3
    encoded = base64.b64encode(data).decode("ascii")
    result = make_result(body_size=len(data), body_base64=encoded)
    record = json.loads(json.dumps(result.to_record()))
    assert record["bodyBase64"] == encoded and record["bodyPath"] is None
    back = Result.from_record(record)
    assert back.body_base64 == encoded and back.body_size == len(data)
    with back.open_body() as body:
        assert body.read() == data
    payload = inline_payload(back, VERSION, None)  # the body kept in the record
    assert payload == inline_payload(back, VERSION, data)
    assert payload["output"] == encoded and payload["responseBase64"] is True
    # a result without one keeps its old record shape
    assert "bodyBase64" not in make_result().to_record()


@pytest.mark.parametrize(
    "value, size, error",
    [
        ("not base64!", 3, ValueError),
        ("AAEC", 4, ValueError),  # three bytes, the record says four
        (123, 3, TypeError),
    ],
    ids=["invalid", "wrong-size", "not-a-string"],
)
def test_a_damaged_body_in_a_record_makes_the_record_unusable(
    value: Any, size: int, error: type
) -> None:
    record = make_result(body_size=size).to_record()
    record["bodyBase64"] = value
    with pytest.raises(error):
        Result.from_record(record)


def test_open_body_reads_a_body_file_or_nothing(tmp_path: Any) -> None:
    path = tmp_path / "b.body"
    path.write_bytes(b"from a file")
    with make_result(body_path=str(path), body_size=11).open_body() as body:
        assert body.read() == b"from a file"
    with make_result().open_body() as body:
        assert body.read() == b""
    with pytest.raises(FileNotFoundError):
        make_result(body_path=str(tmp_path / "gone"), body_size=3).open_body()


@pytest.mark.parametrize("zipped", [True, False])
def test_upload_file_name_format(zipped: bool) -> None:
    name = upload_file_name("task-1_a.b", zipped=zipped)
    ext = "zip" if zipped else "txt"
    assert re.fullmatch(rf"task-1_a\.b_[0-9a-f]{{32}}\.{ext}", name)
    assert upload_file_name("task-1", zipped=zipped) != upload_file_name("task-1", zipped=zipped)


@pytest.mark.parametrize(
    "task_id",
    ["../../etc/passwd", "..\\..\\windows\\system32", "a/b\\c:d", "/abs", "x\x00y", "t\r\nX: 1"],
)
def test_upload_file_name_neutralises_path_separators(task_id: str) -> None:
    name = upload_file_name(task_id, zipped=True)
    assert "/" not in name and "\\" not in name and ":" not in name
    assert "\x00" not in name and "\r" not in name and "\n" not in name
    assert os.path.basename(name) == name
    assert re.fullmatch(r"[A-Za-z0-9._-]+_[0-9a-f]{32}\.zip", name)


def test_upload_file_name_is_bounded() -> None:
    name = upload_file_name("x" * 5000, zipped=False)
    assert len(name) <= 200 + 1 + 32 + 4
