"""Task and Result: parsing, validation, and every result shape of the protocol.

A ``Task`` is what get-task hands out; ``Task.parse`` validates it and keeps
the raw object so the result can echo every field the agent does not know.
A ``Result`` is what the agent sends back. It never holds a body in memory:
the body bytes live in a file (``body_path``) that the Uploader streams from.
The payload builders at the bottom produce the exact JSON shapes of
docs/protocol.md ("The result").
"""

from __future__ import annotations

import base64
import io
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Mapping, Optional
from urllib.parse import urlsplit

from .errors import TaskError

ERROR_PREFIX = "Agent Side Error: "

#: methods a target request may use; anything else is a malformed task
KNOWN_METHODS = frozenset(
    {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT"}
)

#: bound of a usable ``expiryTsMs``: JSON allows Infinity and 400-digit numbers
_EXPIRY_LIMIT = 2**63

# Fields the agent adds to a result; a task carrying them would be confusing
# but is still echoed, since the result's own value overwrites them.
_RESULT_FIELDS = (
    "version",
    "statusCode",
    "responseHeaders",
    "responseBase64",
    "output",
    "responseZipped",
    "s3Url",
)


#: task fields a spool record does not keep: credentials and request bodies
#: must not sit on disk for as long as a result waits for the AC server
SPOOL_OMITTED_FIELDS = frozenset({"requestHeaders", "input"})


def new_result_key() -> str:
    """A fresh result key: 32 hex digits, safe as a file name in the spool."""
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Task:
    """One validated task. ``raw`` is the object as the server sent it."""

    task_id: str
    url: str
    method: str
    request_headers: Dict[str, str]
    input: Optional[str]
    expiry_ts_ms: int
    global_config: Optional[Dict[str, Any]]
    raw: Dict[str, Any] = field(repr=False)
    #: the spool key of this task's result, once the Ledger has journaled it
    key: Optional[str] = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, obj: Any, *, default_ttl: float = 300.0, now: Optional[int] = None) -> Task:
        """Validate a task object. Raises ``TaskError`` naming the first problem.

        The error carries ``task_id`` whenever the id itself was usable, so the
        caller can still answer the task with an error result.
        """
        if not isinstance(obj, dict):
            raise TaskError(f"task must be a JSON object, got {type(obj).__name__}")
        task_id = obj.get("taskId")
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        if not isinstance(task_id, str) or not task_id.strip():
            raise TaskError("task has no taskId")
        if len(task_id) > 512:
            raise TaskError("taskId is longer than 512 characters")

        def bad(reason: str) -> TaskError:
            return TaskError(reason, task_id=task_id)

        url = obj.get("url")
        if not isinstance(url, str) or not url:
            raise bad("task has no url")
        method = obj.get("method")
        if not isinstance(method, str) or not method:
            raise bad("task has no method")
        method = method.strip().upper()
        is_fetch_logs = "fetchLogs" in task_id and "agent/fetch-logs" in url
        if not is_fetch_logs:
            _check_url(url, bad)
            if method not in KNOWN_METHODS:
                raise bad(f"unknown method {obj.get('method')!r}")

        headers_obj = obj.get("requestHeaders")
        headers: Dict[str, str] = {}
        if headers_obj is not None:
            if not isinstance(headers_obj, dict):
                raise bad("requestHeaders must be an object")
            for name, value in headers_obj.items():
                if not isinstance(value, str):
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        value = str(value)
                    elif value is None:
                        continue
                    else:
                        raise bad(f"request header {name!r} must be a string")
                problem = header_problem(name, value)
                if problem is not None:
                    raise bad(f"request header {name!r} {problem}")
                headers[name] = value

        body = obj.get("input")
        if body is not None and not isinstance(body, str):
            raise bad("input must be a string")
        if body is not None and not body.isascii():
            try:
                body.encode("utf-8")
            except UnicodeEncodeError:  # JSON allows lone surrogates; UTF-8 does not
                raise bad("input is not encodable as UTF-8") from None

        now_value = now_ms() if now is None else now
        expiry = obj.get("expiryTsMs")
        if expiry is None:
            expiry_ms = now_value + int(default_ttl * 1000)
        elif (
            isinstance(expiry, (int, float))
            and not isinstance(expiry, bool)
            and -_EXPIRY_LIMIT < expiry < _EXPIRY_LIMIT  # also false for NaN and +-inf
        ):
            expiry_ms = int(expiry)
        else:
            raise bad("expiryTsMs must be a number of epoch milliseconds")

        global_config = obj.get("globalConfig")
        if global_config is not None and not isinstance(global_config, dict):
            global_config = None  # applied key by key; a wrong type is ignored, not fatal

        return cls(
            task_id=task_id,
            url=url,
            method=method,
            request_headers=headers,
            input=body,
            expiry_ts_ms=expiry_ms,
            global_config=global_config,
            raw=dict(obj),
        )

    # ------------------------------------------------------------------
    @property
    def is_fetch_logs(self) -> bool:
        return "fetchLogs" in self.task_id and "agent/fetch-logs" in self.url

    def seconds_left(self, now: Optional[float] = None) -> float:
        current = time.time() if now is None else now
        return self.expiry_ts_ms / 1000.0 - current

    def is_expired(self, now: Optional[float] = None) -> bool:
        return self.seconds_left(now) <= 0


