"""ThreadCrashHook: an agent thread that dies is never silent.

Every stage loop catches what its steps raise, so a thread that still dies
has met a bug or a ``BaseException``. Python's default ``threading.excepthook``
prints such a traceback to stderr only (and ignores ``SystemExit``): no log
record, and the process neither works nor exits. This hook logs it through
``logging`` with the thread name and tells its owner (the Pipeline marks the
agent unhealthy and asks to stop; the CLI exits non-zero naming the thread).
Threads that are not the agent's go to the previous hook, which is restored
by ``uninstall``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

log = logging.getLogger("acagent.threadcrash")

#: every thread the agent starts has a name with this prefix
AGENT_THREAD_PREFIX = "acagent-"


class ThreadCrashHook:
    def __init__(self, on_crash: Callable[[str, BaseException], None]) -> None:
        self._on_crash = on_crash
        self._previous: Optional[Callable[[Any], Any]] = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = threading.excepthook
            threading.excepthook = self._hook

    def uninstall(self) -> None:
        previous, self._previous = self._previous, None
        # Only undo our own installation: a later hook stays in place.
        if previous is not None and threading.excepthook == self._hook:
            threading.excepthook = previous

    def _hook(self, args: Any) -> None:
        thread = args.thread
        name = thread.name if thread is not None else "?"
        if not name.startswith(AGENT_THREAD_PREFIX) or args.exc_value is None:
            if self._previous is not None:
                self._previous(args)
            return
        log.critical(
            "thread %s died: %s: %s",
            name,
            args.exc_type.__name__,
            args.exc_value,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )
        try:
            self._on_crash(name, args.exc_value)
        except Exception:  # the hook itself must never raise
            log.exception("crash handler failed")
