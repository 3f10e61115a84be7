"""Runtime settings, and the ``globalConfig`` the AC server pushes inside tasks.

``RuntimeSettings`` holds the few settings that may change while the agent
runs (TLS verification, where large bodies go, the executor's size). The
stages read them when they need them; nobody writes another stage's
attributes from a foreign thread.

``GlobalConfigObserver`` is the observer that applies a task's
``globalConfig`` (docs/protocol.md): each key only if present, valid and
changed. Today's agent resets the settings a server leaves out: a bug not
copied. Unknown keys are ignored silently (newer servers may add some). A
value of the wrong type or out of range (``value_problem``: the ranges of
the matching flags) is logged in one line, once until it changes, and the
other keys are applied all the same.
"""

from __future__ import annotations

import logging
import reprlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Union

from . import logs
from .observers import Observer

if TYPE_CHECKING:
    from .config import AgentConfig

log = logging.getLogger("acagent.globalconfig")

#: a TLS ``verify`` value as requests takes it: a bool or a CA bundle path
Verify = Union[bool, str]

#: the globalConfig keys that are switches
BOOL_KEYS = ("debugMode", "verifyCert", "uploadToAC")
#: the whole-number keys and their ranges: those AgentConfig.validate gives
#: the matching settings (poolSize: executor_pool_size, rateLimitPerMin:
#: rate_limit_per_min), so the server cannot set what a flag may not
INT_RANGES = {"poolSize": (1, 2000), "rateLimitPerMin": (0, 10_000_000)}


def value_problem(key: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a usable value of the globalConfig ``key``, or None
    (an unknown key has none: it is ignored)."""
    if key in BOOL_KEYS:
        return None if isinstance(value, bool) else "must be true or false"
    if key in INT_RANGES:
        low, high = INT_RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be a whole number from {low} to {high}"
    return None


#: shows a value in a log line: a 400-digit number or a long string, shortened
_shown = reprlib.Repr()
_shown.maxlong = _shown.maxstring = 40


class RuntimeSettings:
    """Settings that may change at run time; every read and write is atomic.

    Each is held here alone: the AC client reads ``verify`` from here, the
    Ledger and the Executor ``pool_size``.
    """

    def __init__(
        self,
        *,
        verify: Verify,
        upload_to_ac: bool,
        pool_size: int,
        verify_for: Callable[[bool], Verify],
    ) -> None:
        self._lock = threading.Lock()
        self._verify = verify
        self._upload_to_ac = upload_to_ac
        self._pool_size = pool_size
        self._verify_for = verify_for

    @classmethod
    def of(cls, config: AgentConfig) -> RuntimeSettings:
        """The settings as ``config`` starts them."""
        return cls(
            verify=config.tls_verify,
            upload_to_ac=config.upload_to_ac,
            pool_size=config.executor_pool_size,
            verify_for=config.tls_verify_for,
        )

    @property
    def verify(self) -> Verify:
        return self._verify

    @property
    def upload_to_ac(self) -> bool:
        return self._upload_to_ac

    @property
    def pool_size(self) -> int:
        return self._pool_size

    def set_verify(self, enabled: bool) -> None:
        """Turn verification on or off; "on" keeps the configured CA bundle."""
        with self._lock:
            self._verify = self._verify_for(enabled)

    def set_upload_to_ac(self, enabled: bool) -> None:
        with self._lock:
            self._upload_to_ac = enabled

    def set_pool_size(self, size: int) -> None:
        with self._lock:
            self._pool_size = size


class GlobalConfigObserver(Observer):
    """Applies ``globalConfig`` from fetched tasks to the runtime settings.

    ``on_pool_size(n)`` and ``on_rate(n)`` are called for those keys, after
    the settings changed (the Pipeline passes the Ledger's wake-up for a
    new size and the rate limiter's setter).
    """

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        on_pool_size: Optional[Callable[[int], None]] = None,
        on_rate: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.settings = settings
        self._on_pool_size = on_pool_size
        self._on_rate = on_rate
        #: the value each key had last (applied, or refused and logged)
        self._seen: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def on_task_fetched(self, task: Any) -> None:
        settings = getattr(task, "global_config", None)
        if settings:
            self.apply(settings)

    def apply(self, settings: Mapping[str, Any]) -> None:
        with self._lock:  # one fetcher calls this, but a library user may too
            for key, value in settings.items():
                if key in self._seen and _same(self._seen[key], value):
                    continue  # applied already, or refused and logged already
                self._seen[key] = value
                problem = value_problem(key, value)
                if problem is not None:
                    log.warning("globalConfig %s=%s ignored: %s", key, _shown.repr(value), problem)
                    continue
                self._apply_one(key, value)

    def _apply_one(self, key: str, value: Any) -> None:
        """Apply a valid value of ``key`` (see ``value_problem``)."""
        if key == "debugMode":
            logs.set_debug(value)
        elif key == "verifyCert":
            if not value:
                log.warning("server turned TLS verification off (globalConfig verifyCert)")
            self.settings.set_verify(value)
        elif key == "uploadToAC":
            self.settings.set_upload_to_ac(value)
        elif key == "poolSize":
            self.settings.set_pool_size(value)
            if self._on_pool_size is not None:
                self._on_pool_size(value)
        elif key == "rateLimitPerMin":
            if self._on_rate is not None:
                self._on_rate(value)
        else:
            return  # unknown keys: ignored silently
        log.info("globalConfig: %s=%s", key, value)


def _same(old: Any, new: Any) -> bool:
    """The same JSON value: ``1``, ``1.0`` and ``true`` compare equal in Python."""
    return type(old) is type(new) and old == new
