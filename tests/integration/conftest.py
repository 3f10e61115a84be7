"""Fixtures shared by the integration tests (in-process real servers on 127.0.0.1)."""

from __future__ import annotations

import logging
from typing import Iterator, List

import pytest


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
