"""A real ``redis-server`` on 127.0.0.1 for the scale-out tests.

It fails (never skips) when ``redis-server`` is missing or cannot start:
CI installs it (``.ci/install-redis``); locally ``apt-get install redis-server``.
"""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from acagent.demo_multi import LocalRedis


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not on PATH: run .ci/install-redis (apt-get install redis-server)"
        )
    server = LocalRedis(workdir=str(tmp_path_factory.mktemp("redis")))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"redis-server could not start: {exc}")
    try:
        yield server
    finally:
        server.close()