#: an HTTP field name: one or more token characters (RFC 9110 5.1, 5.6.2)
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: what a field value may not hold: an ASCII control character but tab (RFC 9110 5.5)
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_problem(name: str, value: str) -> Optional[str]:
    """Why a task's request header cannot be sent as it is, or None.

    Nothing is sent that a target or a proxy on the way could read as a
    different header or request, or would read differently from the agent.
    """
    if "\n" in name or "\r" in name or "\n" in value or "\r" in value:
        return "contains a line break"
    if not _FIELD_NAME.fullmatch(name):
        return "is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    if _VALUE_CONTROL.search(value):
        return "contains a control character"
    return None


#: a space or an ASCII control character (tab, CR and LF among them)
_URL_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20]")


def _check_url(url: str, bad: Any) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a malformed port
    except ValueError as exc:
        raise bad(f"malformed url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise bad(f"url scheme must be http or https, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise bad("url has no host")
    if port == 0:
        raise bad("url has port 0")
    if _URL_SPACE_OR_CONTROL.search(url):
        raise bad("url contains whitespace or control characters")


def echo_fields(obj: Any) -> Dict[str, Any]:
    """The fields a result must echo from a (possibly malformed) task object."""
    if isinstance(obj, dict):
        return {k: v for k, v in obj.items() if k not in _RESULT_FIELDS}
    return {}


@dataclass
class Result:
    """The outcome of one task, ready for the Uploader.

    ``fields`` are the task's own fields (echoed). The body, if any, is
    either the file at ``body_path`` holding the decoded bytes exactly as
    received, or (a small body, ``RECORD_BODY_LIMIT``) ``body_base64``: the
    bytes base64-encoded, kept in the result and its spool record, and sent as
    they are in put-result's ``output``. ``key`` names the result in the spool
    and in file names.
    """

    fields: Dict[str, Any]
    status_code: int
    response_headers: Dict[str, str] = field(default_factory=dict)
    body_path: Optional[str] = None
    body_size: int = 0
    error: Optional[str] = None
    key: str = field(default_factory=new_result_key)
    #: set for the fetch-logs task: the zip to send to upload-logs
    logs_zip: Optional[str] = None
    #: short slug of the failure (metrics label) when ``error`` is set
    failure: Optional[str] = None
    #: a small body kept in the record itself (base64 of ``body_size`` bytes)
    body_base64: Optional[str] = None

    @property
    def task_id(self) -> str:
        return str(self.fields.get("taskId", ""))

    @property
    def is_error(self) -> bool:
        return self.error is not None

    def kept_body(self) -> Optional[bytes]:
        """The bytes of a body kept in the result itself (``body_base64``), or None."""
        return None if self.body_base64 is None else base64.b64decode(self.body_base64)

    def open_body(self) -> BinaryIO:
        """The body's bytes, readable wherever they are kept: the body file,
        or (a small body) the result itself; empty if there is no body. The
        caller closes it. Raises ``OSError`` if the body file is gone."""
        kept = self.kept_body()
        if kept is not None:
            return io.BytesIO(kept)
        if self.body_path is not None:
            return open(self.body_path, "rb")
        return io.BytesIO()

    @classmethod
    def agent_error(
        cls,
        task: Task | Mapping[str, Any],
        reason: str,
        *,
        failure: str = "agent_error",
        key: Optional[str] = None,
    ) -> Result:
        """An ``Agent Side Error`` result: statusCode 500, plain-text output."""
        raw = task.raw if isinstance(task, Task) else task
        if key is None and isinstance(task, Task):
            key = task.key  # a journaled task's answer replaces its journal record
        return cls(
            fields=echo_fields(raw),
            status_code=500,
            error=reason,
            failure=failure,
            # a new key only when none is given (a uuid4 costs a system call)
            key=key if key is not None else new_result_key(),
        )

    # -- spool records ---------------------------------------------------
    def to_record(self) -> Dict[str, Any]:
        """What the spool keeps on disk: only what delivery needs. The task's
        ``requestHeaders`` (tool credentials) and ``input`` (request body) are
        left out, so a result re-sent after a restart echoes the task without them."""
        return {
            "fields": {k: v for k, v in self.fields.items() if k not in SPOOL_OMITTED_FIELDS},
            "statusCode": self.status_code,
            "responseHeaders": self.response_headers,
            "bodyPath": self.body_path,
            "bodySize": self.body_size,
            "error": self.error,
            "failure": self.failure,
            "key": self.key,
            "logsZip": self.logs_zip,
            **({} if self.body_base64 is None else {"bodyBase64": self.body_base64}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Result:
        """The result a spool record holds; ``ValueError`` (or ``KeyError``,
        ``TypeError``) if the record is not one: a body kept in the record
        must be valid base64 of exactly ``bodySize`` bytes."""
        encoded = record.get("bodyBase64")
        if encoded is not None:
            if not isinstance(encoded, str):
                raise TypeError("bodyBase64 is not a string")
            size = len(base64.b64decode(encoded, validate=True))
            if size != int(record.get("bodySize") or 0):
                raise ValueError(f"bodyBase64 holds {size} bytes, bodySize says otherwise")
        return cls(
            fields=dict(record["fields"]),
            status_code=int(record["statusCode"]),
            response_headers=dict(record.get("responseHeaders") or {}),
            body_path=record.get("bodyPath"),
            body_size=int(record.get("bodySize") or 0),
            error=record.get("error"),
            failure=record.get("failure"),
            key=str(record["key"]),
            logs_zip=record.get("logsZip"),
            body_base64=encoded,
        )


# ---------------------------------------------------------------------------
# Payload builders: the exact JSON shapes of docs/protocol.md "The result".


def _base_payload(result: Result, version: str) -> Dict[str, Any]:
    payload = dict(result.fields)
    payload["version"] = version
    payload["statusCode"] = result.status_code
    payload["responseHeaders"] = dict(result.response_headers)
    return payload


def error_payload(result: Result, version: str) -> Dict[str, Any]:
    """put-result body for an ``Agent Side Error``."""
    payload = _base_payload(result, version)
    payload["statusCode"] = 500
    payload["output"] = ERROR_PREFIX + (result.error or "unknown error")
    return payload


def inline_payload(result: Result, version: str, body: Optional[bytes]) -> Dict[str, Any]:
    """put-result body carrying the body inline (base64), or no output if empty;
    ``body`` None: the one kept in the record (``body_base64``), if any."""
    payload = _base_payload(result, version)
    encoded = result.body_base64 if body is None else base64.b64encode(body).decode("ascii")
    if encoded:
        payload["responseBase64"] = True
        payload["output"] = encoded
    return payload


def upload_task_part(result: Result, version: str, *, zipped: bool) -> Dict[str, Any]:
    """The ``task`` part of upload-result: the result without ``output``."""
    payload = _base_payload(result, version)
    payload["responseZipped"] = zipped
    return payload


def s3_payload(result: Result, version: str, get_url: str) -> Dict[str, Any]:
    """put-result body after the body went to S3."""
    payload = _base_payload(result, version)
    payload["s3Url"] = get_url
    return payload


def upload_file_name(task_id: str, *, zipped: bool) -> str:
    """``<taskId>_<32hex>.zip`` (or ``.txt``), with path separators neutralised."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:200]
    return f"{safe}_{uuid.uuid4().hex}.{'zip' if zipped else 'txt'}"
