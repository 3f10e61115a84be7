"""Logging: text or JSON lines, task context, secret redaction, log zipping.

``setup_logging()`` configures the ``acagent`` logger tree only (never the
root logger), so a service that imports acagent keeps its own logging.
Every handler it installs carries a ``RedactingFilter`` (second line of
defence: code should not log secrets in the first place) and a
``TaskContextFilter`` that stamps the current ``task_id`` on each record.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import logging.handlers
import os
import re
import stat
import sys
import threading
import zipfile
from typing import IO, Any, Dict, FrozenSet, Iterator, List, Optional, Pattern, Tuple
from urllib.parse import quote, urlsplit, urlunsplit

from . import folders

__all__ = [
    "JsonFormatter",
    "OwnFileHandler",
    "RedactingFilter",
    "TaskContextFilter",
    "TextFormatter",
    "current_task_id",
    "escape_controls",
    "redact",
    "redact_agent_loggers",
    "register_secret",
    "reset_logging",
    "safe_url",
    "scrub_text",
    "set_debug",
    "setup_logging",
    "task_context",
    "zip_logs",
]

LOGGER_NAME = "acagent"
MASK = "***"

log = logging.getLogger("acagent.logs")

# ---------------------------------------------------------------------------
# task context
# ---------------------------------------------------------------------------
_task_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "acagent_task_id", default=None
)


@contextlib.contextmanager
def task_context(task_id: str) -> Iterator[None]:
    """Every log record emitted inside the block (same thread) carries ``task_id``."""
    token = _task_id.set(str(task_id))
    try:
        yield
    finally:
        _task_id.reset(token)


def current_task_id() -> Optional[str]:
    return _task_id.get()


class TaskContextFilter(logging.Filter):
    """Sets ``record.task_id`` from the task context (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            setattr(record, "task_id", _task_id.get())  # noqa: B010 - LogRecord has no such field
        return True


# ---------------------------------------------------------------------------
# redaction
# ---------------------------------------------------------------------------
_secrets_lock = threading.Lock()
_secrets: Tuple[str, ...] = ()
#: the registered secrets as whole tokens: never part of a longer word, so a
#: short key ("k") masks "k" but leaves "Traceback" alone
_secrets_re: Optional[Pattern[str]] = None

_SENSITIVE_NAMES = (
    r"(?:proxy-)?authorization"
    r"|(?:set-)?cookie"
    r"|(?:x-)?api[-_]?key"
    r"|(?:x-)?(?:private|auth|access|refresh|session|csrf|xsrf)[-_]?token"
    r"|x-amz-security-token"
    r"|client[-_]?secret"
    r"|password|passwd"
    # bare or prefixed: token=, secret=, db_password=, github-token: ...
    r"|(?:[a-z0-9]+[-_])*(?:token|secret|password|passwd|pwd)"
)
# 'Name': 'value' / "Name": "value" (dict reprs, JSON), value possibly b'...'
_QUOTED_RE = re.compile(
    r"(?P<head>(?P<q1>['\"])(?:" + _SENSITIVE_NAMES + r")(?P=q1)\s*:\s*b?(?P<q2>['\"]))"
    r"(?:\\.|(?!(?P=q2)).)*(?P=q2)",
    re.IGNORECASE,
)
# Name: value (header dumps): the rest of the line is masked
_PLAIN_RE = re.compile(
    r"(?P<head>(?<![\w'\"-])(?:" + _SENSITIVE_NAMES + r")\s*:[ \t]*)(?=\S)[^\r\n]*",
    re.IGNORECASE,
)
# name=value (query strings, form bodies)
_EQUALS_RE = re.compile(
    r"(?P<head>(?<![\w-])(?:" + _SENSITIVE_NAMES + r")=)[^\s&'\",;]+",
    re.IGNORECASE,
)
# Bearer <token> / Basic <token> anywhere
_SCHEME_RE = re.compile(r"(?P<head>\b(?:[Bb]earer|BEARER|Basic|BASIC)\s+)[A-Za-z0-9\-._~+/]+=*")
# cheap pre-check: run the substitutions only when one of these appears
_TRIGGER_RE = re.compile(
    r"authori|cookie|api[-_]?key|token|secret|passw|pwd|bearer|basic", re.IGNORECASE
)


def register_secret(value: str) -> None:
    """Mask ``value`` (and its URL-encoded form) in every log line from now on."""
    if not value:
        return
    global _secrets, _secrets_re
    variants = {value, quote(value, safe="")}
    with _secrets_lock:
        merged = set(_secrets) | {v for v in variants if v}
        # longest first, so a secret containing another is masked whole
        _secrets = tuple(sorted(merged, key=len, reverse=True))
        _secrets_re = re.compile(
            r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(s) for s in _secrets) + r")(?![A-Za-z0-9])"
        )


def registered_secrets() -> FrozenSet[str]:
    return frozenset(_secrets)


