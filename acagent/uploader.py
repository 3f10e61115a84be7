"""Uploader: sends results back to the AC server.

One thread by default. A body of 1..512,000 bytes goes inline (base64) in
put-result; a larger one is gzip-compressed from its spool file to a private
work file and sent to upload-result (``uploadToAc`` true) or to S3 via a
presigned URL (false). A result's spool record and body are removed only once
the server accepted it.

A result whose upload exhausts the retry budget (AC down for minutes) is
*parked*: it stays in the spool and this thread re-sends the oldest parked
result with a backoff of 5 s doubling to 5 min, between fresh results, until
it goes through. Results left in the spool by an earlier run are parked at
start. ``deliver(result)`` is the hook a subclass overrides.
"""

from __future__ import annotations

import collections
import gzip
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Deque, Optional

from .config import INLINE_BODY_LIMIT
from .errors import ACError, ACHTTPError, ACRateLimitError, AgentStopping, BadReplyError
from .models import (
    Result,
    error_payload,
    inline_payload,
    s3_payload,
    upload_file_name,
    upload_task_part,
)

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("acagent.uploader")


@dataclass
class _Item:
    result: Result
    #: counted by the backpressure (fetched in this run), so release it when done
    counted: bool


class PermanentUploadError(ACError):
    """The server refused a result for good (a 4xx that is not a 429)."""


