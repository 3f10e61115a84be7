"""Ledger: every fetched task's account, from get-task to the server's acceptance.

The Ledger is where invariant 3 of SPEC.md lives: *every task the Fetcher
receives ends in exactly one accepted result*. It owns

* **backpressure**: the Fetcher ``reserve``\\ s room before get-task (a free
  executor slot, counting the prefetch allowance, and results waiting for
  upload below ``response_queue_threshold``) and ``cancel``\\ s it when no
  task came. A result stays counted until delivery is done with it, so a
  stalled upload path stops fetching. Hence: tasks fetched and not yet
  delivered never exceed ``slots + threshold``.
* **holds**: named reasons to stop taking work (the AC server refused the API
  key, the spool cannot be written, ...). While any hold is set, ``reserve``
  says no; holds are released by whoever set them. The spool hold is set
  when a record cannot be written or a body did not fit, and released by
  the Ledger itself once the spool has room again for the work fetching
  brings: one task at a time while it has room for fewer bodies than there
  are slots (``_watch_spool``).
* **"spool, then queue"**: ``finished`` writes the result record durably and
  only then queues it for delivery.
* **the spool's answers outside a run**: ``recover`` queues, at start, what
  an earlier run left in the spool (a task it took and never finished is
  answered with ``INTERRUPTED``); ``answer_unfinished``, at the shutdown
  deadline, saves the answer of every task still running and leaves it in
  the spool for the next start.
* **both queues**: ``tasks`` (a FIFO the Executor takes from) and ``results``
  (a ``DueQueue`` of ``Delivery`` items: each result carries its own retry
  state and due time).

Locking contract: ``_cond`` guards the counters (``_executing``,
``_results``), ``_holds``, ``_intake_closed`` and ``_closed``. It is never
held while doing disk I/O or calling observers, and every change that can
admit a fetch notifies. ``fetched`` checks ``_intake_closed`` and puts the
task on the queue under the lock, so a stop can never slip between the check
and the put (a task put after the executor's last drain would be lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Union

from . import logs
from .delivery import Delivery
from .duequeue import DueQueue
from .models import Result, Task, new_result_key
from .observers import Observers
from .spool import SPOOL_ERRNOS, ResultSpool, spool_error_reason, task_id_in_record

log = logging.getLogger("acagent.ledger")

#: the answer for a task the agent took but did not finish before it died
INTERRUPTED = (
    "the agent stopped (killed or crashed) before this task finished; "
    "it was not run again (the request may have reached the target)"
)

#: the hold set while the spool folder cannot be written
SPOOL_HOLD = "spool"

#: the hold set while the AC server refuses the API key for uploads
AUTH_HOLD = "auth"


class Ledger:
    """Task accounting and backpressure; see the module docstring.

    For callers (the stages): ``reserve``/``cancel``/``fetched`` (Fetcher),
    ``take_task``/``finished`` (Executor), ``take_result``/``retry_later``/
    ``delivered`` (Uploader); ``hold``/``release``/``holds`` (anyone); and
    ``recover`` (the Pipeline's start), ``close_intake``/``close``/
    ``wait_drained``/``answer_unfinished`` (its stop).
    """

    #: seconds between probe writes while the spool hold is set
    SPOOL_PROBE_INTERVAL = 1.0

    def __init__(
        self,
        *,
        slots: Union[int, Callable[[], int]],
        threshold: int,
        spool: ResultSpool,
        observers: Optional[Observers] = None,
    ) -> None:
        """``slots``: tasks that may be reserved or running at once (executor
        threads and prefetch), or a function that says how many now (the
        executor's size is the runtime settings'; ``slots_changed`` when it
        changes)."""
        if isinstance(slots, int):
            slots = _constant(slots)
        if slots() < 1 or threshold < 1:
            raise ValueError("slots and threshold must be >= 1")
        self.spool = spool
        self.observers = observers if observers is not None else Observers()
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.results: DueQueue[Delivery] = DueQueue()
        #: wakes the Fetcher's ``reserve`` and ``wait_drained``: room and state changes
        self._cond = threading.Condition(threading.RLock())
        self._slots_now: Callable[[], int] = slots
        self._threshold = threshold
        self._executing = 0
        self._results = 0
        self._holds: Dict[str, str] = {}
        self._intake_closed = False
        self._closed = False
        self._next_probe = 0.0
        #: the spool has room for fewer bodies than slots: one task at a time,
        #: each only once its body fits (``_watch_spool``)
        self._one_at_a_time = False
        #: keys of delivered results whose spool files are still to be removed
        #: (``remove_delivered``); a ``None`` only wakes the remover
        self._removals: queue.SimpleQueue[Optional[str]] = queue.SimpleQueue()

    # ------------------------------------------------------------ the Fetcher's side
    def reserve(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for room for one more task; True = reserved."""
        deadline = time.monotonic() + timeout
        self._watch_spool()
        with self._cond:
            ok = self._cond.wait_for(self._has_room, timeout=timeout)
            if not ok or self._closed or self._intake_closed:
                return False
            self._executing += 1
            if not self._one_at_a_time:
                return True
        # Short of space: the task is taken only if its body fits now (the
        # look at the disk is made outside the lock).
        if self._room_for_one(mine=1):
            return True
        with self._cond:
            self._executing -= 1
            self._cond.notify_all()
            self._cond.wait(max(0.0, deadline - time.monotonic()))  # a delivery notifies
        return False

    def _has_room(self) -> bool:
        if self._closed or self._intake_closed:
            return True  # wake up: the answer is "no", at once
        slots = 1 if self._one_at_a_time else self.slots
        return not self._holds and self._executing < slots and self._results < self._threshold

    def cancel(self) -> None:
        """The reservation was not used (no task came back)."""
        with self._cond:
            self._executing -= 1
            self._cond.notify_all()

    def fetched(self, task: Task) -> None:
        """A reserved get-task handed out ``task``: journal it, then queue it or
        answer it at once.

        The journal is written here, on the thread that read the reply, before
        anything else: a kill at any later moment leaves the task's answer for
        the next start.
        """
        task = self._journal(task)
        self.observers.emit("on_task_fetched", task)
        with logs.task_context(task.task_id):
            log.debug("task fetched: %s", task.method)
        answer: Optional[Result] = None
        if task.is_expired():
            answer = Result.agent_error(task, "task expired before execution", failure="expired")
        else:
            with self._cond:
                if self._intake_closed:
                    answer = Result.agent_error(task, "agent shutting down", failure="shutdown")
                else:
                    self.tasks.put(task)
        if answer is not None:
            if answer.failure == "expired":
                log.warning("task %s expired before it was fetched; not run", task.task_id)
            self.finished(answer)

    def _journal(self, task: Task) -> Task:
        """Give ``task`` its result key and journal it in the spool (see
        ``ResultSpool.journal``): if the agent dies before the result is
        saved, the next start answers the task with ``INTERRUPTED``."""
        key = new_result_key()
        task = dataclasses.replace(task, key=key)
        try:
            answer = Result.agent_error(task, INTERRUPTED, failure="interrupted")
            self.spool.journal(key, answer.to_record())
        except OSError as exc:
            # The task still runs; a spool that cannot be written is held and
            # reported (ERROR, /readyz) when its result is saved.
            log.debug("task %s: not journaled: %s", task.task_id, exc)
        return task

    # ------------------------------------------------------------ the Executor's side
    def take_task(self, timeout: float) -> Optional[Task]:
        """The next fetched task (journaled by ``fetched``), or None after ``timeout``."""
        try:
            return self.tasks.get(timeout=timeout)
        except queue.Empty:
            return None

    def take_queued_tasks(self) -> List[Task]:
        """Every task still waiting for a thread (the executor answers them at stop)."""
        taken: List[Task] = []
        while True:
            try:
                taken.append(self.tasks.get_nowait())
            except queue.Empty:
                return taken

    def finished(self, result: Result) -> None:
        """A reserved task has its result: spool it, then queue it for delivery.

        If the spool cannot be written (full, read-only, no permission), the
        result is still queued (it lives in memory until delivered), fetching
        is held until a probe write succeeds, and the reason is logged. A
        body that was never written is reported in the result by the executor.
        """
        with logs.task_context(result.task_id):
            log.debug("result ready: status=%s bytes=%d", result.status_code, result.body_size)
        try:
            durable = self._save(result)
        except (TypeError, ValueError) as exc:
            # A result that cannot be written as a record (an Executor
            # subclass's bug: a value JSON cannot encode). The task must still
            # be answered once, and its reservation released.
            log.error(
                "task %s: its result cannot be recorded (%s: %s); answered with an error result",
                result.task_id,
                type(exc).__name__,
                exc,
            )
            result = Result.agent_error(
                result.fields,
                f"the agent could not record this result ({type(exc).__name__})",
                failure="agent_error",
                key=result.key,
            )
            durable = self._save(result)
        with self._cond:
            self._executing -= 1
            self._results += 1
            self._cond.notify_all()
        self.results.put(Delivery(result, counted=True, durable=durable))
        self.observers.emit("on_result_ready", result)

    def _save(self, result: Result) -> bool:
        try:
            # A result without a body file (an error, an empty body or one kept
            # in the record) spares the spool looking for one.
            self.spool.save(result.key, result.to_record(), has_body=result.body_path is not None)
        except OSError as exc:
            if exc.errno not in SPOOL_ERRNOS:
                log.error("task %s: spool write failed: %s", result.task_id, exc)
            self.hold(SPOOL_HOLD, spool_error_reason(exc) + f": {self.spool.directory}")
            return False
        return True

    # ------------------------------------------------------------ start and deadline
    def recover(self) -> None:
        """Queue what an earlier run left in the spool for this server and key
        (call once, at start, after the spool's origin is set); the file name
        is the key. Records of another server or key stay where they are, for
        their own agent (``ResultSpool.recover``)."""
        spool = self.spool
        removed = spool.clean_orphans()
        if removed:
            log.info("removed %d orphan file(s) from the spool", removed)
        found = spool.recover()
        interrupted = 0  # journals of tasks the earlier run took and never finished
        for key, record in found.records:
            try:
                result = Result.from_record(record)
            except (KeyError, TypeError, ValueError) as exc:
                self._answer_damaged(key, task_id_in_record(record), f"unusable record: {exc}")
                continue
            # The record's own "key" and "bodyPath" are not trusted: the file
            # name says which result this is and where its body lives.
            result.key = key
            if result.body_path is not None:
                result.body_path = str(spool.body_path(key))
            interrupted += result.failure == "interrupted"
            self.adopt(result)
        for key, task_id in found.damaged:
            self._answer_damaged(key, task_id, "record does not parse")
        if found.records:
            log.info("%d result(s) from an earlier run will be re-sent", len(found.records))
        if found.adopted:
            log.warning(
                "%d result(s) in the spool name no AC server (written by an earlier version): "
                "sent to %s and stamped with it",
                found.adopted,
                spool.origin,
            )
        if interrupted:
            log.warning(
                "%d task(s) taken by an earlier run that stopped before finishing them "
                "(killed or crashed) are answered with an error result, not run again",
                interrupted,
            )
        if found.aside:
            log.warning(
                "%d result(s) in %s belong to another AC server or API key and are left there, "
                "not sent: %s; an agent started with that --serverUrl and --apiKey on this "
                "spool folder delivers them",
                sum(found.aside.values()),
                spool.directory,
                "; ".join(f"{n} of {origin}" for origin, n in sorted(found.aside.items())),
            )
        quarantined = spool.quarantined()
        if quarantined:
            log.warning(
                "%d result(s) refused by the AC server or damaged are kept in %s/quarantine: %s",
                len(quarantined),
                spool.directory,
                ", ".join(quarantined[:10]) + (" ..." if len(quarantined) > 10 else ""),
            )

    def _answer_damaged(self, key: str, task_id: Optional[str], why: str) -> None:
        """A damaged record goes to quarantine; its task, if its id can be read,
        is answered with an error result (saved under the same key)."""
        self.spool.quarantine(key, f"damaged spool record: {why}")
        if task_id is None:
            log.error(
                "spool record %s is damaged (%s) and names no task; moved to quarantine", key, why
            )
            return
        log.error(
            "spool record %s of task %s is damaged (%s); moved to quarantine, the task is "
            "answered with an error result",
            key,
            task_id,
            why,
        )
        answer = Result.agent_error(
            {"taskId": task_id},
            "the agent's record of this result was damaged; the result is lost",
            failure="damaged",
            key=key,
        )
        with contextlib.suppress(OSError):  # then it lives in memory until delivered
            self.spool.save(key, answer.to_record(), has_body=False)
        self.adopt(answer)

    def answer_unfinished(self, unfinished: Mapping[str, Task]) -> None:
        """The shutdown deadline passed with these tasks still running (by
        result key; their requests are being cut): each is answered "agent
        shutting down" in the spool, delivered by the next start, and its
        reservation is released."""
        for key, task in unfinished.items():
            result = Result.agent_error(task, "agent shutting down", failure="shutdown", key=key)
            self.spool.discard_body(key)
            with contextlib.suppress(OSError):
                self.spool.save(key, result.to_record())
            with self._cond:
                self._executing -= 1
                self._cond.notify_all()
            self.observers.emit("on_result_ready", result)

    # ------------------------------------------------------------ the Uploader's side
    def adopt(self, result: Result) -> None:
        """Queue a result found in the spool at start (not counted by backpressure)."""
        self.results.put(Delivery(result, counted=False))

    def take_result(self, timeout: float) -> Optional[Delivery]:
        return self.results.get(timeout)

    def retry_later(self, delivery: Delivery, wait: float) -> None:
        """Delivery of this result failed for now: it is due again in ``wait`` seconds."""
        if not delivery.durable:
            # A retry is a good moment to make it durable, if the disk is back.
            delivery.durable = self._save(delivery.result)
        self.results.put(delivery, wait)

    def delivered(self, delivery: Delivery) -> None:
        """Delivery is done with this result: the server accepted it (or quarantine took it).

        Its spool files are removed later, by ``remove_delivered`` on another
        thread: an unlink can wait milliseconds behind other threads' fsyncs,
        and the Uploader's thread is the one that keeps the AC link busy. A
        record whose removal has not happened yet when the agent dies is sent
        again at the next start (at-least-once, as ``ResultSpool`` says). It
        leaves the spool's count at once (``ResultSpool.delivered``).
        """
        self.spool.delivered(delivery.result.key)
        self._removals.put(delivery.result.key)
        if delivery.counted:
            with self._cond:
                self._results -= 1
                self._cond.notify_all()

    def remove_delivered(self, timeout: float) -> int:
        """Remove the spool files of delivered results; how many were removed.

        Waits up to ``timeout`` for the first one (``timeout <= 0``: no wait),
        then takes every one queued. Called in a loop by the Uploader's
        cleanup thread, and once more by the Pipeline after its stages ended.
        """
        try:
            first = self._removals.get(timeout=timeout if timeout > 0 else None, block=timeout > 0)
        except queue.Empty:
            return 0
        keys = [first]
        with contextlib.suppress(queue.Empty):
            while True:
                keys.append(self._removals.get_nowait())
        removed = 0
        for key in keys:
            if key is None:
                continue
            try:
                self.spool.remove(key)
            except OSError as exc:  # the server has it; a leftover record is only re-sent
                log.warning("could not remove delivered result %s from the spool: %s", key, exc)
            else:
                removed += 1
        return removed

    def wake_remover(self) -> None:
        """End a ``remove_delivered`` wait now (at stop)."""
        self._removals.put(None)

    # ------------------------------------------------------------ holds
    def hold(self, reason_key: str, message: str) -> None:
        """Stop taking work for ``reason_key`` (idempotent; the message may change)."""
        with self._cond:
            previous = self._holds.get(reason_key)
            self._holds[reason_key] = message
        if previous != message:
            if previous is None:
                log.error("fetching paused: %s", message)
            self.observers.emit("on_hold", reason_key, message)

    def release(self, reason_key: str) -> None:
        with self._cond:
            had = self._holds.pop(reason_key, None)
            if had is not None:  # called after every delivery: most calls change nothing
                self._cond.notify_all()
        if had is not None:
            log.warning("fetching resumed (%s cleared)", reason_key)
            self.observers.emit("on_hold", reason_key, None)

    def holds(self) -> Dict[str, str]:
        with self._cond:
            return dict(self._holds)

    def _watch_spool(self) -> None:
        """Set the spool hold when a body did not fit; release it once there is room.

        A body that ran out of space (the spool says so: ``take_space_failure``)
        holds fetching, so no more tasks meet the same full disk. While held,
        at most every ``SPOOL_PROBE_INTERVAL`` seconds, the hold is released
        once a probe write works and the file system has room for a body (and
        its gzip copy, ``ResultSpool.tasks_with_room``), or nothing of the
        agent's is left in the spool (waiting frees no more space). A small
        write alone proves only that a few bytes fit: released on that,
        fetching would pause again at the next body, again and again.

        With room for fewer bodies than there are slots, tasks are taken one
        at a time, each once its body fits (``reserve``), until there is room
        for every slot's: so the disk is shared out instead of overrun.
        """
        now = time.monotonic()
        shortage = self.spool.take_space_failure()
        if shortage is not None:
            with self._cond:
                self._next_probe = now + self.SPOOL_PROBE_INTERVAL
            self.hold(SPOOL_HOLD, shortage)
            return
        with self._cond:
            held = SPOOL_HOLD in self._holds
            if not held and not self._one_at_a_time:
                return
            if now < self._next_probe:
                return
            self._next_probe = now + self.SPOOL_PROBE_INTERVAL
        fit = self.spool.tasks_with_room()
        every_slot = fit is None or fit >= self.slots
        if held and not (every_slot or self._room_for_one(fit)):
            return
        if held and not self.spool.probe_writable():
            return
        with self._cond:
            changed = self._one_at_a_time != (not every_slot)
            self._one_at_a_time = not every_slot
            self._cond.notify_all()
        if held:
            self.release(SPOOL_HOLD)
        if changed and not every_slot:
            log.warning(
                "the spool folder has room for the bodies of %d task(s), not of every "
                "executor slot (%d): tasks are taken one at a time until it has",
                fit or 0,
                self.slots,
            )
        elif changed:
            log.info("the spool folder has room for every executor slot again")

    def _room_for_one(self, fit: Optional[int] = None, *, mine: int = 0) -> bool:
        """Whether one more task's body fits in the spool now, or nothing of the
        agent's is in it (then waiting would bring no more room). ``mine``:
        reservations of the caller already counted in ``_executing``."""
        if fit is None:
            fit = self.spool.tasks_with_room()
        if fit is None or fit >= 1:
            return True
        with self._cond:
            idle = self._executing == mine and self._results == 0
        return idle and self.spool.size() == 0

    # ------------------------------------------------------------ stop and state
    def close_intake(self) -> None:
        """No task is queued for execution from now on; late ones are answered at once."""
        with self._cond:
            self._intake_closed = True
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiter for good (the end of a stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.results.close()

    def slots_changed(self) -> None:
        """The number of slots changed (globalConfig ``poolSize``): a waiting
        ``reserve`` looks again."""
        with self._cond:
            self._cond.notify_all()

    @property
    def slots(self) -> int:
        return max(1, self._slots_now())

    @property
    def executing(self) -> int:
        """Tasks reserved or running (a result not yet made)."""
        return self._executing

    @property
    def waiting_results(self) -> int:
        """Results of this run not yet delivered."""
        return self._results

    def outstanding(self) -> int:
        """Tasks fetched in this run and not yet done with."""
        with self._cond:
            return self._executing + self._results

    def wait_drained(self, timeout: Optional[float]) -> bool:
        """Wait until nothing fetched in this run is outstanding."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._executing + self._results == 0, timeout=timeout
            )


def _constant(value: int) -> Callable[[], int]:
    return lambda: value
