"""DeadlineWatch on an injected clock: which responses it shuts, when, and why."""

from __future__ import annotations

import threading
from typing import List

import pytest
from helpers import FakeClock

from acagent.targets.deadline import DeadlineWatch


class Response:
    """Stands for urllib3's HTTPResponse: the watch only calls ``shutdown``."""

    def __init__(self, fail: bool = False) -> None:
        self.shut = 0
        self.fail = fail
        self.shut_event = threading.Event()

    def shutdown(self) -> None:
        self.shut += 1
        self.shut_event.set()
        if self.fail:
            raise OSError("already closed")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def abort() -> threading.Event:
    return threading.Event()


@pytest.fixture
def watch(clock: FakeClock, abort: threading.Event) -> DeadlineWatch:
    return DeadlineWatch(abort, clock=clock)


def test_nothing_watched_sleeps_long(watch: DeadlineWatch) -> None:
    assert watch.fire_due() == DeadlineWatch.IDLE_WAIT


def test_a_response_past_its_deadline_is_shut_once_with_the_reason(
    watch: DeadlineWatch, clock: FakeClock
) -> None:
    response = Response()
    with watch.watching(response, clock.now + 3.0) as watched:
        assert watch.fire_due() == DeadlineWatch.TICK  # looks again at least every tick
        clock.now += 2.9
        assert watch.fire_due() == pytest.approx(0.1)  # the deadline is nearer than a tick
        assert response.shut == 0 and watched.fired is None
        clock.now += 0.1
        assert watch.fire_due() == DeadlineWatch.IDLE_WAIT  # fired: nothing left to watch
        assert response.shut == 1
        assert watched.fired is not None
        assert watched.fired.slug == "timeout"
        assert watched.fired.reason == "task expired while reading the response"
        clock.now += 100.0
        watch.fire_due()
    assert response.shut == 1


def test_a_response_finished_in_time_is_never_shut(watch: DeadlineWatch, clock: FakeClock) -> None:
    response = Response()
    with watch.watching(response, clock.now + 1.0) as watched:
        watch.fire_due()
    clock.now += 5.0
    assert watch.fire_due() == DeadlineWatch.IDLE_WAIT  # the finished watch was dropped
    assert response.shut == 0 and watched.fired is None


def test_earlier_deadlines_fire_first_and_alone(watch: DeadlineWatch, clock: FakeClock) -> None:
    start = clock.now
    responses: List[Response] = [Response() for _ in range(4)]
    deadlines = [start + 4.0, start + 1.0, start + 3.0, start + 2.0]
    contexts = [watch.watching(r, d) for r, d in zip(responses, deadlines)]
    for context in contexts:
        context.__enter__()
    try:
        clock.now = start + 2.5
        watch.fire_due()
        assert [r.shut for r in responses] == [0, 1, 0, 1]
        clock.now = start + 3.5
        assert watch.fire_due() == pytest.approx(0.5)
        assert [r.shut for r in responses] == [0, 1, 1, 1]
    finally:
        for context in contexts:
            context.__exit__(None, None, None)


def test_abort_shuts_every_watched_response_whatever_its_deadline(
    watch: DeadlineWatch, clock: FakeClock, abort: threading.Event
) -> None:
    late, later, done = Response(), Response(), Response()
    with watch.watching(done, clock.now + 3600.0):
        pass
    with (
        watch.watching(late, clock.now + 60.0) as first,
        watch.watching(later, clock.now + 3600.0) as second,
    ):
        assert watch.fire_due() == DeadlineWatch.TICK
        abort.set()
        assert watch.fire_due() == DeadlineWatch.IDLE_WAIT
        assert (late.shut, later.shut, done.shut) == (1, 1, 0)
        for watched in (first, second):
            assert watched.fired is not None
            assert (watched.fired.slug, watched.fired.reason) == (
                "shutdown",
                "agent shutting down",
            )


def test_a_failing_shutdown_still_marks_the_watch(watch: DeadlineWatch, clock: FakeClock) -> None:
    response = Response(fail=True)
    with watch.watching(response, clock.now) as watched:
        watch.fire_due()  # the error is swallowed: the check between reads remains
    assert response.shut == 1 and watched.fired is not None


def test_the_thread_wakes_for_a_new_earlier_deadline_and_ends_on_close(
    watch: DeadlineWatch, clock: FakeClock
) -> None:
    """The thread idles for ``IDLE_WAIT`` (a minute) when nothing is watched:
    a new watch must wake it, not wait for the minute to pass."""
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    try:
        response = Response()
        with watch.watching(response, clock.now - 1.0) as watched:  # due at once
            assert response.shut_event.wait(5.0)
        assert watched.fired is not None and watched.fired.slug == "timeout"
    finally:
        watch.close()
        thread.join(5.0)
    assert not thread.is_alive()
