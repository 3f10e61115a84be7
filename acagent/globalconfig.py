"""Runtime settings, and the ``globalConfig`` the AC server pushes inside tasks.

``RuntimeSettings`` holds the few settings that may change while the agent
runs (TLS verification, where large bodies go, the executor's size). The
stages read them when they need them; nobody writes another stage's
attributes from a foreign thread.

``GlobalConfigObserver`` is the observer that applies a task's
``globalConfig`` (PROTOCOL.md): each key only if present, valid and
changed. Today's agent resets the settings a server leaves out: a bug not
copied. Unknown keys are ignored silently (newer servers may add some).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Union

from . import logs
from .observers import Observer

log = logging.getLogger("acagent.globalconfig")

#: a TLS ``verify`` value as requests takes it: a bool or a CA bundle path
Verify = Union[bool, str]


class RuntimeSettings:
    """Settings that may change at run time; every read and write is atomic."""

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

    ``on_verify(enabled)``, ``on_pool_size(n)`` and ``on_rate(n)`` are called
    for those keys, after the settings changed (the Pipeline passes the AC
    client's verify setter, the ledger's resize and the rate limiter's setter).
    """

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        on_verify: Optional[Callable[[bool], None]] = None,
        on_pool_size: Optional[Callable[[int], None]] = None,
        on_rate: Optional[Callable[[int], None]] = None,
    ) -> None:
        self.settings = settings
        self._on_verify = on_verify
        self._on_pool_size = on_pool_size
        self._on_rate = on_rate
        self._applied: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def on_task_fetched(self, task: Any) -> None:
        settings = getattr(task, "global_config", None)
        if settings:
            self.apply(settings)

    def apply(self, settings: Mapping[str, Any]) -> None:
        with self._lock:  # one fetcher calls this, but a library user may too
            for key, value in settings.items():
                if key in self._applied and self._applied[key] == value:
                    continue
                if not self._apply_one(key, value):
                    log.warning("globalConfig %s=%r ignored (wrong type or range)", key, value)
                    continue
                self._applied[key] = value

    def _apply_one(self, key: str, value: Any) -> bool:
        if key in ("debugMode", "verifyCert", "uploadToAC"):
            if not isinstance(value, bool):
                return False
            if key == "debugMode":
                logs.set_debug(value)
            elif key == "verifyCert":
                if not value:
                    log.warning("server turned TLS verification off (globalConfig verifyCert)")
                self.settings.set_verify(value)
                if self._on_verify is not None:
                    self._on_verify(value)
            else:
                self.settings.set_upload_to_ac(value)
            log.info("globalConfig: %s=%s", key, value)
            return True
        if key in ("poolSize", "rateLimitPerMin"):
            if isinstance(value, bool) or not isinstance(value, int):
                return False
            if key == "poolSize":
                if not 1 <= value <= 2000:
                    return False
                self.settings.set_pool_size(value)
                if self._on_pool_size is not None:
                    self._on_pool_size(value)
            else:
                if value < 0:
                    return False
                if self._on_rate is not None:
                    self._on_rate(value)
            log.info("globalConfig: %s=%s", key, value)
            return True
        return True  # unknown keys: ignored silently
