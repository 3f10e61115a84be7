"""Fetcher: the one thread that asks the AC server for tasks.

It asks only when the agent has somewhere to run the answer (see
``backpressure.py``), so fetched work never piles up. An empty reply waits a
poll interval with jitter (today's agent re-polls at once and burns its rate
budget); a 5xx or network error backs off 5 s doubling to 600 s, reset on
success; a 429 waits what the server asks. Every wait ends when the agent
stops. ``fetch_one`` is the hook a subclass overrides to take tasks from
elsewhere (see ``examples/jsonl_fetcher.py``).
"""

from __future__ import annotations

import logging
import random
import threading
from typing import TYPE_CHECKING, Optional

from .errors import ACConnectionError, ACHTTPError, ACRateLimitError, BadReplyError, TaskError
from .models import Result, Task, echo_fields

if TYPE_CHECKING:
    from .pipeline import Pipeline

log = logging.getLogger("acagent.fetcher")


class Fetcher(threading.Thread):
    #: first wait after a 5xx / network failure, doubled per failure up to BACKOFF_MAX
    BACKOFF_MIN = 5.0
    BACKOFF_MAX = 600.0
    #: how long one capacity wait lasts before the stop flag is checked again
    CAPACITY_POLL = 0.5
    #: a "Too many concurrent requests" 429 without a wait header waits 0..this
    CONCURRENCY_WAIT_MAX = 10.0

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(name="acagent-fetcher", daemon=True)
        self.pipeline = pipeline
        self.config = pipeline.config
        self.running = False
        #: set by stop(): every wait of this thread ends at once
        self.stopping = threading.Event()
        self._backoff = self.BACKOFF_MIN
        self._rng = random.Random()

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self.running = True
        super().start()

    def stop(self) -> None:
        self.running = False
        self.stopping.set()

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        bp = self.pipeline.backpressure
        while self.running:
            if not bp.reserve(timeout=self.CAPACITY_POLL):
                continue
            if not self.running:
                bp.cancel()
                break
            try:
                task = self.fetch_one()
            except TaskError as exc:
                self._answer_malformed(exc)  # uses or cancels the reservation
                continue
            except Exception as exc:  # noqa: BLE001 - the loop must survive any failure
                bp.cancel()
                self._on_error(exc)
                continue
            except BaseException:
                bp.cancel()  # the thread dies; a stop must not wait for this reservation
                raise
            if task is None:
                bp.cancel()
                self._backoff = self.BACKOFF_MIN
                self.wait(self.idle_wait())
                continue
            self._backoff = self.BACKOFF_MIN
            self.pipeline.task_fetched(task)
        log.debug("fetcher stopped")

    def fetch_one(self) -> Optional[Task]:
        """Get one task, or None if there is none now. Override to fetch elsewhere."""
        with self.pipeline.metrics.get_task_seconds.time():
            return self.pipeline.client.get_task()

    def idle_wait(self) -> float:
        """Seconds to wait after an empty reply: the poll interval +- jitter."""
        base = self.config.poll_interval
        jitter = self.config.poll_jitter
        return max(0.0, base + self._rng.uniform(-jitter, jitter))

    def wait(self, seconds: float) -> bool:
        """Sleep unless stopping; True if the sleep was cut short."""
        return self.stopping.wait(seconds)

    # -- failures ----------------------------------------------------------
    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, ACRateLimitError):
            wait = exc.retry_after
            if wait is None:
                wait = (
                    self._rng.uniform(0.0, self.CONCURRENCY_WAIT_MAX)
                    if exc.concurrency
                    else self.BACKOFF_MIN
                )
            log.warning("get-task rate limited; waiting %.1fs", wait)
            self.wait(wait)
            return
        if isinstance(exc, BadReplyError) or (isinstance(exc, ACHTTPError) and exc.status < 500):
            log.error("get-task: %s; waiting %.0fs", exc, self.BACKOFF_MIN)
            self.wait(self.BACKOFF_MIN)
            return
        if isinstance(exc, (ACHTTPError, ACConnectionError)):
            wait = self._backoff
            self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)
            log.warning("get-task failed (%s); backing off %.0fs", exc, wait)
            self.wait(wait)
            return
        log.exception("fetcher: unexpected error; waiting %.0fs", self.BACKOFF_MIN)
        self.wait(self.BACKOFF_MIN)

    def _answer_malformed(self, exc: TaskError) -> None:
        """A task we cannot run but can name gets an error result; else one log line."""
        if exc.task_id is None:
            self.pipeline.backpressure.cancel()
            log.error("skipped a task without a usable taskId: %s", exc.reason)
            return
        log.warning("task %s is malformed: %s", exc.task_id, exc.reason)
        fields = echo_fields(exc.raw) or {"taskId": exc.task_id}
        fields["taskId"] = exc.task_id
        self.pipeline.task_finished(
            Result.agent_error(fields, f"malformed task: {exc.reason}", failure="malformed")
        )
