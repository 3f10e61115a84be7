"""AC permits: how many requests may be open to the AC server at once.

The AC server limits concurrent requests **per API key**. ``ACClient`` takes a
permit for the whole of every AC call. Two kinds:

- ``LocalPermits`` (default): a ``threading.BoundedSemaphore`` in this
  process. Right for one agent per API key.
- ``RedisPermits`` (``--coordinationUrl``): one distributed semaphore shared
  by every agent on the key, kept in Redis as *leases*:

  * acquisition is one Lua script (atomic): drop expired leases, join a FIFO
    queue of waiters, and take a lease when a permit is free and this waiter
    is among the first in line (so no agent starves);
  * a lease expires ``lease_seconds`` after its last renewal, so the permit
    of an agent killed with ``kill -9`` comes back by itself; a named renewer
    thread renews the leases this process holds every third of a lease;
  * **fenced**: this process trusts a permit only until its *fence*, the
    monotonic time the last good renewal (or the grant) was sent plus the
    lease less ``fence_margin``, so always before Redis could let the lease
    lapse. Past it the permit is *lapsed*: ``valid()`` says no (no AC call
    may start on it) and ``on_lapse`` is called (``ACClient`` shuts the
    request running on it). A renewal never re-adds a missing lease while
    the holders are at the effective limit: that lease is lost, and lapses at once;
  * a release hands a freed permit straight to the head of the queue (same
    script) and wakes that waiter, blocked in ``BLPOP`` on its own list, so
    the next agent starts without another round trip; a permit released by
    another agent is used a few ms later (``handoff_seconds``), because the
    server may not have counted the previous request out yet;
  * **affinity**: a released lease that served fewer than ``1 + keep_calls``
    calls in a row is *parked* here for ``linger`` (a few ms, no longer than
    the hand-off margin) instead of going back to Redis; the next
    ``acquire`` in this process takes it with no Redis call and no margin.
    One nobody takes goes back to Redis when its linger ends, marked with
    the time its last call ended, so the other agent's hand-off margin
    counts from then: parking costs it nothing beyond the margin. After
    ``1 + keep_calls`` calls the lease goes back to the queue (the next
    agent in line gets it, none starves). Parked leases are renewed and
    fenced like held ones, kept only while a renewal period is left before
    the fence (``keep_lease``), never counted in ``holders``, and given back
    by ``close()``; a killed agent's parked lease expires like a held one;
    a lease granted under a higher effective limit (below) than the one in
    force is never kept: it could be one above the limit, so it drains;
  * times are Redis's own clock (``TIME``), so clock skew between hosts does
    not matter;
  * key names start with ``acagent:{<sha256 of the API key, 16 hex>}:``,
    never the key itself (one standalone Redis; the braces would keep the keys
    in one hash slot);
  * **fail safe**: while Redis cannot be reached no permit is granted, so no
    AC call starts (results wait in the spool); ``acquire`` backs off and
    returns by itself once Redis is back. ``healthy()`` says why for
    ``/readyz``. A Redis that lost its data (restart without persistence)
    grants nothing for one lease, the time holders of the lost state need to
    re-register their leases (the renewer re-adds them). The holders key
    always carries a sentinel member, so a Redis that lost only that key
    (an eviction, a replica promoted with lag) is seen as one that lost its
    data, not as one with every permit free;
  * a Redis that refuses the password (or needs one not given) is a setting
    to fix, not an outage: the constructor raises ``ConfigError`` naming
    ``--coordinationUrl`` and where the password came from.

Both kinds enforce an **effective limit** at or below ``limit``, the
adaptive limit of ``adaptive.py``: ``observe`` applies each AC reply to it
(``ACClient`` calls it on the lease, before giving the lease back), and one
INFO line says each change and why. ``RedisPermits`` keeps it in Redis under
the key prefix for every agent on the key: the acquire and release scripts
grant up to it, and each acquire's reply tells the agent its current value
(no extra round trip; an overload reads it once more before it is judged);
a change is one compare-and-set script (``permits_limit.lua``), so of the
agents that saw one 429 burst, one halves.

Both kinds expose plain counters for metrics: ``acquired_total``,
``wait_seconds_total``, ``holders`` (permits this process holds now),
``waiting`` and an ``on_wait`` hook called with each wait in seconds;
``RedisPermits`` adds ``lapsed_total`` and ``kept_total`` (acquisitions that
took a parked lease).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type
from urllib.parse import urlsplit, urlunsplit

from ..config import AgentConfig
from ..errors import ConfigError
from .adaptive import PACING, Event, LimitState, Pacing, Signal, adopt, step
from .backoff import Backoff
from .retry import STORE_RECONNECT
from .scripts import lua

log = logging.getLogger("acagent.permits")

#: environment variable with the Redis password when the URL carries none
PASSWORD_ENV = "ACAGENT_COORDINATION_PASSWORD"  # noqa: S105 - a variable name

#: a lease this long by default (seconds)
DEFAULT_LEASE_SECONDS = 10.0

#: a shared lease serves this many more calls of one agent in a row by default
DEFAULT_KEEP_CALLS = 8

WaitHook = Callable[[float], None]
#: called with a lease that lapsed while held (from the fence thread)
LapseHook = Callable[[object], None]


def keep_lease(
    calls: int,
    keep_calls: int,
    fence_left: float,
    linger: float,
    renew_every: float,
    store_ok: bool,
    within_limit: bool,
) -> bool:
    """Park a released shared lease for this process's next call (else give it back)?

    ``calls``: AC calls made on it since Redis granted it; at most
    ``keep_calls`` more follow. ``fence_left``: seconds until its fence; it is
    kept only while more than a renewal period and the linger are left, so a
    call started on it has the same time before its fence as one on a fresh
    grant (a renewal that is late means trouble with Redis: give it back).
    ``within_limit``: it was granted under the effective limit in force now,
    or a lower one (then the holders were within today's limit when it was
    granted; one granted under a higher limit could be one above it: it
    drains).
    """
    return (
        keep_calls > 0
        and linger > 0
        and store_ok
        and within_limit
        and calls <= keep_calls
        and fence_left > renew_every + linger
    )


class CoordinationUnavailable(RuntimeError):
    """``--coordinationUrl`` was given but the ``redis`` package is not installed."""


def require_redis() -> Any:
    """The ``redis`` module, or ``CoordinationUnavailable`` with a one-line fix."""
    try:
        import redis
    except ImportError:
        raise CoordinationUnavailable(
            "--coordinationUrl needs the redis package: pip install 'acagent[redis]'"
        ) from None
    return redis


def key_prefix(api_key: str) -> str:
    """``acagent:{<16 hex of sha256(api key)>}:``: per key, and never the key itself."""
    digest = hashlib.sha256(b"acagent-permits\0" + api_key.encode()).hexdigest()[:16]
    return f"acagent:{{{digest}}}:"


def redact_url(url: str) -> str:
    """The URL without user name and password (for logs and /readyz)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def secret_origin(
    url: str, given: Optional[str], from_env: Optional[str]
) -> Tuple[Optional[str], str]:
    """(the password to pass besides the URL, where the one used comes from)."""
    if urlsplit(url).password:
        return None, "the password in --coordinationUrl"
    if given is not None:
        return given, f"the password given (--coordinationPasswordFile or {PASSWORD_ENV})"
    if from_env:
        return from_env, PASSWORD_ENV
    return None, "none given (--coordinationPasswordFile)"


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class Permits:
    """The permit interface ``ACClient`` uses. ``acquire`` then ``release`` the lease."""

    #: how many permits exist (for this API key): the cap of the effective limit
    limit: int
    #: how fast the effective limit climbs back (``adaptive.Pacing``)
    pacing: Pacing = PACING

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"permit limit must be >= 1, got {limit}")
        self.limit = limit
        self.acquired_total = 0
        self.wait_seconds_total = 0.0
        #: called with each wait for a permit, in seconds (e.g. a histogram)
        self.on_wait: Optional[WaitHook] = None
        #: called with a held lease that can no longer be trusted (see ``valid``)
        self.on_lapse: Optional[LapseHook] = None
        self._count_lock = threading.Lock()
        self._holders = 0
        self._waiting = 0
        self._limit_lock = threading.Lock()
        self._limit_state = LimitState.start(limit, _now_ms())
        #: the limit version each held lease was granted under
        self._lease_versions: Dict[object, int] = {}

    @property
    def holders(self) -> int:
        """Permits this process holds right now."""
        return self._holders

    @property
    def waiting(self) -> int:
        """Threads of this process waiting for a permit right now."""
        return self._waiting

    def acquire(self, stop: threading.Event, timeout: Optional[float] = None) -> Optional[object]:
        """Wait for a permit: its lease, or None when ``stop`` was set or ``timeout`` passed."""
        started = time.monotonic()
        lease: Optional[object] = None
        with self._count_lock:
            self._waiting += 1
        try:
            lease = self._acquire(stop, timeout)
        finally:
            waited = time.monotonic() - started
            with self._count_lock:
                self._waiting -= 1
        if lease is not None:
            with self._count_lock:
                self._lease_versions[lease] = self._limit_state.version
                self._holders += 1
                self.acquired_total += 1
                self.wait_seconds_total += waited
            hook = self.on_wait
            if hook is not None:
                try:
                    hook(waited)
                except Exception:  # a broken observer must not break the call
                    log.exception("permit wait hook failed")
        return lease

    def release(self, lease: object) -> None:
        """Give the permit back (never raises)."""
        with self._count_lock:
            self._holders -= 1
            self._lease_versions.pop(lease, None)
        self._release(lease)

    # -- the effective limit -------------------------------------------------
    @property
    def effective_limit(self) -> int:
        """How many permits may be held now (1..``limit``; ``adaptive.py``)."""
        return self._limit_state.limit

    def observe(self, lease: object, signal: Signal, why: str = "") -> bool:
        """Apply what one AC reply on the held ``lease`` said to the effective
        limit. True for an overload the limit was lowered for (by this reply or
        since the call was granted): its retry may come soon."""
        with self._count_lock:
            version = self._lease_versions.get(lease, self._limit_state.version)
        event = Event(signal, version, why)
        if signal is Signal.OVERLOAD:
            self._refresh_limit()
        with self._limit_lock:
            old = state = self._limit_state
            for _ in range(2):  # once more on the state a lost compare-and-set read
                new = step(state, event, _now_ms(), self.pacing)
                if new.version == state.version:  # a count, not a change: kept here
                    state = new
                    break
                stored = self._store_limit(state, new)
                settled = stored is state or (stored.version, stored.limit) == (
                    new.version,
                    new.limit,
                )
                state = stored
                if settled:
                    break
            self._limit_state = state
        self._limit_changed(old, state)
        return state.answered(event)

    def _learn(self, limit: int, version: int, lowered: int) -> None:
        """The shared limit as the store has it now (set by any agent on the key)."""
        with self._limit_lock:
            old = self._limit_state
            if (limit, version) == (old.limit, old.version):
                return
            self._limit_state = adopt(old, limit, version, lowered, _now_ms())
        self._limit_changed(old, self._limit_state)

    def _limit_changed(self, old: LimitState, new: LimitState) -> None:
        """Log a change of the effective limit (subclasses also wake waiters)."""
        if new.limit != old.limit:
            log.info("AC limit %d -> %d: %s", old.limit, new.limit, new.why)

    def _store_limit(self, old: LimitState, new: LimitState) -> LimitState:
        """Make ``new`` the limit in force, as decided on ``old``; what is in force then."""
        return new

    def _refresh_limit(self) -> None:
        """Before an overload is judged: learn the limit in force if it is kept elsewhere."""

    def valid(self, lease: object) -> bool:
        """May an AC call start (or go on) on this held lease? Local permits never lapse."""
        return True

    def healthy(self) -> Tuple[bool, str]:
        """(ok, reason) for readiness."""
        return True, "local permits"

    def close(self) -> None:
        """Stop background threads and give back what is still held (idempotent)."""

    # -- for subclasses ------------------------------------------------------
    def _acquire(self, stop: threading.Event, timeout: Optional[float]) -> Optional[object]:
        raise NotImplementedError

    def _release(self, lease: object) -> None:
        raise NotImplementedError


