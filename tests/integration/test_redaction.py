"""Log hygiene: whole-token redaction, no query strings or userinfo, no forged lines.

The pipeline runs against real servers with a one-letter API key (the test
key "k"), tasks whose URLs carry ``?sig=`` secrets and userinfo, and a
taskId holding a newline followed by a fake log record.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import pytest
from helpers import WAIT, make_config, make_pipeline, running

from acagent import logs
from acagent.logs import escape_controls, redact, register_secret, safe_url, scrub_text
from acagent.testing import FakeACServer, FakeTarget, closed_port_url

SIG = "S1GSECRETvalue"
KEY = "KEYSECRETvalue"
PASSWORD = "pw0rdSECRET"
FORGED = "2026-01-01T00:00:00.000Z ERROR [acagent-exec_0] acagent.executor: FORGED LINE"
RECORD_START = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
)
# a mask glued to a letter or digit: redaction cut a word
GARBLED = re.compile(r"[A-Za-z0-9]\*\*\*|\*\*\*[A-Za-z0-9]")


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    yield
    logs.reset_logging()
    logs.clear_secrets()


def test_short_key_query_secrets_and_newline_task_id(tmp_path: Path) -> None:
    stream = io.StringIO()
    register_secret("k")  # what the CLI does with --apiKey
    logs.setup_logging(log_format="text", debug=True, stream=stream)
    dead = closed_port_url()
    with FakeTarget() as target, FakeACServer(api_key="k") as ac:
        tasks = [
            {
                "taskId": "evil\n" + FORGED,
                "method": "GET",
                "url": f"{dead}/rest/api?sig={SIG}&key={KEY}",
            },
            {
                "taskId": "userinfo",
                "method": "GET",
                "url": f"http://admin:{PASSWORD}@127.0.0.1:{dead.rsplit(':', 1)[1]}/x?sig={SIG}",
            },
            {
                "taskId": "timeout\r\nX",
                "method": "GET",
                "url": f"{target.url}/slow-headers?latency=3&sig={SIG}",
            },
        ]
        ac.add_tasks(tasks)
        config = make_config(ac.url, tmp_path / "spool", api_key="k", timeout=0.5)
        with running(make_pipeline(config)):
            assert ac.wait_for_results(len(tasks), WAIT)
        results = {name: got[0] for name, got in ac.results.items()}
    log = logging.getLogger("acagent.test")
    try:
        raise RuntimeError("Traceback keeps its k-free words; the key is k")
    except RuntimeError:
        log.exception("failed with key k at https://user:pw@h.example/p?sig=%s", SIG)
    text = stream.getvalue()
    # no secret: query values, userinfo password, the short key as a token
    for secret in (SIG, KEY, PASSWORD):
        assert secret not in text, [line for line in text.splitlines() if secret in line]
    assert "the key is ***" in text and "with key *** at" in text
    # no garbled word: "Traceback", "key", "task" ... keep every letter
    assert GARBLED.search(text) is None, GARBLED.findall(text)
    assert "Traceback (most recent call last):" in text and "Traceback keeps" in text
    # no forged line: every line is a record or an indented traceback line
    for line in text.splitlines():
        assert RECORD_START.match(line) or line.startswith((" ", "Traceback")), line
    assert "evil\\n2026-01-01T00:00:00.000Z ERROR" in text  # the newline is shown escaped
    assert "timeout\\r\\nX" in text
    # the error results lose query strings and userinfo too
    for name, got in results.items():
        output = got.fields["output"]
        assert got.via == "error", name
        for secret in (SIG, KEY, PASSWORD):
            assert secret not in output, (name, output)


def test_json_lines_keep_one_record_per_line() -> None:
    stream = io.StringIO()
    logs.setup_logging(log_format="json", stream=stream)
    with logs.task_context("a\nb"):
        logging.getLogger("acagent.test").warning("x\ny\u2028z")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["task_id"] == "a\nb" and record["msg"] == "x\ny\u2028z"


@pytest.mark.parametrize(
    ("secret", "text", "expected"),
    [
        ("k", "Traceback key k", "Traceback key ***"),
        ("k", "k", "***"),
        ("k", "apiKey=k&x=1", "apiKey=***&x=1"),
        ("ab", "tab ab cab abc (ab)", "tab *** cab abc (***)"),
        ("s3cr3t-1", "Bearer-s3cr3t-1, s3cr3t-12", "Bearer-***, s3cr3t-12"),
        ("key/with+chars", "v=key%2Fwith%2Bchars;", "v=***;"),
    ],
)
def test_registered_secrets_are_masked_as_whole_tokens(
    secret: str, text: str, expected: str
) -> None:
    register_secret(secret)
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p@s3.example/b/k?X-Amz-Signature=abc#f", "https://s3.example/b/k"),
        ("http://h:8080/p?sig=1", "http://h:8080/p"),
        ("http://[::1]:9/x?y", "http://[::1]:9/x"),
        ("http://h/plain", "http://h/plain"),
    ],
)
def test_safe_url(url: str, expected: str) -> None:
    assert safe_url(url) == expected


def test_scrub_text_strips_urllib3_paths_and_reprs() -> None:
    message = (
        "HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: "
        "/a/b?sig=XYZ&x=1 (Caused by NewConnectionError('<urllib3.connection.HTTPConnection "
        "object at 0x7f00aa>: Failed to establish a new connection', "
        "'see https://user:pw@x.example/p?token=T'))"
    )
    out = scrub_text(message)
    assert "XYZ" not in out and "token=T" not in out and "pw@" not in out
    assert "with url: /a/b " in out and "0x7f00aa" not in out


def test_escape_controls() -> None:
    assert escape_controls("a\nb\r\x1b[31m\x7f\u2028\tz") == "a\\nb\\r\\x1b[31m\\x7f\\u2028\tz"