def clear_secrets() -> None:
    """Forget every registered secret (tests)."""
    global _secrets, _secrets_re
    with _secrets_lock:
        _secrets = ()
        _secrets_re = None


def redact(text: str) -> str:
    """``text`` with registered secrets and credential-looking values masked."""
    pattern = _secrets_re
    if pattern is not None and any(secret in text for secret in _secrets):
        text = pattern.sub(MASK, text)
    if "://" in text and ("?" in text or "@" in text or "#" in text):
        # URLs lose userinfo, query string and fragment
        text = _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)), text)
    if _TRIGGER_RE.search(text) is None:
        return text
    text = _QUOTED_RE.sub(lambda m: m.group("head") + MASK + m.group("q2"), text)
    text = _PLAIN_RE.sub(lambda m: m.group("head") + MASK, text)
    text = _EQUALS_RE.sub(lambda m: m.group("head") + MASK, text)
    text = _SCHEME_RE.sub(lambda m: m.group("head") + MASK, text)
    return text


def safe_url(url: str) -> str:
    """``url`` for a log line or an error result: no userinfo, query or fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# urllib3's "Max retries exceeded with url: /path?query" names a path, not a URL
_PATH_WITH_QUERY = re.compile(r"(url: )(/[^\s'\"<>?#]*)[?#][^\s'\"<>]*")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def scrub_text(text: str) -> str:
    """An error message fit for a log line or an error result: URLs without
    userinfo and query, no object reprs, one line."""
    text = _URL_IN_TEXT.sub(lambda m: safe_url(m.group(0)), text)
    text = _PATH_WITH_QUERY.sub(lambda m: m.group(1) + m.group(2), text)
    text = _OBJECT_REPR.sub("connection", text)
    return " ".join(text.split())


# C0 and C1 control characters (tab kept) and the Unicode line separators
_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with control characters as escapes (``\\n``, ``\\x1b``): a value
    with a newline cannot start a forged line in a text log."""
    if _CONTROL_RE.search(text) is None:
        return text
    return _CONTROL_RE.sub(lambda m: repr(m.group(0))[1:-1], text)


# LogRecord attributes that are not ``extra=`` fields
_STANDARD_ATTRS: FrozenSet[str] = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "task_id", "_acagent_redacted", "taskName"}

_exc_formatter = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Masks secrets in the formatted message, the exception text and string extras.

    The record is rewritten in place (message formatted with its args, args
    cleared), so every handler and formatter downstream sees the masked text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_acagent_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad format args: log what we have, not nothing
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _exc_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        setattr(record, "_acagent_redacted", True)  # noqa: B010
        return True


