"""The adaptive AC limit: how many AC requests may be open at once, below the cap.

``--acMaxConcurrent`` (or the budget the agents on one key share) is the hard
cap. Within it the permits keep an **effective limit** that follows what the
server takes. The rules are this module's one pure function, ``step(state,
event, now_ms)``: an immutable ``LimitState`` and what one AC reply said in,
the next state out. The permits (``permits.py``) apply it and enforce the
limit; ``ACClient`` classifies each reply into an ``Event``.

* **Overload** halves the limit (down to 1): a 429 "Too many concurrent
  requests" (another client on the key, or the server lowered its limit),
  the one reply that asks for fewer requests at once. A plain 429 (a *rate*
  limit) does not: the server's wait header and the rate budget answer it,
  and fewer requests at once would not change the requests per minute it
  counts. Nor does a 503: it says "not now" (a deploy, a backend down, one
  result the server cannot take), which the backoffs and the breakers
  answer; halving on it would let one result that keeps drawing 503s hold
  every call of the agent (and of the agents on the key) at 1.
* **One burst, one halving**: every lease carries the version of the limit
  it was granted under; an overload on a call granted before the last
  decrease was answered by that decrease already, and changes nothing.
* **A clean call** (a 2xx at the first try, granted under the current limit)
  counts toward the climb. After ``clean_run`` clean calls, and
  ``probe_after_ms`` after a decrease (``step_after_ms`` after a climb that
  met no pressure), the limit goes up by one, until the cap. While the real
  limit stays lowered each such probe costs about one 429, so the pause
  after a decrease bounds them (8 in 20 s at 2.5 s); once the server takes
  more again the agent is back at the cap that long after.
* **A call that succeeded only after an overload retry** is pressure, not
  capacity: it starts the clean run afresh, so a limit under pressure never
  climbs on the calls that got through by retrying. Who retries knows it (a
  result's ``Delivery``, the Fetcher) and says so around the call
  (``retrying_overload``); the client keeps no memory of calls.
* An overload while the limit is 1 postpones the next probe (nothing lower
  to go to; the long concurrency wait answers it).

Shared permits keep the limit in Redis (``permits_limit.lua``): ``adopt``
takes a state that another agent on the key set, and ``step``'s change is
written there by a compare-and-set on the version.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
from dataclasses import dataclass
from typing import Iterator


class Signal(enum.Enum):
    """What one AC reply says about the server's room."""

    #: a 2xx at the first try
    CLEAN = "clean"
    #: 429 "Too many concurrent requests"
    OVERLOAD = "overload"
    #: a 2xx only after an overload retry: pressure, not capacity
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Event:
    """One AC reply: its signal, the limit version its lease was granted under,
    and for an overload what it was (the change's log reason)."""

    signal: Signal
    version: int
    why: str = ""


@dataclass(frozen=True)
class Pacing:
    """How fast the limit climbs back (see the module docstring)."""

    #: after a decrease (or an overload at 1), this long before the first step up
    probe_after_ms: int = 2500
    #: after a step up that met no pressure, this long before the next one
    step_after_ms: int = 500
    #: clean calls under the current limit before a step up
    clean_run: int = 4


PACING = Pacing()


@dataclass(frozen=True)
class LimitState:
    """The effective limit and what its next change depends on."""

    cap: int
    limit: int
    #: bumped by every change (leases carry the version they were granted under)
    version: int = 0
    #: the version the last decrease made (overloads on older leases are answered)
    lowered: int = 0
    #: when the current version began here (ms, the caller's clock)
    since_ms: int = 0
    #: clean calls granted under the current version
    clean: int = 0
    #: the last change was a step up (the next one may come sooner)
    rising: bool = False
    #: why the last change was made (for its log line)
    why: str = ""

    @classmethod
    def start(cls, cap: int, now_ms: int = 0) -> LimitState:
        return cls(cap=cap, limit=cap, since_ms=now_ms)

    def answered(self, event: Event) -> bool:
        """The limit was lowered after this call was granted (by this reply's
        own ``step`` or an earlier one): the permits have taken care of it."""
        return event.signal is Signal.OVERLOAD and event.version < self.lowered


def step(state: LimitState, event: Event, now_ms: int, pacing: Pacing = PACING) -> LimitState:
    """The state after ``event`` at ``now_ms`` (``state`` itself when nothing changes)."""
    if event.signal is Signal.OVERLOAD:
        if event.version < state.lowered:
            return state  # one burst, one halving
        if state.limit <= 1:
            return dataclasses.replace(state, since_ms=now_ms, clean=0)
        version = state.version + 1
        return LimitState(
            state.cap,
            max(1, state.limit // 2),
            version,
            lowered=version,
            since_ms=now_ms,
            why=event.why,
        )
    if event.signal is Signal.RECOVERED:
        return dataclasses.replace(state, clean=0) if state.clean else state
    if event.version != state.version or state.limit >= state.cap:
        return state  # granted under another limit, or nothing to climb to
    clean = state.clean + 1
    pause = pacing.step_after_ms if state.rising else pacing.probe_after_ms
    elapsed = now_ms - state.since_ms
    if clean < pacing.clean_run or elapsed < pause:
        return dataclasses.replace(state, clean=clean)
    return LimitState(
        state.cap,
        state.limit + 1,
        state.version + 1,
        lowered=state.lowered,
        since_ms=now_ms,
        rising=True,
        why=f"{clean} clean calls in {elapsed / 1000:.1f}s",
    )


def adopt(state: LimitState, limit: int, version: int, lowered: int, now_ms: int) -> LimitState:
    """The state after learning that the shared limit is ``limit`` at ``version``
    (set by another agent on the key): ``state`` itself when it says so already."""
    limit = max(1, min(state.cap, limit))
    if (limit, version) == (state.limit, state.version):
        return state
    raised = limit > state.limit
    return LimitState(
        state.cap,
        limit,
        version,
        lowered=lowered,
        since_ms=now_ms,
        rising=raised,
        why=f"{'raised' if raised else 'lowered'} by another agent on the API key",
    )


#: True around an AC call that retries one that drew an overload
_RETRYING_OVERLOAD = contextvars.ContextVar("acagent_retrying_overload", default=False)


@contextlib.contextmanager
def retrying_overload(retrying: bool) -> Iterator[None]:
    """Around an AC call: ``retrying`` says it retries a call that drew "Too many
    concurrent requests", so its success is ``Signal.RECOVERED``, not ``CLEAN``."""
    token = _RETRYING_OVERLOAD.set(retrying)
    try:
        yield
    finally:
        _RETRYING_OVERLOAD.reset(token)


def is_retrying_overload() -> bool:
    """Set by ``retrying_overload`` around the AC call running on this thread."""
    return _RETRYING_OVERLOAD.get()
