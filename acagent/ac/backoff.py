"""Backoff: the one exponential schedule every wait of the agent is made of.

A ``Backoff`` is a value: the first wait, the cap, and how much of each wait
is random. The n-th failure in a row waits ``first * 2**(n-1)``, capped at
``cap`` (tenacity's ``wait_exponential`` computes it), scaled by a random
factor in ``[1 - spread, 1]`` so that results, threads or agents that failed
together do not all come back together, plus a random ``0..jitter`` seconds
(added, not scaled: today's agent's client retries wait so, docs/protocol.md).

Every schedule of the agent (per-result retries, the breakers, the stage
failure pause, Redis reconnects) is one ``Backoff`` field of ``RetryPolicy``
(``retry.py``); the waits a server asks for are parsed and clamped in one
place too (``retry.server_wait``). ``concurrency_wait`` is the one answer to a
"Too many concurrent requests" 429 without a wait header: 0..10 s, or
0..0.1 s when the agent's effective AC limit was lowered for it
(``adaptive.py``): the permits then hold the calls to the lower limit, and
the short jitter only keeps agents apart (a long wait would stall get-task).
``RetryPolicy.concurrency_pause`` picks the cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import tenacity

#: a "Too many concurrent requests" 429 without a wait header waits 0..this
CONCURRENCY_WAIT_MAX = 10.0
#: ... and 0..this when the effective AC limit was lowered for it
LOWERED_CONCURRENCY_WAIT_MAX = 0.1

_shared_rng = random.Random()


@dataclass(frozen=True)
class Backoff:
    """``first`` doubling per failure up to ``cap``, each wait scaled into
    ``[1 - spread, 1]``, then ``0..jitter`` seconds added."""

    first: float
    cap: float
    spread: float = 0.0
    jitter: float = 0.0
    _exponential: tenacity.wait_exponential = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.first >= 0 and self.cap >= self.first):
            raise ValueError(f"backoff needs 0 <= first <= cap, got {self.first}, {self.cap}")
        if not 0.0 <= self.spread <= 1.0:
            raise ValueError(f"backoff spread must be in 0..1, got {self.spread}")
        if not self.jitter >= 0:
            raise ValueError(f"backoff jitter must be >= 0, got {self.jitter}")
        object.__setattr__(
            self, "_exponential", tenacity.wait_exponential(multiplier=self.first, max=self.cap)
        )

    def wait(self, failures: int, rng: Optional[random.Random] = None) -> float:
        """Seconds to wait after ``failures`` failures in a row (1 = the first)."""
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(failures, 1)
        step = float(self._exponential(state))
        if self.spread:
            step *= (rng or _shared_rng).uniform(1.0 - self.spread, 1.0)
        if self.jitter:
            step += (rng or _shared_rng).uniform(0.0, self.jitter)
        return step


def concurrency_wait(
    rng: Optional[random.Random] = None, cap: float = CONCURRENCY_WAIT_MAX
) -> float:
    """The wait after "Too many concurrent requests" with no wait header: 0..``cap``,
    uniformly, as today's agent does (docs/protocol.md), so agents sharing a key spread out."""
    return (rng or _shared_rng).uniform(0.0, cap)