# ---------------------------------------------------------------------------
# formatters
# ---------------------------------------------------------------------------
def _iso_utc(created: float) -> str:
    stamp = _dt.datetime.fromtimestamp(created, tz=_dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> Dict[str, Any]:
    return {
        k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> [<thread>] <logger>: <msg> [task=<id>] key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        # Every field is escaped: one record is one line (plus an indented
        # traceback), whatever a task id or a server's message contains.
        thread = escape_controls(record.threadName or "")
        line = (
            f"{_iso_utc(record.created)} {record.levelname} [{thread}] "
            f"{record.name}: {escape_controls(record.getMessage())}"
        )
        task_id = getattr(record, "task_id", None)
        if task_id:
            line += f" [task={escape_controls(str(task_id))}]"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(
                f"{escape_controls(str(k))}={escape_controls(str(v))}" for k, v in extras.items()
            )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + _indented(record.exc_text)
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


def _indented(block: str) -> str:
    """A traceback under its record: lines escaped, and every line after the
    first "Traceback" line indented, so none can pass for a record of its own."""
    lines = [escape_controls(line) for line in block.splitlines()]
    return "\n".join(
        line if i == 0 or line.startswith((" ", "\t")) else "  " + line
        for i, line in enumerate(lines)
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, thread, msg, task_id, exc, extras."""

    def format(self, record: logging.LogRecord) -> str:
        obj: Dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id:
            obj["task_id"] = task_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = record.stack_info
        for key, value in _extras(record).items():
            obj.setdefault(key, value)
        text = json.dumps(obj, default=str, ensure_ascii=False)
        # JSON allows these two raw; many line readers split on them
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def error_fields(exc: BaseException, wait: Optional[float] = None) -> Dict[str, Any]:
    """``extra=`` fields for a failure line: its class, HTTP status and wait, each its own key.

    ``log.warning("get-task failed; waiting %.0fs", w, extra=error_fields(exc, w))``
    gives ``"error_class": "ACHTTPError", "http_status": 503, "wait_s": 5.0`` in
    JSON lines (``key=value`` in text), so they can be filtered on.
    """
    fields: Dict[str, Any] = {"error_class": type(exc).__name__}
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        fields["http_status"] = status
    if wait is not None:
        fields["wait_s"] = round(float(wait), 3)
    return fields


# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------
class OwnFileHandler(logging.handlers.TimedRotatingFileHandler):
    """A file of ours rotated at midnight: every open (the first and each
    rotation's) refuses a symbolic link in its place and leaves the file 0600."""

    def __init__(self, path: str, *, backup_count: int) -> None:
        super().__init__(path, when="midnight", backupCount=backup_count, encoding="utf-8")

    def _open(self) -> Any:
        fd = folders.open_own(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if hasattr(os, "fchmod"):
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o600)  # a file left by an earlier run with another mode
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


_setup_lock = threading.Lock()
_installed: List[logging.Handler] = []


def _make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")


def setup_logging(
    *,
    log_format: str = "text",
    debug: bool = False,
    stdout: bool = True,
    file_dir: Optional[str] = None,
    index: str = "_prod",
    stream: Optional[IO[str]] = None,
) -> None:
    """Configure the ``acagent`` logger tree. Calling again replaces what it installed."""
    formatter = _make_formatter(log_format)
    handlers: List[logging.Handler] = []
    if stdout:
        handlers.append(logging.StreamHandler(stream if stream is not None else sys.stdout))
    if file_dir:
        folders.own_folder("log_dir", file_dir)
        path = os.path.join(file_dir, f"app_log{index}.log")
        handlers.append(OwnFileHandler(path, backup_count=7))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(TaskContextFilter())
        handler.addFilter(RedactingFilter())
    logger = logging.getLogger(LOGGER_NAME)
    with _setup_lock:
        _remove_installed(logger)
        for handler in handlers:
            logger.addHandler(handler)
        _installed.extend(handlers)
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        # our handlers print the records; do not print them twice through the root
        logger.propagate = not handlers


def _remove_installed(logger: logging.Logger) -> None:
    for handler in _installed:
        logger.removeHandler(handler)
        handler.close()
    _installed.clear()


def reset_logging() -> None:
    """Remove the handlers ``setup_logging`` installed and restore propagation."""
    logger = logging.getLogger(LOGGER_NAME)
    with _setup_lock:
        _remove_installed(logger)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


_LOGGER_FILTER = RedactingFilter()


def redact_agent_loggers() -> None:
    """Put a ``RedactingFilter`` on every ``acagent`` logger itself, so a
    library host's own handlers (``logging.basicConfig``, ...) never see a
    registered secret or a credential-looking value. Idempotent."""
    names = [LOGGER_NAME] + [
        name for name in list(logging.Logger.manager.loggerDict) if name.startswith("acagent.")
    ]
    for name in names:
        logger = logging.getLogger(name)
        if _LOGGER_FILTER not in logger.filters:
            logger.addFilter(_LOGGER_FILTER)


def set_debug(enabled: bool) -> None:
    """Switch DEBUG logging on or off at runtime (globalConfig ``debugMode``)."""
    logging.getLogger(LOGGER_NAME).setLevel(logging.DEBUG if enabled else logging.INFO)


# ---------------------------------------------------------------------------
# fetch-logs
# ---------------------------------------------------------------------------
def zip_logs(log_dir: str, dest_zip: str, *, max_bytes: int = 50 * 1024 * 1024) -> str:
    """Zip the files under ``log_dir`` into ``dest_zip``, newest first, at most
    ``max_bytes`` of input (older files beyond the cap are left out). Returns
    ``dest_zip``. Zip files in the folder (the destination included) are skipped.
    """
    dest_real = os.path.realpath(dest_zip)
    candidates: List[Tuple[float, int, str]] = []
    for root, _dirs, files in os.walk(log_dir):  # links to folders are not followed
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".zip") or os.path.realpath(path) == dest_real:
                continue
            try:
                st = os.lstat(path)
            except OSError:  # rotated away meanwhile
                continue
            if not stat.S_ISREG(st.st_mode):
                # A link or a device planted among the logs is never sent.
                log.warning("fetch-logs: skipped %s: not a regular file", path)
                continue
            candidates.append((st.st_mtime, st.st_size, path))
    candidates.sort(key=lambda c: c[0], reverse=True)
    parent = os.path.dirname(os.path.abspath(dest_zip))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    total = 0
    with zipfile.ZipFile(dest_zip, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for mtime, size, path in candidates:
            if total + size > max_bytes:
                continue
            arcname = os.path.relpath(path, log_dir)
            try:
                _add_file(zf, path, arcname, mtime, size)
            except OSError:
                continue
            total += size
    return dest_zip


def _add_file(zf: zipfile.ZipFile, path: str, arcname: str, mtime: float, size: int) -> None:
    """Add the first ``size`` bytes of ``path`` (a live log keeps growing)."""
    stamp = _dt.datetime.fromtimestamp(max(mtime, 315532800.0))  # zip dates start in 1980
    info = zipfile.ZipInfo(arcname, date_time=stamp.timetuple()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    src_fd = folders.open_own(path, os.O_RDONLY)  # swapped for a link since the listing: refused
    with open(src_fd, "rb") as src, zf.open(info, "w") as dst:
        remaining = size
        while remaining > 0:
            chunk = src.read(min(1024 * 1024, remaining))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
