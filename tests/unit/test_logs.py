"""Logging setup, task context, secret redaction and the fetch-logs zip."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from acagent import logs
from acagent.logs import (
    redact,
    register_secret,
    reset_logging,
    set_debug,
    setup_logging,
    task_context,
    zip_logs,
)

API_KEY = "ak_live_9f8e7d6c5b4a39281706"
SECRETS = [API_KEY, "xyz-bearer-token-123", "sid=1", "c2VjcmV0OnBhc3M=", "tok-abc-987"]


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    yield
    reset_logging()
    logs.clear_secrets()


def _log_secret_messages(log: logging.Logger) -> None:
    register_secret(API_KEY)
    log.info("starting with api key %s", API_KEY)
    log.info("calling AC with headers Authorization: Bearer xyz-bearer-token-123")
    log.info("target headers %s", {"Cookie": "sid=1", "Accept": "application/json"})
    log.warning("basic auth header: %r", {"Authorization": "Basic c2VjcmV0OnBhc3M="})
    log.info("token in url https://jira.local/rest?private_token=tok-abc-987&x=1")
    try:
        raise RuntimeError(f"request failed with key {API_KEY}")
    except RuntimeError:
        log.exception("upload failed (Authorization: Bearer xyz-bearer-token-123)")


def _assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into:\n{text}"


def test_text_format_redacts_secrets() -> None:
    stream = io.StringIO()
    setup_logging(log_format="text", stream=stream)
    _log_secret_messages(logging.getLogger("acagent.test"))
    out = stream.getvalue()
    _assert_no_secrets(out)
    assert out.count("***") >= 6
    assert "starting with api key ***" in out
    assert "'Accept': 'application/json'" in out  # only the secret part is masked
    assert "Traceback" in out and "RuntimeError: request failed with key ***" in out
    assert " INFO [MainThread] acagent.test: " in out


def test_json_format_redacts_secrets_and_lines_parse() -> None:
    stream = io.StringIO()
    setup_logging(log_format="json", stream=stream)
    _log_secret_messages(logging.getLogger("acagent.test"))
    out = stream.getvalue()
    _assert_no_secrets(out)
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 6
    for rec in records:
        assert {"ts", "level", "logger", "thread", "msg"} <= rec.keys()
        assert rec["ts"].endswith("Z") and "T" in rec["ts"]
        assert rec["logger"] == "acagent.test"
    assert records[-1]["level"] == "ERROR"
    assert "RuntimeError" in records[-1]["exc"]
    assert "exc" not in records[0]


def test_redact_patterns() -> None:
    cases = {
        "Authorization: Bearer abc": "Authorization: ***",
        "proxy-authorization:Basic Zm9vOmJhcg==": "proxy-authorization:***",
        "{'Cookie': 'sid=1; x=2'}": "{'Cookie': '***'}",
        '{"Set-Cookie": "a=b"}': '{"Set-Cookie": "***"}',
        "{'X-Api-Key': b'k1'}": "{'X-Api-Key': b'***'}",
        "Private-Token: glpat-123\nnext": "Private-Token: ***\nnext",
        "X-Auth-Token: t\r\nHost: h": "X-Auth-Token: ***\r\nHost: h",
        "send Bearer eyJhbGciOi.J9.x to server": "send Bearer *** to server",
        "GET /x?apiKey=s3cr3t&page=2": "GET /x?apiKey=***&page=2",
        "{'Api-Key': \"it's\"}": "{'Api-Key': \"***\"}",
    }
    for raw, expected in cases.items():
        assert redact(raw) == expected, raw
    plain = "fetched task T1 from https://web-agent.armorcode.com in 12 ms"
    assert redact(plain) is plain  # nothing to do: no copy, no regex substitution


def test_registered_secret_url_encoded_too() -> None:
    register_secret("p@ss/word+1")
    assert redact("q=p%40ss%2Fword%2B1 and p@ss/word+1") == "q=*** and ***"
    register_secret("")  # ignored
    assert redact("nothing") == "nothing"


def test_extra_fields_appear_and_are_redacted() -> None:
    stream = io.StringIO()
    setup_logging(log_format="json", stream=stream)
    register_secret(API_KEY)
    logging.getLogger("acagent.x").info(
        "result uploaded", extra={"status_code": 200, "note": f"key={API_KEY}"}
    )
    rec = json.loads(stream.getvalue())
    assert rec["status_code"] == 200
    assert rec["note"] == "key=***"


def test_task_context_adds_the_task_id() -> None:
    stream = io.StringIO()
    setup_logging(log_format="json", stream=stream)
    log = logging.getLogger("acagent.exec")
    seen_in_other_thread: List[Any] = []
    with task_context("T-42"):
        log.info("inside")
        assert logs.current_task_id() == "T-42"
        with task_context("T-43"):
            log.info("nested")

        def in_other_thread() -> None:
            log.info("other thread")
            seen_in_other_thread.append(1)

        other = threading.Thread(target=in_other_thread, name="t-other")
        other.start()
        other.join(10)
        assert not other.is_alive() and seen_in_other_thread == [1]
    log.info("outside")
    recs: Dict[str, Dict[str, Any]] = {}
    for line in stream.getvalue().splitlines():
        rec = json.loads(line)
        recs[rec["msg"]] = rec
    assert recs["inside"]["task_id"] == "T-42"
    assert recs["nested"]["task_id"] == "T-43"
    assert "task_id" not in recs["other thread"]
    assert recs["other thread"]["thread"] == "t-other"
    assert "task_id" not in recs["outside"]
    assert logs.current_task_id() is None


def test_task_context_in_text_format() -> None:
    stream = io.StringIO()
    setup_logging(log_format="text", stream=stream)
    with task_context("T-7"):
        logging.getLogger("acagent").info("running")
    logging.getLogger("acagent").info("idle")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("running [task=T-7]")
    assert second.endswith("idle")


def test_setup_is_idempotent_and_leaves_root_alone() -> None:
    root_handlers = list(logging.getLogger().handlers)
    s1, s2 = io.StringIO(), io.StringIO()
    setup_logging(stream=s1)
    setup_logging(stream=s2)
    log = logging.getLogger("acagent.idem")
    log.info("once")
    assert s1.getvalue() == ""
    assert s2.getvalue().count("once") == 1
    acagent_logger = logging.getLogger("acagent")
    assert len(acagent_logger.handlers) == 1
    assert acagent_logger.propagate is False
    assert logging.getLogger().handlers == root_handlers
    reset_logging()
    assert acagent_logger.handlers == [] and acagent_logger.propagate is True


def test_debug_level_and_runtime_switch() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    log = logging.getLogger("acagent.dbg")
    log.debug("hidden")
    set_debug(True)
    log.debug("shown")
    set_debug(False)
    log.debug("hidden again")
    out = stream.getvalue()
    assert "shown" in out and "hidden" not in out
    setup_logging(stream=stream, debug=True)
    log.debug("debug at start")
    assert "debug at start" in stream.getvalue()


def test_file_logging(tmp_path: Path) -> None:
    log_dir = tmp_path / "armorcode" / "log"
    setup_logging(stdout=False, file_dir=str(log_dir), index="_test", log_format="text")
    register_secret(API_KEY)
    logging.getLogger("acagent.file").info("to the file %s", API_KEY)
    reset_logging()  # closes the file
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o700
    path = log_dir / "app_log_test.log"
    text = path.read_text(encoding="utf-8")
    assert "to the file ***" in text and API_KEY not in text
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def test_file_handler_rotates_at_midnight(tmp_path: Path) -> None:
    setup_logging(stdout=False, file_dir=str(tmp_path))
    handlers = [h for h in logging.getLogger("acagent").handlers]
    assert len(handlers) == 1
    handler = handlers[0]
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
    assert handler.when == "MIDNIGHT" and handler.backupCount == 7
    assert handler.baseFilename.endswith("app_log_prod.log")


def test_bad_format_args_do_not_break_logging() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    logging.getLogger("acagent.bad").info("two %s %s", "one")
    assert "two %s %s" in stream.getvalue()


# ---------------------------------------------------------------------------
def _write(path: Path, size: int, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))


def test_zip_logs_newest_first_under_a_cap(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    now = time.time()
    _write(log_dir / "app_log_prod.log", 400, now)
    _write(log_dir / "app_log_prod.log.2024-01-02", 400, now - 86400)
    _write(log_dir / "app_log_prod.log.2024-01-01", 400, now - 2 * 86400)
    _write(log_dir / "metrics" / "metrics_prod.json", 100, now - 10)
    _write(log_dir / "old.zip", 10, now)
    dest = log_dir / "logs.zip"
    _write(dest, 10, now)  # a previous zip at the destination is replaced, not included
    result = zip_logs(str(log_dir), str(dest), max_bytes=1000)
    assert result == str(dest)
    with zipfile.ZipFile(dest) as zf:
        names = set(zf.namelist())
        assert zf.testzip() is None
        assert zf.read("app_log_prod.log") == b"x" * 400
    assert names == {
        "app_log_prod.log",
        "app_log_prod.log.2024-01-02",
        os.path.join("metrics", "metrics_prod.json"),
    }


def test_zip_logs_empty_or_missing_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "logs.zip"
    zip_logs(str(tmp_path / "missing"), str(dest))
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == []
