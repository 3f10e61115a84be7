"""keep_lease: when a released shared lease is parked for this agent's next call."""

from __future__ import annotations

import pytest

from acagent.ac.permits import keep_lease

RENEW = 10.0 / 3  # a renewal every third of a 10 s lease
LINGER = 0.005


@pytest.mark.parametrize(
    ("calls", "keep_calls", "fence_left", "linger", "store_ok", "within", "kept"),
    [
        (1, 4, 9.5, LINGER, True, True, True),  # fresh grant: kept
        (4, 4, 9.5, LINGER, True, True, True),  # the 4th call: one more may follow
        (5, 4, 9.5, LINGER, True, True, False),  # 1 + keep_calls calls made: back to the queue
        (1, 0, 9.5, LINGER, True, True, False),  # affinity off
        (1, 4, 9.5, 0.0, True, True, False),  # no linger: nothing to park for
        (1, 4, 9.5, LINGER, False, True, False),  # Redis in trouble: give it back
        (1, 4, RENEW + LINGER + 0.001, LINGER, True, True, True),  # a renewal period left
        (1, 4, RENEW + LINGER, LINGER, True, True, False),  # a renewal is late: near its fence
        (1, 4, 0.1, LINGER, True, True, False),  # could lapse while parked or in its next call
        (1, 4, -1.0, LINGER, True, True, False),  # past its fence
        (1, 4, 9.5, LINGER, True, False, False),  # granted under a higher limit: drain
    ],
)
def test_keep_lease(
    calls: int,
    keep_calls: int,
    fence_left: float,
    linger: float,
    store_ok: bool,
    within: bool,
    kept: bool,
) -> None:
    assert keep_lease(calls, keep_calls, fence_left, linger, RENEW, store_ok, within) is kept
