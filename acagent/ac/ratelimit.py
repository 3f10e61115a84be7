"""The client-side rate limiter: a token bucket per operation class.

The AC server rate-limits each agent. Today's agent shares one budget between
fetching and uploading, so a burst of uploads starves the fetch loop. Here
each operation class (``fetch``, ``upload``) has its own bucket of
``per_minute`` tokens per minute. ``per_minute == 0`` turns a bucket off.
Waits are interruptible: ``acquire`` returns False when its stop event is set.

With ``--coordinationUrl`` the AC server's per-key budget is shared by every
agent on the key: ``RateLimits.share`` switches each class to a
``SharedRateLimiter``, one token bucket in Redis (an atomic Lua script on
Redis's clock). While Redis cannot be reached it grants nothing (fail safe).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple, Type

from .backoff import Backoff
from .retry import STORE_RECONNECT
from .scripts import lua

log = logging.getLogger("acagent.ratelimit")

FETCH = "fetch"
UPLOAD = "upload"


class RateLimiter:
    """A thread-safe token bucket refilled at ``per_minute / 60`` tokens a second.

    The bucket holds at most ``burst`` tokens (default: five seconds' worth,
    at least one), so an idle agent cannot save up a minute of requests and
    fire them at once.
    """

    #: seconds of budget the bucket may hold
    BURST_SECONDS = 5.0

    def __init__(
        self,
        per_minute: int,
        *,
        burst: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rate = 0.0
        self._burst = 1.0
        self._tokens = 0.0
        self._stamp = clock()
        self._burst_override = burst
        self.set_rate(per_minute)
        self._tokens = self._burst  # start full: the first call never waits

    @property
    def per_minute(self) -> int:
        return round(self._rate * 60)

    def set_rate(self, per_minute: int) -> None:
        """Change the budget at runtime (globalConfig ``rateLimitPerMin``)."""
        if isinstance(per_minute, bool) or not isinstance(per_minute, int) or per_minute < 0:
            raise ValueError(f"rate limit must be a whole number >= 0, got {per_minute!r}")
        with self._changed:
            self._refill()
            self._rate = per_minute / 60.0
            if self._burst_override is not None:
                self._burst = max(1.0, self._burst_override)
            else:
                self._burst = max(1.0, self._rate * self.BURST_SECONDS)
            self._tokens = min(self._tokens, self._burst)
            self._changed.notify_all()

    def _refill(self) -> None:
        # Caller holds self._lock.
        now = self._clock()
        if self._rate > 0:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(
        self, *, stop: Optional[threading.Event] = None, timeout: Optional[float] = None
    ) -> bool:
        """Take one token, waiting for it. False if ``stop`` was set or ``timeout`` passed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._changed:
            while True:
                if self._rate == 0:
                    return True  # limiter off
                self._refill()
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return True
                if stop is not None and stop.is_set():
                    return False
                wait = (1.0 - self._tokens) / self._rate
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return False
                    wait = min(wait, left)
                # Short slices so a stop event set by another thread is noticed
                # promptly; set_rate() also wakes waiters through the condition.
                self._changed.wait(min(wait, 0.25))


#: Lua source: ``acagent/ac/ratelimit_take.lua`` (what it takes and returns is said there)
_TAKE_LUA = lua("ratelimit_take")


class SharedRateLimiter(RateLimiter):
    """A token bucket kept in Redis, shared by every agent on the API key.

    Same rate and burst rules as ``RateLimiter``; ``store`` is a
    ``redis.Redis`` client, ``errors`` the exceptions meaning "Redis is not
    reachable": then ``acquire`` waits as ``reconnect`` says and retries (no
    token without Redis).
    """

    def __init__(
        self,
        per_minute: int,
        *,
        store: Any,
        key: str,
        errors: Tuple[Type[BaseException], ...],
        on_store_error: Optional[Callable[[BaseException], None]] = None,
        on_store_ok: Optional[Callable[[], None]] = None,
        reconnect: Backoff = STORE_RECONNECT,
    ) -> None:
        """``on_store_error``/``on_store_ok``: told of each failed/good Redis call (health)."""
        super().__init__(per_minute)
        self.reconnect = reconnect
        self._store = store
        self._key = key
        self._errors = errors
        self._on_error = on_store_error
        self._on_ok = on_store_ok
        self._take = store.register_script(_TAKE_LUA)

    def acquire(
        self, *, stop: Optional[threading.Event] = None, timeout: Optional[float] = None
    ) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        store_failures = 0
        while True:
            with self._lock:
                rate, burst = self._rate, self._burst
            if rate == 0:
                return True  # limiter off
            try:
                wait = int(self._take(keys=[self._key], args=[repr(rate), repr(burst)])) / 1000.0
                store_failures = 0
                if self._on_ok is not None:
                    self._on_ok()
            except self._errors as exc:
                log.debug("shared rate limit: store unreachable (%s)", exc)
                if self._on_error is not None:
                    self._on_error(exc)
                store_failures += 1
                wait = self.reconnect.wait(store_failures)
            if wait <= 0:
                return True
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            if stop is not None:
                if stop.wait(min(wait, 0.25)):
                    return False
            else:
                time.sleep(min(wait, 0.25))


class RateLimits:
    """One ``RateLimiter`` per operation class, all with the same rate."""

    CLASSES = (FETCH, UPLOAD)

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limiters: Dict[str, RateLimiter] = {
            name: RateLimiter(per_minute, clock=clock) for name in self.CLASSES
        }

    def __getitem__(self, op_class: str) -> RateLimiter:
        return self._limiters[op_class]

    def share(
        self,
        store: Any,
        prefix: str,
        errors: Tuple[Type[BaseException], ...],
        *,
        on_store_error: Optional[Callable[[BaseException], None]] = None,
        on_store_ok: Optional[Callable[[], None]] = None,
        reconnect: Backoff = STORE_RECONNECT,
    ) -> None:
        """Switch every class to a bucket in Redis shared by all agents on the key."""
        rate = self.per_minute
        self._limiters = {
            name: SharedRateLimiter(
                rate,
                store=store,
                key=f"{prefix}rate:{name}",
                errors=errors,
                on_store_error=on_store_error,
                on_store_ok=on_store_ok,
                reconnect=reconnect,
            )
            for name in self.CLASSES
        }

    @property
    def shared(self) -> bool:
        return isinstance(self._limiters[FETCH], SharedRateLimiter)

    def set_rate(self, per_minute: int) -> None:
        for limiter in self._limiters.values():
            limiter.set_rate(per_minute)

    @property
    def per_minute(self) -> int:
        return self._limiters[FETCH].per_minute