class Uploader(threading.Thread):
    POLL = 0.5
    REDELIVER_MIN = 5.0
    REDELIVER_MAX = 300.0
    #: gzip level for upload-result: fast, since one thread compresses everything
    COMPRESS_LEVEL = 3
    COPY_CHUNK = 1 << 20

    def __init__(self, pipeline: Pipeline, *, name: str = "acagent-uploader") -> None:
        super().__init__(name=name, daemon=True)
        self.pipeline = pipeline
        self.config = pipeline.config
        self.client = pipeline.client
        self.upload_to_ac = self.config.upload_to_ac
        self.running = False
        self._parked: Deque[_Item] = collections.deque()
        self._parked_lock = threading.Lock()
        self._next_redelivery = 0.0
        self._redeliver_wait = self.REDELIVER_MIN
        #: set while this thread is idle (nothing in hand); used by drain()
        self.idle = threading.Event()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.running = True
        super().start()

    def stop(self) -> None:
        self.running = False

    def park_from_spool(self, result: Result) -> None:
        """Queue a result found in the spool at start for redelivery."""
        with self._parked_lock:
            self._parked.append(_Item(result, counted=False))

    @property
    def parked(self) -> int:
        return len(self._parked)

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        results: queue.Queue[Result] = self.pipeline.result_queue
        while self.running:
            item = self._due_parked()
            if item is None:
                self.idle.set()
                try:
                    result = results.get(timeout=self._poll_timeout())
                except queue.Empty:
                    continue
                self.idle.clear()
                item = _Item(result, counted=True)
            else:
                self.idle.clear()
            self._send_item(item)
        self.idle.set()
        log.debug("uploader stopped")

    def _poll_timeout(self) -> float:
        if self._parked:
            return max(0.01, min(self.POLL, self._next_redelivery - time.monotonic()))
        return self.POLL

    def _due_parked(self) -> Optional[_Item]:
        with self._parked_lock:
            if self._parked and time.monotonic() >= self._next_redelivery:
                return self._parked.popleft()
        return None

    def _send_item(self, item: _Item) -> None:
        result = item.result
        started = time.monotonic()
        with self.pipeline.task_log_context(result.task_id):
            via: Optional[str]
            try:
                via = self.deliver(result)
            except AgentStopping:
                self._park(item, front=True, quiet=True)
                return
            except PermanentUploadError as exc:
                via = self._deliver_fallback(result, exc)
                if via is None:
                    self._done(item, via=None)
                    return
            except ACError as exc:
                log.error(
                    "upload of task %s failed after retries (%s); kept in spool",
                    result.task_id,
                    exc,
                )
                self._park(item, front=False)
                return
            except Exception:
                log.exception("unexpected error uploading task %s; kept in spool", result.task_id)
                self._park(item, front=False)
                return
        self.pipeline.metrics.upload_seconds.observe(time.monotonic() - started)
        self._redeliver_wait = self.REDELIVER_MIN
        self._next_redelivery = 0.0
        self._done(item, via=via)

    def _park(self, item: _Item, *, front: bool, quiet: bool = False) -> None:
        with self._parked_lock:
            if front:
                self._parked.appendleft(item)
            else:
                self._parked.append(item)
        self._next_redelivery = time.monotonic() + self._redeliver_wait
        if not quiet:
            log.warning(
                "%d result(s) parked; next redelivery in %.0fs",
                len(self._parked),
                self._redeliver_wait,
            )
        self._redeliver_wait = min(self._redeliver_wait * 2, self.REDELIVER_MAX)

    def _done(self, item: _Item, *, via: Optional[str]) -> None:
        self.pipeline.result_delivered(item.result, via=via, counted=item.counted)

    def _deliver_fallback(self, result: Result, exc: Exception) -> Optional[str]:
        """The body could not be delivered for good: send an error result instead."""
        log.error(
            "task %s: server refused the result (%s); sending an error result", result.task_id, exc
        )
        if result.is_error:
            return None
        fallback = Result.agent_error(
            result.fields, f"upload failed: {exc}", failure="upload_failed"
        )
        try:
            self.client.put_result(error_payload(fallback, self.client.version))
        except ACError as again:
            log.error("task %s: error result refused too (%s); dropped", result.task_id, again)
            return None
        return "error"

    # -- one result --------------------------------------------------------
    def deliver(self, result: Result) -> str:
        """Send one result; returns how it went (inline, empty, upload, s3, error, logs).

        Raises ``PermanentUploadError`` if the server refuses it for good and
        ``ACError`` when the retry budget is spent.
        """
        try:
            return self._deliver(result)
        except (ACRateLimitError, AgentStopping):
            raise
        except ACHTTPError as exc:
            if exc.status < 500:
                raise PermanentUploadError(str(exc)) from exc
            raise
        except BadReplyError as exc:
            raise PermanentUploadError(str(exc)) from exc

    def _deliver(self, result: Result) -> str:
        client, version = self.client, self.client.version
        if result.logs_zip is not None:
            client.upload_logs(result.logs_zip, upload_task_part(result, version, zipped=True))
            return "logs"
        if result.is_error:
            client.put_result(error_payload(result, version))
            return "error"
        if result.body_size == 0 or result.body_path is None:
            client.put_result(inline_payload(result, version, b""))
            return "empty"
        if not os.path.exists(result.body_path):
            lost = Result.agent_error(
                result.fields, "result body lost from the spool", failure="lost"
            )
            client.put_result(error_payload(lost, version))
            return "error"
        if result.body_size <= INLINE_BODY_LIMIT:
            with open(result.body_path, "rb") as fh:
                body = fh.read(INLINE_BODY_LIMIT + 1)
            client.put_result(inline_payload(result, version, body))
            return "inline"
        if self.upload_to_ac:
            self._upload_to_ac(result)
            return "upload"
        self._upload_to_s3(result)
        return "s3"

    def _upload_to_ac(self, result: Result) -> None:
        assert result.body_path is not None
        work = os.path.join(self.pipeline.work_dir, f"{result.key}.gz")
        zipped = True
        try:
            self._compress(result.body_path, work)
        except OSError as exc:
            log.warning("task %s: compression failed (%s); sending raw", result.task_id, exc)
            zipped = False
        try:
            self.client.upload_result(
                work if zipped else result.body_path,
                upload_file_name(result.task_id, zipped=zipped),
                "application/zip" if zipped else "text/plain",
                upload_task_part(result, self.client.version, zipped=zipped),
            )
        finally:
            _remove_quietly(work)

    def _compress(self, source: str, target: str) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(source, "rb") as src, os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=self.COMPRESS_LEVEL) as gz:
                shutil.copyfileobj(src, gz, self.COPY_CHUNK)

    def _upload_to_s3(self, result: Result) -> None:
        assert result.body_path is not None
        put_url, get_url = self.client.get_upload_url(f"{result.task_id}{uuid.uuid4().hex}")
        content_type = next(
            (v for k, v in result.response_headers.items() if k.lower() == "content-type"), None
        )
        self.client.put_s3(put_url, result.body_path, content_type=content_type)
        self.client.put_result(s3_payload(result, self.client.version, get_url))


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort
        log.debug("could not remove %s: %s", path, exc)
