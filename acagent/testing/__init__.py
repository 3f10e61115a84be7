"""Real HTTP servers for tests: a fake ArmorCode server and a fake target tool.

Both fakes are threaded HTTP/1.1 servers (keep-alive, TCP_NODELAY) on
``127.0.0.1`` with an ephemeral port. They are context managers::

    from acagent.testing import FakeACServer, FakeTarget, expected_body

    with FakeTarget() as target, FakeACServer(max_concurrent=2) as ac:
        ac.add_task({"taskId": "t1", "method": "GET", "url": target.url + "/bytes/1000?seed=7"})
        ...  # run the agent against ac.url
        assert ac.wait_for_results(1, timeout=10)
        assert ac.results["t1"][0].body == expected_body(1000, 7)

``FakeACServer`` speaks the http-teleport protocol (see docs/protocol.md): it hands
out queued tasks, records every result it receives as a ``ReceivedResult``,
counts the requests in flight (the concurrency invariant is checked at a real
server, not at a mock) and injects faults. A second listener plays S3 so that
presigned-URL traffic is not counted as AC traffic.

``FakeTarget`` plays an internal tool: deterministic bodies of any size,
streamed and never built whole in memory (``body_chunks``), content encodings,
chunked replies, and faults (reset, short body, bad encoding, endless body).

``LocalRedis`` is a private ``redis-server`` on 127.0.0.1 (no persistence);
``find_redis_server()`` finds the binary: on PATH first, else the one the
``test`` extra bundles.

``PausableProxy`` is a TCP link that can stall (``pause``/``resume``), e.g.
between an agent and its Redis.

Every thread the fakes start is named, stops on ``stop()`` and is joined with
a timeout; every blocking wait inside them is bounded.
"""

from __future__ import annotations

from .bodies import body_chunks, expected_body, expected_sha256
from .fake_ac import AC_ENDPOINTS, FakeACServer, ReceivedResult
from .fake_target import FakeTarget
from .httpserver import RecordedRequest, closed_port_url
from .localredis import REDIS_SERVER_MISSING, LocalRedis, find_redis_server
from .tcpproxy import PausableProxy

__all__ = [
    "AC_ENDPOINTS",
    "REDIS_SERVER_MISSING",
    "FakeACServer",
    "FakeTarget",
    "LocalRedis",
    "PausableProxy",
    "ReceivedResult",
    "RecordedRequest",
    "body_chunks",
    "closed_port_url",
    "expected_body",
    "expected_sha256",
    "find_redis_server",
]
