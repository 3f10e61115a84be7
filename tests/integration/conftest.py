"""Fixtures shared by the integration tests (in-process real servers on 127.0.0.1)."""

from __future__ import annotations

import logging
from typing import Iterator, List

import pytest
from helpers import make_client

from acagent.ac.client import ACClient
from acagent.testing import FakeACServer


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def fetcher_log() -> Iterator[List[logging.LogRecord]]:
    """Records of ``acagent.fetcher`` at every level, whatever handlers and propagation are set up."""
    logger = logging.getLogger("acagent.fetcher")
    handler = _Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    """A fake AC server for key ``k``; the test fails if the server saw a protocol error."""
    with FakeACServer(api_key="k") as server:
        yield server
        assert server.errors == []


@pytest.fixture
def client(ac: FakeACServer) -> Iterator[ACClient]:
    with make_client(ac) as c:
        yield c
