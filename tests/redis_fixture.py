"""A real ``redis-server`` on 127.0.0.1 for the scale-out tests.

The binary is ``acagent.testing.find_redis_server()``'s: on PATH first, else
the one the test extra bundles. Without either, or when it cannot start, the
test fails (never skips) with one line that says what to install.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest

from acagent.ac.permits import RedisPermits
from acagent.testing import REDIS_SERVER_MISSING, LocalRedis, find_redis_server


def require_redis_server() -> str:
    """The ``redis-server`` binary; fails the calling test when there is none."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_SERVER_MISSING, pytrace=False)
    return binary


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    require_redis_server()
    server = LocalRedis(workdir=str(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"{server.binary} could not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def new_permits(redis_server: LocalRedis) -> Iterator[Callable[..., RedisPermits]]:
    """``new_permits(api_key, limit, **kwargs)``: a ``RedisPermits`` on the test's
    redis-server, closed after the test."""
    made: List[RedisPermits] = []

    def make(api_key: str, limit: int, **kwargs: Any) -> RedisPermits:
        permits = RedisPermits(redis_server.url, api_key, limit, **kwargs)
        made.append(permits)
        return permits

    yield make
    for permits in made:
        permits.close()


def seconds_until_freed_by_kill(
    waiter: RedisPermits, holder_code: str, before_kill: Callable[[], None], timeout: float
) -> float:
    """Run ``holder_code`` in a process that prints ``held`` once it holds its
    permits; then ``before_kill()``, ``kill -9`` of the holder, and the seconds
    until ``waiter`` gets a permit (the test fails if none within ``timeout``)."""
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        before_kill()
        holder.kill()
        holder.wait(10)
        killed = time.monotonic()
        got = waiter.acquire(threading.Event(), timeout=timeout)
        freed_after = time.monotonic() - killed
    finally:
        holder.kill()
        holder.wait(10)
    assert got is not None, "the killed holder's permits never came back"
    waiter.release(got)
    return freed_after
