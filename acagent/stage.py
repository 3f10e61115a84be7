"""The contract every stage is built on: ``StageContext`` and ``Stage``.

A stage never sees the ``Pipeline``. It is constructed with one frozen
``StageContext`` holding the few collaborators a stage may use, and it owns
its threads (a stage *has* threads; it is not one, so no name of ours can
clash with a ``threading.Thread`` internal such as ``_handle``).

``Stage``'s contract, in the five parts of ``socketserver``'s:

For callers (the Pipeline, or a test):
    ``start()``, ``stop()`` (stop taking new work; finish what is in hand),
    ``join(timeout) -> bool`` (True when every thread ended),
    ``is_alive()``, ``dead_threads()`` (liveness: threads that ended early).

May be overridden:
    each stage's own hooks, which a subclass replaces outright: ``Fetcher``'s
    ``fetch_one`` and ``idle_wait``; ``Executor``'s ``execute``,
    ``prepare_headers``, ``collect_logs``; ``Uploader``'s ``deliver`` and
    ``compress`` (see each class). ``Stage`` itself has two, empty in the base:
    ``start_threads()`` (spawn the stage's threads) and ``on_stop()`` (extra
    stop work, called by ``stop()`` after ``stopping`` is set).

For subclasses:
    ``ctx``, ``config``, ``spawn(target, name)``, ``run_loop(step)`` (a loop
    that survives any error in ``step``: logged, reported to observers, backed
    off as ``ctx.retry_policy.stage_failure`` says), ``wait(seconds)``
    (interruptible), ``stopping`` (the Event that ``stop()`` sets).

Class variables that may be overridden:
    ``name`` (the prefix of the stage's thread names) and ``WAIT_SLICE`` (the
    longest single sleep of ``wait``); each stage adds its tuning ones (polls and
    pauses, listed in its class docstring). Any other attribute is private.

May be extended, do not override (call ``super()`` first, or the stage loses
what the base does there):
    ``__init__(ctx)``, and in the three stages ``start_threads()`` and
    ``on_stop()`` (the base stage's threads and its stop work);
    ``Executor.request_target`` holds the per-task allow-list check, so an
    override that skips ``super()`` lets a task reach any host; ``start()``,
    ``stop()``, ``join()`` are for callers: extend ``start_threads``/``on_stop``
    instead.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, List

from .ac.client import ACClient
from .ac.retry import RetryPolicy
from .config import AgentConfig
from .globalconfig import RuntimeSettings
from .ledger import Ledger
from .observers import Observers
from .spool import ResultSpool

log = logging.getLogger("acagent.stage")


@dataclass(frozen=True)
class StageContext:
    """What a stage may use. Frozen: a stage cannot rewire its neighbours."""

    config: AgentConfig
    client: ACClient
    ledger: Ledger
    spool: ResultSpool
    #: private scratch folder of this run (compressed uploads, log zips)
    work_dir: str
    #: the one stop signal: set when the agent must stop at once (deadline or
    #: second signal); every wait, retry sleep and running request ends
    abort: threading.Event
    observers: Observers
    settings: RuntimeSettings
    #: every retry and backoff schedule of the stages
    retry_policy: RetryPolicy = RetryPolicy()


class Stage:
    """Base of the three stages; see the module docstring for the contract."""

    #: prefix of this stage's thread names (``acagent-<name>``)
    name = "stage"
    #: longest single sleep in ``wait`` before the abort signal is looked at again
    #: (``stop()`` ends a wait at once; a shorter slice only costs idle wakeups)
    WAIT_SLICE = 1.0

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        #: set by ``stop()``: every wait of this stage's loops ends
        self.stopping = threading.Event()
        self._threads: List[threading.Thread] = []
        self._started = False

    # ------------------------------------------------------------ for callers
    def start(self) -> None:
        if self._started:
            raise RuntimeError(f"{type(self).__name__} can be started once")
        self._started = True
        self.start_threads()

    def stop(self) -> None:
        """Stop taking new work; what is in hand is finished (see each stage)."""
        self.stopping.set()
        self.on_stop()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every thread of this stage; True if all ended."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not self.is_alive()

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def dead_threads(self) -> List[str]:
        """Names of threads that ended although the stage was not stopped."""
        if self.stopping.is_set():
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    # ------------------------------------------------------------ may be overridden
    def start_threads(self) -> None:
        """Spawn this stage's threads (``spawn``). The default spawns none."""

    def on_stop(self) -> None:
        """Called by ``stop()`` after ``stopping`` is set."""

    # ------------------------------------------------------------ for subclasses
    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a named daemon thread that belongs to this stage."""
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if cut short by ``stop()`` or the abort signal."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.stopping.wait(min(left, self.WAIT_SLICE)) or self.ctx.abort.is_set():
                return True

    def run_loop(self, step: Callable[[], None]) -> None:
        """Call ``step`` until ``stop()``; an error in it is logged and backed off
        (``stage_failure``, per error in a row), never fatal."""
        failures = 0
        while not self.stopping.is_set():
            try:
                step()
            except Exception as exc:  # the loop must survive anything a step raises
                failures += 1
                pause = self.ctx.retry_policy.stage_failure.wait(failures)
                log.exception("%s: unexpected error; going on in %.1fs", self.name, pause)
                self.ctx.observers.emit("on_stage_failure", self.name, exc)
                self.wait(pause)
            else:
                failures = 0
