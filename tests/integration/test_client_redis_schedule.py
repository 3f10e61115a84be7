"""The client's retry policy reaches its Redis permits and shared rate limits.

The client is built against a Redis URL where nothing listens (127.0.0.1:1):
its start-up PING is refused on a real socket, so this is an integration test.
"""

from __future__ import annotations

from acagent.ac import ratelimit as ratelimit_module
from acagent.ac.backoff import Backoff
from acagent.ac.client import ACClient
from acagent.ac.permits import RedisPermits
from acagent.ac.ratelimit import SharedRateLimiter
from acagent.ac.retry import RetryPolicy
from acagent.config import AgentConfig


def test_the_clients_policy_sets_the_reconnect_schedule_of_its_permits_and_rate_limits() -> None:
    """Built, not run: no permit is taken; the client's one PING at start finds
    nothing on port 1, which it tolerates (an unreachable store is waited for)."""
    reconnect = Backoff(0.02, 0.5)
    config = AgentConfig(
        server_url="http://127.0.0.1:1",
        api_key="k",
        coordination_url="redis://127.0.0.1:1/0",
        rate_limit_per_min=60,
    )
    with ACClient(config, retry_policy=RetryPolicy(store_reconnect=reconnect)) as client:
        assert isinstance(client.permits, RedisPermits)
        assert client.permits.reconnect is reconnect
        for op_class in ratelimit_module.RateLimits.CLASSES:
            limiter = client.rate_limits[op_class]
            assert isinstance(limiter, SharedRateLimiter) and limiter.reconnect is reconnect
