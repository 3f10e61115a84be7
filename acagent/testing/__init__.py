"""Real HTTP servers for tests (a package; this step only moved the module)."""

from __future__ import annotations

from .httpserver import (
    AC_ENDPOINTS,
    FakeACServer,
    FakeTarget,
    ReceivedResult,
    RecordedRequest,
    body_chunks,
    closed_port_url,
    expected_body,
    expected_sha256,
)

__all__ = [
    "AC_ENDPOINTS",
    "FakeACServer",
    "FakeTarget",
    "ReceivedResult",
    "RecordedRequest",
    "body_chunks",
    "closed_port_url",
    "expected_body",
    "expected_sha256",
]
