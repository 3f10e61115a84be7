"""The adaptive AC limit's rules (``acagent/ac/adaptive.py``): tables of events in,
limits out, on an injected clock in milliseconds."""

from __future__ import annotations

from typing import List, Tuple

import pytest

from acagent.ac.adaptive import Event, LimitState, Pacing, Signal, adopt, step

C, X, R = Signal.CLEAN, Signal.OVERLOAD, Signal.RECOVERED
PACING = Pacing(probe_after_ms=2500, step_after_ms=500, clean_run=4)

# (at ms, signal, the version the call's lease was granted under, the limit after)
Row = Tuple[int, Signal, int, int]

CASES: List[Tuple[str, int, List[Row]]] = [
    ("an overload halves the limit", 2, [(0, X, 0, 1)]),
    (
        "halves from 8 to 4 to 2 to 1, each on a call of the current limit",
        8,
        [(0, X, 0, 4), (10, X, 1, 2), (20, X, 2, 1), (30, X, 3, 1)],
    ),
    (
        "one burst, one halving: calls granted before the decrease change nothing",
        8,
        [(0, X, 0, 4), (1, X, 0, 4), (2, X, 0, 4)],
    ),
    ("clean calls of the cap change nothing", 2, [(0, C, 0, 2), (10, C, 0, 2)]),
    (
        "climbs after the clean run and the probe pause",
        2,
        [
            (0, X, 0, 1),
            (100, C, 1, 1),
            (200, C, 1, 1),
            (300, C, 1, 1),
            (2499, C, 1, 1),
            (2500, C, 1, 2),
        ],
    ),
    (
        "no climb before the probe pause, however many clean calls",
        2,
        [(0, X, 0, 1)] + [(t, C, 1, 1) for t in range(10, 2500, 10)],
    ),
    (
        "no climb on fewer clean calls than the run, however long",
        2,
        [(0, X, 0, 1), (5000, C, 1, 1), (9000, C, 1, 1), (20000, C, 1, 1), (20001, C, 1, 2)],
    ),
    (
        "clean calls granted under an older limit do not count",
        2,
        [
            (0, X, 0, 1),
            (2600, C, 0, 1),
            (2700, C, 0, 1),
            (2800, C, 0, 1),
            (2900, C, 0, 1),
            (3000, C, 1, 1),
        ],
    ),
    (
        "a success after an overload retry is pressure: the clean run starts again",
        2,
        [
            (0, X, 0, 1),
            (2600, C, 1, 1),
            (2700, C, 1, 1),
            (2800, C, 1, 1),
            (2850, R, 1, 1),
            (2900, C, 1, 1),
            (3000, C, 1, 1),
            (3100, C, 1, 1),
            (3200, C, 1, 2),
        ],
    ),
    (
        "recovered calls alone never climb",
        2,
        [(0, X, 0, 1)] + [(t, R, 1, 1) for t in range(1, 30000, 500)],
    ),
    (
        "a failed probe halves again, and the next probe waits the pause again",
        2,
        [(0, X, 0, 1)]
        + [(2500 + i, C, 1, 1 if i < 3 else 2) for i in range(4)]
        + [
            (2600, X, 2, 1),
            (2700, C, 3, 1),
            (2800, C, 3, 1),
            (2900, C, 3, 1),
            (5000, C, 3, 1),
            (5100, C, 3, 2),
        ],
    ),
    (
        "an overload at 1 postpones the probe",
        2,
        [
            (0, X, 0, 1),
            (100, C, 1, 1),
            (200, C, 1, 1),
            (300, C, 1, 1),
            (2000, X, 1, 1),
            (2600, C, 1, 1),
            (2700, C, 1, 1),
            (2800, C, 1, 1),
            (3000, C, 1, 1),
            (4499, C, 1, 1),
            (4500, C, 1, 2),
        ],
    ),
    (
        "after a step up with no pressure the next one comes sooner",
        4,
        [(0, X, 0, 2), (10, X, 1, 1)]
        + [(2510 + i, C, 2, 1 if i < 3 else 2) for i in range(4)]
        + [(2600 + i, C, 3, 2) for i in range(3)]
        + [(3013, C, 3, 3)]
        + [(3100 + i, C, 4, 3) for i in range(3)]
        + [(3513, C, 4, 4), (9000, C, 5, 4)],
    ),
    (
        "an overload on a call of a raised limit halves it",
        4,
        [(0, X, 0, 2)]
        + [(2500 + i, C, 1, 2 if i < 3 else 3) for i in range(4)]
        + [(2600, X, 1, 1)],
    ),
]


@pytest.mark.parametrize("name,cap,rows", CASES, ids=[c[0] for c in CASES])
def test_limit_follows_the_table(name: str, cap: int, rows: List[Row]) -> None:
    state = LimitState.start(cap, 0)
    for at, signal, version, limit in rows:
        state = step(state, Event(signal, version, "why"), at, PACING)
        assert state.limit == limit, (name, at, signal, version, state)
        assert 1 <= state.limit <= cap


def test_every_change_bumps_the_version_and_only_a_decrease_moves_lowered() -> None:
    s0 = LimitState.start(2, 0)
    s1 = step(s0, Event(X, 0, '"Too many concurrent requests" on put-result'), 0, PACING)
    assert (s1.limit, s1.version, s1.lowered) == (1, 1, 1)
    assert s1.why == '"Too many concurrent requests" on put-result'
    s = s1
    for at in (2500, 2501, 2502, 2503):
        s = step(s, Event(C, 1), at, PACING)
    assert (s.limit, s.version, s.lowered, s.rising) == (2, 2, 1, True)
    assert s.why == "4 clean calls in 2.5s"


def test_state_unchanged_is_the_same_object() -> None:
    state = LimitState.start(2, 0)
    assert step(state, Event(C, 0), 10, PACING) is state
    assert step(state, Event(R, 0), 10, PACING) is state
    low = step(state, Event(X, 0), 0, PACING)
    assert step(low, Event(X, 0), 5, PACING) is low  # answered already


@pytest.mark.parametrize(
    "version,signal,answered",
    [(0, X, True), (1, X, False), (0, C, False), (0, R, False)],
)
def test_answered_says_whether_the_limit_was_lowered_after_the_grant(
    version: int, signal: Signal, answered: bool
) -> None:
    low = step(LimitState.start(2, 0), Event(X, 0), 0, PACING)  # version 1, lowered 1
    assert low.answered(Event(signal, version)) is answered


@pytest.mark.parametrize(
    "shared,expect_limit,expect_rising,expect_why",
    [
        ((1, 1, 1), 1, False, "lowered by another agent on the API key"),
        ((2, 2, 1), 2, True, "raised by another agent on the API key"),
        ((9, 2, 1), 2, True, "raised by another agent on the API key"),  # clamped to the cap
        ((0, 3, 3), 1, False, "lowered by another agent on the API key"),  # at least 1
    ],
)
def test_adopt_takes_the_shared_limit(
    shared: Tuple[int, int, int], expect_limit: int, expect_rising: bool, expect_why: str
) -> None:
    start = LimitState(2, 1, 1, 1, 0) if expect_rising else LimitState.start(2, 0)
    state = adopt(start, *shared, now_ms=700)
    assert (state.limit, state.version, state.lowered) == (expect_limit, shared[1], shared[2])
    assert (state.rising, state.why, state.since_ms, state.clean) == (
        expect_rising,
        expect_why,
        700,
        0,
    )


def test_adopt_of_what_is_known_is_the_same_state() -> None:
    state = LimitState(2, 1, 4, 4, 100, clean=3)
    assert adopt(state, 1, 4, 4, 900) is state