class LocalPermits(Permits):
    """Up to the effective limit (at most ``limit``) permits in this process."""

    #: longest single wait, so a stop event is noticed while every permit is held
    SLICE = 0.5

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._free = threading.Condition()
        self._used = 0

    def _acquire(self, stop: threading.Event, timeout: Optional[float]) -> Optional[object]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._free:
            while True:
                if self._used < self.effective_limit:
                    self._used += 1
                    return object()  # one per holder, like a Redis token
                if stop.is_set():
                    return None
                wait = self.SLICE
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return None
                self._free.wait(wait)

    def _release(self, lease: object) -> None:
        with self._free:
            self._used -= 1
            self._free.notify()

    def _limit_changed(self, old: LimitState, new: LimitState) -> None:
        super()._limit_changed(old, new)
        if new.limit > old.limit:
            with self._free:
                self._free.notify_all()


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------

# Keys (all under the per-API-key prefix):
#   holders  zset  token -> lease expiry (ms, Redis clock), plus SENTINEL at +inf
#   queue    zset  token -> ticket (arrival order of waiters)
#   alive    zset  token -> waiter deadline (a waiter that stops polling leaves)
#   ticket   counter of the queue
#   epoch    ms until which nothing is granted; missing = new store or lost data
#   recent   zset  owner -> time of its last release (for the hand-off margin)
#   limit    hash  the effective limit: limit, version, lowered (permits_limit.lua)
#   grant:<token>  list: a release handed this waiter a permit
#                  (value: releasing owner, idle ms, the effective limit then)
#: the member of ``holders`` that is always there (so its loss is seen); no token
SENTINEL = "~sentinel"

