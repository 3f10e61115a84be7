"""The JSON-lines metrics file of today's agent (DataDog format).

One line per measurement, in a daily file ``<log_dir>/metrics/metrics<index>.json``::

    {"@timestamp": 1732665600000, "metric_name": "http.request.duration_ms", "value": 12.5,
     "tags": {"task_id": "...", "operation": "get-task", "url": "...", ...}}

The line format and the file names are those of today's agent, so existing
log shippers keep working. The Prometheus metrics are ``acagent.metrics``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import threading
import time
from types import TracebackType
from typing import Dict, List, Mapping, Optional, Type, Union
from urllib.parse import urlsplit

from . import folders
from .config import default_base_dir
from .logs import OwnFileHandler, safe_url

__all__ = ["MetricsFileWriter", "default_metrics_path", "request_tags"]

log = logging.getLogger(__name__)

Number = Union[int, float]


def default_metrics_path(index: str = "_prod", log_dir: Optional[str] = None) -> str:
    """``<log_dir>/metrics/metrics<index>.json``; ``log_dir`` defaults to
    ``<state>/log`` (``folders.default_base_dir``)."""
    base = log_dir or os.path.join(default_base_dir(), "log")
    return os.path.join(base, "metrics", f"metrics{index}.json")


def request_tags(
    task_id: str,
    operation: str,
    url: str,
    method: str,
    status_code: Union[int, str, None],
    **extra: object,
) -> Dict[str, str]:
    """Tags of an ``http.request.duration_ms`` metric, as today's agent writes them.

    The url loses its query string, fragment and credentials; ``domain`` is its host.
    """
    try:
        domain = urlsplit(url).hostname or ""
    except ValueError:
        domain = ""
    tags = {
        "task_id": str(task_id),
        "operation": str(operation),
        "url": safe_url(url),
        "domain": domain,
        "method": str(method).upper(),
        "status_code": "" if status_code is None else str(status_code),
    }
    for key, value in extra.items():
        tags[str(key)] = str(value)
    return tags


class MetricsFileWriter:
    """Appends ``{"@timestamp", "metric_name", "value", "tags"}`` lines to a daily file.

    Lines are buffered and written by a flush thread every ``flush_interval``
    seconds (``flush_interval=0``: written on every call, no thread). The file
    rotates at midnight; ``retention_days`` old files are kept (0 = all).
    """

    def __init__(
        self,
        path: str,
        *,
        retention_days: int = 7,
        flush_interval: float = 1.0,
        max_buffer: int = 10_000,
    ) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        folders.own_folder("log_dir", directory)
        self._handler = OwnFileHandler(path, backup_count=max(0, retention_days))
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._buffer: List[str] = []
        self._buffer_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._max_buffer = max(1, max_buffer)
        self._flush_interval = flush_interval
        self._stop = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        if flush_interval > 0:
            self._thread = threading.Thread(
                target=self._run, name="acagent-metrics-file", daemon=True
            )
            self._thread.start()

    def write_metric(
        self,
        name: str,
        value: Number,
        tags: Optional[Mapping[str, object]] = None,
        *,
        timestamp_ms: Optional[int] = None,
    ) -> None:
        if self._closed:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric value must be a number, got {value!r}")
        if not math.isfinite(value):
            return
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        line = json.dumps(
            {
                "@timestamp": ts,
                "metric_name": str(name),
                "value": value,
                "tags": {str(k): str(v) for k, v in (tags or {}).items()},
            }
        )
        with self._buffer_lock:
            self._buffer.append(line)
            full = len(self._buffer) >= self._max_buffer
        if full or self._thread is None:
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            with self._buffer_lock:
                lines, self._buffer = self._buffer, []
            if not lines:
                return
            record = logging.LogRecord(
                "acagent.metrics.file", logging.INFO, __file__, 0, "\n".join(lines), None, None
            )
            self._handler.handle(record)

    def _run(self) -> None:
        while not self._stop.wait(self._flush_interval):
            try:
                self.flush()
            except Exception:  # keep flushing after a transient disk error
                log.warning("metrics file: write failed", exc_info=True)

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()
        self._handler.close()

    def __enter__(self) -> MetricsFileWriter:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
