"""Fixtures shared by the test modules: the fake servers, started and stopped per test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from acagent.testing import FakeACServer, FakeTarget


@pytest.fixture(autouse=True, scope="session")
def _state_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Agents started by a test (in this process or a subprocess) keep their
    default spool and logs under the test run's folder, never in the real
    ``~/.local/state`` or ``/var/lib/acagent``."""
    state = tmp_path_factory.mktemp("state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(state)
    yield state
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    """A fake AC server with the production limit of 2 concurrent requests."""
    with FakeACServer(max_concurrent=2) as server:
        yield server


@pytest.fixture
def target() -> Iterator[FakeTarget]:
    with FakeTarget() as t:
        yield t


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: files are private only because the agent makes them so."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)