# The scripts are Lua files beside this module (``permits_*.lua``); each says
# what it takes and returns. Each runs after the prelude (the Redis clock, the
# key names, tidy(), epoch_of(), held()).
_ACQUIRE_LUA = lua("permits_prelude", "permits_acquire", SENTINEL=SENTINEL)
_RELEASE_LUA = lua("permits_prelude", "permits_release", SENTINEL=SENTINEL)
_RENEW_LUA = lua("permits_prelude", "permits_renew", SENTINEL=SENTINEL)
_LIMIT_LUA = lua("permits_prelude", "permits_limit", SENTINEL=SENTINEL)


class RedisPermits(Permits):
    """``limit`` permits shared by every agent on one API key, as leases in Redis.

    ``url``: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS);
    ``password`` is used when the URL carries none. ``client``: an existing
    ``redis.Redis`` (tests, host services); it is not closed by ``close()``.

    A waiter blocks in ``BLPOP`` on its own grant list: the release that frees
    a permit moves it to the head of the queue in the same script, so the next
    agent starts without another round trip. The uncontended hot path is one
    script call to acquire and one to release.
    """

    #: a waiter that stops polling for this long leaves the queue
    WAITER_TTL = 3.0
    #: longest single blocking wait (expired leases are noticed at this pace)
    POLL_MAX = 0.25
    #: log "unreachable" at most this often
    LOG_EVERY = 60.0
    #: a permit that another agent released is used only this long after the
    #: release (see ``handoff_seconds``)
    HANDOFF_SECONDS = 0.005
    #: a held permit lapses this long before Redis could let it go (at most a
    #: quarter of the lease, so a renewal late by a third of a lease is no
    #: lapse): time for the request cut on it to end at the server (the
    #: server sees the closed connection a little later, on a busy machine
    #: later still), and for a request that started right before the fence
    FENCE_MARGIN = 0.5

    def __init__(
        self,
        url: str,
        api_key: str,
        limit: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        password: Optional[str] = None,
        client: Any = None,
        socket_timeout: float = 2.0,
        ca_bundle: Optional[str] = None,
        handoff_seconds: Optional[float] = None,
        reconnect: Backoff = STORE_RECONNECT,
        keep_calls: int = DEFAULT_KEEP_CALLS,
        linger: Optional[float] = None,
    ) -> None:
        """``reconnect``: the waits between two tries while Redis cannot be reached.
        ``keep_calls``: more calls in a row a lease may serve here (0 = every
        release goes to Redis); ``linger``: how long a parked lease waits for
        one (default ``handoff_seconds``)."""
        super().__init__(limit)
        if not lease_seconds >= 0.5:
            raise ValueError(f"lease must be >= 0.5 s, got {lease_seconds}")
        redis = require_redis()
        #: exceptions meaning "Redis is not reachable"
        self.store_errors: Tuple[Type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
        )
        self.url = redact_url(url)
        self.lease_seconds = float(lease_seconds)
        #: how long before its lease could lapse in Redis a held permit lapses here
        self.fence_margin = min(self.FENCE_MARGIN, self.lease_seconds / 4)
        self.reconnect = reconnect
        #: The server counts a request until *it* has written the reply; the
        #: client has read it a little earlier. A permit that goes straight to
        #: another agent (another connection) could reach the server before
        #: its bookkeeping caught up, and get a 429: measured 2 in 1,200 calls
        #: without this margin; with 3 ms, 1 in 3 runs of 3 agents on a busy
        #: 2-core machine (the server's thread was scheduled late); 5 ms: none.
        self.handoff_seconds = (
            self.HANDOFF_SECONDS if handoff_seconds is None else max(0.0, handoff_seconds)
        )
        if keep_calls < 0:
            raise ValueError(f"keep_calls must be >= 0, got {keep_calls}")
        self.keep_calls = keep_calls
        #: a parked lease goes back to Redis this long after its last call ended
        self.linger = self.handoff_seconds if linger is None else max(0.0, linger)
        self.prefix = key_prefix(api_key)
        names = ("holders", "queue", "alive", "ticket", "epoch", "recent", "limit")
        self._keys = [self.prefix + n for n in names]
        self._grant_prefix = self.prefix + "grant:"
        self._owns_client = client is None
        if client is None:
            kwargs: Dict[str, Any] = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_timeout,
                "health_check_interval": 30,
            }
            password, origin = secret_origin(url, password, os.environ.get(PASSWORD_ENV))
            if password is not None:
                kwargs["password"] = password
            if url.startswith("rediss://") and ca_bundle and os.path.isfile(ca_bundle):
                kwargs["ssl_ca_certs"] = ca_bundle
            client = redis.Redis.from_url(url, **kwargs)
        #: the ``redis.Redis`` client (shared with the rate limiter)
        self.store = client
        self._acquire_script = client.register_script(_ACQUIRE_LUA)
        self._renew_script = client.register_script(_RENEW_LUA)
        self._release_script = client.register_script(_RELEASE_LUA)
        self._limit_script = client.register_script(_LIMIT_LUA)
        if self._owns_client:
            self._check_password(origin)
        self._lock = threading.Lock()
        #: notified when a fence may have come nearer (a grant, a renewal, close)
        self._fences_changed = threading.Condition(self._lock)
        self._renew_lock = threading.Lock()
        #: held, trusted permits: token -> fence (monotonic)
        self._held: Dict[str, float] = {}
        #: held permits that lapsed, until their release
        self._lapsed: Set[str] = set()
        #: calls made on each held (or parked) lease since Redis granted it
        self._calls: Dict[str, int] = {}
        #: the effective limit each held (or parked) lease was granted under
        self._granted_under: Dict[str, int] = {}
        #: parked leases (also in ``_held``): token -> when its last call ended
        self._parked: Dict[str, float] = {}
        #: notified when a lease is parked (or at close)
        self._parked_changed = threading.Condition(self._lock)
        self._to_release: Set[str] = set()
        self._down_since: Optional[float] = None
        self._last_error = ""
        self._last_logged = 0.0
        self._closing = threading.Event()
        #: counters for metrics
        self.store_errors_total = 0
        self.leases_lost_total = 0
        self.renewals_total = 0
        self.lapsed_total = 0
        self.kept_total = 0
        #: this process, as other agents see it in the store
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._token_seq = 0
        self._renewer = threading.Thread(
            target=self._renew_loop, name="acagent-permit-renewer", daemon=True
        )
        self._renewer.start()
        self._fence = threading.Thread(
            target=self._fence_loop, name="acagent-permit-fence", daemon=True
        )
        self._fence.start()
        self._unparker = threading.Thread(
            target=self._unpark_loop, name="acagent-permit-unpark", daemon=True
        )
        self._unparker.start()

    def _check_password(self, source: str) -> None:
        """One PING: a refused or missing password is a setting (``ConfigError``);
        an unreachable store is not (the agent waits for it, fail safe)."""
        redis = require_redis()
        try:
            self.store.ping()
        except redis.exceptions.AuthenticationError as exc:
            problem = str(exc)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith(("NOAUTH", "WRONGPASS")):
                return
            problem = str(exc)
        except self.store_errors:
            return
        else:
            return
        raise ConfigError(
            "coordination_url",
            f"the coordination store {self.url} refused to authenticate ({problem[:120]}); "
            f"password source: {source}",
        )

    # -- status --------------------------------------------------------------
    def healthy(self) -> Tuple[bool, str]:
        with self._lock:
            down, error = self._down_since, self._last_error
        if down is None:
            return True, f"coordination store {self.url} reachable"
        return False, (
            f"coordination store {self.url} unreachable for {time.monotonic() - down:.0f}s "
            f"({error}); no AC call is made until it is back"
        )

    def remote_holders(self) -> Optional[int]:
        """Leases held by all agents on the key (one Redis call), or None if unreachable."""
        try:
            return int(self.store.zcount(self._keys[0], "-inf", "(+inf"))
        except self.store_errors:
            return None

    def report_store_ok(self) -> None:
        """A Redis call (here or in the shared rate limiter) succeeded."""
        with self._lock:
            was_down = self._down_since
            self._down_since = None
        if was_down is not None:
            log.warning(
                "coordination store %s is reachable again after %.1fs; AC calls resume",
                self.url,
                time.monotonic() - was_down,
            )

    def report_store_error(self, exc: BaseException) -> None:
        """A Redis call failed: ``healthy()`` turns false; logged once a minute."""
        now = time.monotonic()
        with self._lock:
            self.store_errors_total += 1
            self._last_error = f"{type(exc).__name__}: {exc}"[:200]
            if self._down_since is None:
                self._down_since = now
            should_log = now - self._last_logged >= self.LOG_EVERY
            if should_log:
                self._last_logged = now
        if should_log:
            log.error(
                "coordination store %s unreachable (%s): no AC call until it is back",
                self.url,
                self._last_error,
            )

    # -- acquire / release ---------------------------------------------------
    def _new_token(self) -> str:
        with self._lock:
            self._token_seq += 1
            return f"{self.owner}-{self._token_seq}"

    def _acquire(self, stop: threading.Event, timeout: Optional[float]) -> Optional[object]:
        kept = None if stop.is_set() else self._take_parked()
        if kept is not None:
            return kept
        token = self._new_token()
        grant_key = self._grant_prefix + token
        deadline = None if timeout is None else time.monotonic() + timeout
        lease_ms = int(self.lease_seconds * 1000)
        margin_ms = int(self.handoff_seconds * 1000)
        args = [
            self.limit,
            lease_ms,
            token,
            int(self.WAITER_TTL * 1000),
            lease_ms,
            self.owner,
            margin_ms,
            grant_key,
        ]
        store_failures = 0
        joined = False
        while not (stop.is_set() or self._closing.is_set()):
            wait = self.POLL_MAX
            try:
                # A lease granted now, by this script or a release it lets
                # us wait for, ends no earlier than a lease from here.
                sent = time.monotonic()
                granted, ms, *shared = self._acquire_script(keys=self._keys, args=args)
                joined = True
                self.report_store_ok()
                self._learn(*(int(v) for v in shared))
                store_failures = 0
                if int(granted) == 1:
                    return self._granted(token, sent, int(ms) / 1000.0, int(shared[0]))
                if int(ms):
                    wait = min(wait, int(ms) / 1000.0)
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if wait > 0.001:
                    # A release hands the permit over through this list.
                    got = self.store.blpop([grant_key], timeout=wait)
                    if got is not None:
                        return self._granted(token, sent, *self._handed_over(got[1]))
            except self.store_errors as exc:
                self.report_store_error(exc)
                store_failures += 1
                wait = self.reconnect.wait(store_failures)
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                stop.wait(max(0.0, wait))
            if deadline is not None and time.monotonic() >= deadline:
                break
        if joined and not self._send_release([token], quiet=True):
            # Leave the queue, and give back a permit a release may just have handed us.
            with self._lock:
                self._to_release.add(token)
        return None

    def _handed_over(self, grant: bytes) -> Tuple[float, int]:
        """A permit handed over by a release (``owner idle-ms limit``): the wait
        before its first call (none from this process; else the hand-off
        margin less the time the permit was idle before it) and the effective
        limit it was granted under (the cap when the message does not say)."""
        owner, idle, limit = [*grant.decode(errors="replace").split(" "), "", ""][:3]
        try:
            idle_s = max(0, int(idle or 0)) / 1000.0
            under = int(limit or self.limit)
        except ValueError:
            idle_s, under = 0.0, self.limit
        margin = 0.0 if owner == self.owner else max(0.0, self.handoff_seconds - idle_s)
        return margin, under

    def _take_parked(self) -> Optional[str]:
        """A parked lease for the next call (no Redis call, no margin), or None.
        One granted under a higher limit than the one in force now is left for
        the unparker to give back."""
        limit = self.effective_limit
        with self._lock:
            for token in self._parked:
                if self._granted_under.get(token, self.limit) > limit:
                    continue
                del self._parked[token]
                self._calls[token] = self._calls.get(token, 1) + 1
                self.kept_total += 1
                return token
        return None

    def _granted(self, token: str, sent: float, margin: float, under: int) -> str:
        with self._lock:
            self._calls[token] = 1
            self._granted_under[token] = under
            self._held[token] = sent + self.lease_seconds - self.fence_margin
            self._fences_changed.notify_all()
        if margin > 0:
            time.sleep(margin)
        return token

    def _refresh_limit(self) -> None:
        """One read of the shared limit (only on an overload, never on the hot
        path): a permit handed over by a release carries no news of the limit,
        and a 429 judged on an old view (1, while another agent raised it to 2)
        would wait 0..10 s and leave the raised limit in force."""
        try:
            limit, version, lowered = self.store.hmget(self._keys[6], "limit", "version", "lowered")
        except self.store_errors as exc:
            self.report_store_error(exc)
            return
        self._learn(
            self.limit if limit is None else int(limit),
            0 if version is None else int(version),
            0 if lowered is None else int(lowered),
        )

    def _store_limit(self, old: LimitState, new: LimitState) -> LimitState:
        """Compare-and-set in the store: ``new`` if the shared limit is still at
        ``old``'s version, else the one another agent set (unchanged while the
        store cannot be reached: no permit is granted then anyway)."""
        down = int(new.lowered == new.version)
        try:
            out = self._limit_script(
                keys=self._keys, args=[self.limit, old.version, new.limit, down]
            )
        except self.store_errors as exc:
            self.report_store_error(exc)
            return old
        limit, version, lowered, done = (int(v) for v in out)
        if done:
            return dataclasses.replace(new, limit=limit, version=version, lowered=lowered)
        return adopt(old, limit, version, lowered, _now_ms())

    def valid(self, lease: object) -> bool:
        with self._lock:
            fence = self._held.get(str(lease))
        return fence is not None and time.monotonic() < fence

    def _release(self, lease: object) -> None:
        token = str(lease)
        now = time.monotonic()
        with self._lock:
            fence = self._held.get(token)
            if fence is not None and keep_lease(
                self._calls.get(token, 1),
                self.keep_calls,
                fence - now,
                self.linger,
                self.lease_seconds / 3.0,
                self._down_since is None and not self._closing.is_set(),
                self._granted_under.get(token, self.limit) <= self.effective_limit,
            ):
                self._parked[token] = now
                self._parked_changed.notify_all()
                return
        self._give_back([token], 0.0)

    def _give_back(self, tokens: List[str], idle: float) -> None:
        """Release these leases to Redis (``idle``: seconds since their last call ended)."""
        # Under the renew lock: a renewal that read the token as held must not
        # re-add its lease after this release removed it.
        with self._renew_lock:
            with self._lock:
                for token in tokens:
                    self._held.pop(token, None)
                    self._lapsed.discard(token)
                    self._calls.pop(token, None)
                    self._granted_under.pop(token, None)
            if not self._send_release(tokens, quiet=False, idle=idle):
                with self._lock:
                    self._to_release.update(tokens)  # the renewer retries; they expire anyway

    def _send_release(self, tokens: List[str], *, quiet: bool, idle: float = 0.0) -> bool:
        args = [
            self.limit,
            int(self.lease_seconds * 1000),
            int(self.WAITER_TTL * 1000),
            self.owner,
            self._grant_prefix,
            int(idle * 1000),
            *tokens,
        ]
        try:
            self._release_script(keys=self._keys, args=args)
        except self.store_errors as exc:
            if not quiet:
                self.report_store_error(exc)
            return False
        return True

    # -- background thread ---------------------------------------------------
    def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3.0
        lease_ms = int(self.lease_seconds * 1000)
        while not self._closing.wait(interval if self._down_since is None else 0.25):
            try:
                with self._renew_lock:
                    self._renew_once(lease_ms)
                self.report_store_ok()
            except self.store_errors as exc:
                self.report_store_error(exc)
            except Exception:  # keep renewing whatever happens
                log.exception("permit renewer failed; retrying")

    def _renew_once(self, lease_ms: int) -> None:
        """One renewal: retry failed releases, extend (or re-add) held leases."""
        with self._lock:
            held = sorted(self._held)
            pending = sorted(self._to_release)
        if pending and self._send_release(pending, quiet=True):
            with self._lock:
                self._to_release.difference_update(pending)
        if held:
            sent = time.monotonic()
            out = self._renew_script(keys=self._keys, args=[self.limit, lease_ms, *held])
            readded = int(out[0])
            lost = [bytes(t).decode() if isinstance(t, bytes) else str(t) for t in out[1:]]
            self.renewals_total += len(held)
            fence = sent + self.lease_seconds - self.fence_margin
            with self._lock:
                for token in held:
                    if token in self._held and token not in lost:
                        self._held[token] = fence
                self._fences_changed.notify_all()
            if readded:
                self.leases_lost_total += readded
                log.warning(
                    "%d permit lease(s) were missing in %s (store reset); re-registered",
                    readded,
                    self.url,
                )
            if lost:
                self.leases_lost_total += len(lost)
                self._lapse(lost, "its lease was gone and every permit is taken")
        elif self._down_since is not None:
            self.store.ping()

    # -- the fence -------------------------------------------------------------
    def _fence_loop(self) -> None:
        """Lapse each held permit at its fence (renewals move fences on)."""
        while True:
            with self._lock:
                if self._closing.is_set():
                    return
                now = time.monotonic()
                due = sorted(t for t, fence in self._held.items() if fence <= now)
                if not due:
                    nearest = min(self._held.values(), default=now + self.POLL_MAX)
                    self._fences_changed.wait(max(0.001, min(nearest - now, self.POLL_MAX)))
                    continue
            self._lapse(due, f"no renewal reached {self.url} in time")

    def _unpark_loop(self) -> None:
        """Give a parked lease back to Redis when its linger ends untaken."""
        while True:
            with self._lock:
                if self._closing.is_set():
                    return
                now = time.monotonic()
                due = [t for t, ended in self._parked.items() if ended + self.linger <= now]
                if not due:
                    nearest = min(self._parked.values(), default=now + self.POLL_MAX)
                    wait = min(nearest + self.linger - now, self.POLL_MAX)
                    self._parked_changed.wait(max(0.0005, wait))
                    continue
                ended = [self._parked.pop(t) for t in due]
            try:
                self._give_back(due, time.monotonic() - max(ended))
            except Exception:  # keep going whatever happens; the leases expire anyway
                log.exception("giving back a parked permit failed")

    def _lapse(self, tokens: List[str], why: str) -> None:
        """These held permits can no longer be trusted: no call starts on them,
        and ``on_lapse`` cuts the one running. A parked one is dropped (the
        renewer gives it back)."""
        with self._lock:
            parked = [t for t in tokens if self._parked.pop(t, None) is not None]
            for token in parked:
                self._held.pop(token, None)
                self._calls.pop(token, None)
                self._granted_under.pop(token, None)
            self._to_release.update(parked)
            lapsed = [t for t in tokens if self._held.pop(t, None) is not None]
            self._lapsed.update(lapsed)
            self.lapsed_total += len(lapsed) + len(parked)
        if not lapsed:
            return
        log.warning(
            "%d AC permit(s) lapsed (%s): the AC request on each is cut and retried",
            len(lapsed),
            why,
        )
        hook = self.on_lapse
        for token in lapsed:
            if hook is not None:
                try:
                    hook(token)
                except Exception:  # a broken hook must not stop the fence
                    log.exception("permit lapse hook failed")

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        with self._lock:
            tokens = sorted(set(self._held) | self._lapsed | self._to_release)
            self._held.clear()
            self._lapsed.clear()
            self._to_release.clear()
            self._parked.clear()
            self._calls.clear()
            self._granted_under.clear()
            self._fences_changed.notify_all()
            self._parked_changed.notify_all()
        if tokens:
            self._send_release(tokens, quiet=True)
        self._renewer.join(timeout=5.0)
        self._fence.join(timeout=5.0)
        self._unparker.join(timeout=5.0)
        if self._owns_client:
            try:
                self.store.close()
            except Exception:
                log.debug("closing the Redis client failed", exc_info=True)


def permits_for(config: AgentConfig, reconnect: Backoff = STORE_RECONNECT) -> Permits:
    """The permits ``config`` asks for: ``RedisPermits`` shared through
    ``--coordinationUrl`` when one is given, else ``LocalPermits``.
    ``reconnect``: the waits between two tries while Redis cannot be reached."""
    if not config.coordination_url:
        return LocalPermits(config.ac_max_concurrent)
    return RedisPermits(
        config.coordination_url,
        config.api_key,
        config.ac_max_concurrent,
        lease_seconds=config.coordination_lease,
        password=config.coordination_password,
        ca_bundle=config.ca_bundle,
        reconnect=reconnect,
        keep_calls=config.coordination_keep_calls,
    )
