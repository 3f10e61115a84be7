"""Failure lines carry the error class, HTTP status and wait in their own JSON fields."""

from __future__ import annotations

import io
import json
import logging
from typing import Iterator

import pytest

from acagent import logs
from acagent.errors import ACConnectionError, ACHTTPError


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    logs.reset_logging()


def test_json_line_has_error_class_status_and_wait_fields(stream: io.StringIO) -> None:
    logs.setup_logging(log_format="json", stream=stream)
    exc = ACHTTPError("get-task", 503, "busy")
    logging.getLogger("acagent.fetcher").warning(
        "get-task failed (%s); backing off %.0fs", exc, 5.0, extra=logs.error_fields(exc, 5.0)
    )
    line = json.loads(stream.getvalue().strip())
    assert line["error_class"] == "ACHTTPError"
    assert line["http_status"] == 503
    assert line["wait_s"] == 5.0
    assert line["msg"] == "get-task failed (get-task: HTTP 503: busy); backing off 5s"


def test_fields_without_status_or_wait(stream: io.StringIO) -> None:
    logs.setup_logging(log_format="json", stream=stream)
    exc = ACConnectionError("get-task: ConnectionError: refused")
    logging.getLogger("acagent.fetcher").error("lost", extra=logs.error_fields(exc))
    line = json.loads(stream.getvalue().strip())
    assert line["error_class"] == "ACConnectionError"
    assert "http_status" not in line and "wait_s" not in line


def test_text_line_shows_the_fields_as_key_value(stream: io.StringIO) -> None:
    logs.setup_logging(log_format="text", stream=stream)
    exc = ACHTTPError("get-task", 401)
    logging.getLogger("acagent.fetcher").error("refused", extra=logs.error_fields(exc, 300))
    text = stream.getvalue()
    assert "error_class=ACHTTPError" in text and "http_status=401" in text and "wait_s=300.0" in text


def test_a_secret_in_a_string_field_is_masked(stream: io.StringIO) -> None:
    logs.register_secret("sk-field-secret")
    try:
        logs.setup_logging(log_format="json", stream=stream)
        logging.getLogger("acagent.x").error("x", extra={"error_detail": "key sk-field-secret"})
        assert "sk-field-secret" not in stream.getvalue()
    finally:
        logs.clear_secrets()
