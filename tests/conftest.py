"""Fixtures shared by the test modules: the fake servers, started and stopped per test."""

from __future__ import annotations

from typing import Iterator

import pytest

from acagent.testing import FakeACServer, FakeTarget


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    """A fake AC server with the production limit of 2 concurrent requests."""
    with FakeACServer(max_concurrent=2) as server:
        yield server


@pytest.fixture
def target() -> Iterator[FakeTarget]:
    with FakeTarget() as t:
        yield t
