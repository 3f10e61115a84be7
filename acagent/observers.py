"""Observers: who hears about the life of a task, and how they are told.

A stage or the ``Ledger`` *emits* an event; every registered ``Observer``
gets the matching hook called. Metrics, the JSON-lines metrics file,
readiness and ``globalConfig`` are observers: the stages never call them
directly. The base class has a no-op for every hook, so an observer
overrides only what it cares about (the shape of Dramatiq's middleware).

An observer that raises is logged and skipped; it never breaks the stage
that emitted the event. Hooks run on the emitting thread, synchronously:
keep them short and non-blocking.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional, Tuple

if TYPE_CHECKING:
    from .models import Result, Task

log = logging.getLogger("acagent.observers")


class Observer:
    """Base class of everything that watches the agent. Every hook is a no-op."""

    def on_task_fetched(self, task: Task) -> None:
        """get-task handed out ``task`` (before it is queued for execution)."""

    def on_fetch_finished(self, seconds: float, got_task: bool) -> None:
        """One get-task exchange finished (successfully, with or without a task)."""

    def on_task_executed(self, result: Result, seconds: float) -> None:
        """The executor finished a task (``result`` may be an error result)."""

    def on_result_ready(self, result: Result) -> None:
        """A result is on disk and queued for delivery."""

    def on_result_delivered(self, result: Result, via: str, seconds: float) -> None:
        """The AC server accepted ``result``; ``via`` names the path."""

    def on_result_retry(self, result: Result, reason: str, wait: float) -> None:
        """A delivery attempt failed; the result is due again in ``wait`` seconds."""

    def on_result_quarantined(self, result: Result, reason: str) -> None:
        """The server refused the content for good; the body went to quarantine."""

    def on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        """One HTTP exchange with the AC server (or S3) ended: status or ``"error"``."""

    def on_hold(self, reason_key: str, message: Optional[str]) -> None:
        """Fetching paused (``message``) or resumed (``None``) for ``reason_key``."""

    def on_stage_failure(self, stage: str, exc: BaseException) -> None:
        """A stage loop caught an unexpected error (it goes on after a pause)."""


class Observers:
    """The fan-out: emits each event to every observer, isolating their failures.

    ``add`` may be called at any time; emitting reads a snapshot, so adding
    never blocks a stage.
    """

    def __init__(self, observers: Tuple[Observer, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._observers: Tuple[Observer, ...] = tuple(observers)

    def add(self, observer: Observer) -> None:
        with self._lock:
            self._observers = (*self._observers, observer)

    def remove(self, observer: Observer) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def __iter__(self) -> Iterator[Observer]:
        return iter(self._observers)

    def emit(self, hook: str, *args: Any) -> None:
        """Call ``hook(*args)`` on every observer; an observer's error is logged only."""
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:  # a broken observer must not break the stage
                log.exception("observer %s failed in %s", type(observer).__name__, hook)
