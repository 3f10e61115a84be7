"""The client's rate limits against a fake AC server: a spent fetch budget never
delays an upload, and an abort ends a wait for a token."""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List

from acagent import __version__
from acagent.ac.backoff import Backoff
from acagent.ac.client import ACClient
from acagent.ac.ratelimit import FETCH
from acagent.ac.retry import RetryPolicy
from acagent.config import AgentConfig
from acagent.errors import AgentStopping
from acagent.testing import FakeACServer

JOIN = 5.0


def test_exhausted_fetch_budget_does_not_delay_uploads_through_the_client() -> None:
    with FakeACServer(api_key="k") as ac:
        config = AgentConfig(server_url=ac.url, api_key="k", rate_limit_per_min=6)
        with ACClient(
            config, retry_policy=RetryPolicy(call=Backoff(0.05, 120.0, jitter=0.01))
        ) as client:
            assert client.rate_limits.per_minute == 6
            client.get_task()  # spends the only fetch token (next one in 10 s)
            assert not client.rate_limits[FETCH].acquire(timeout=0)
            started = time.monotonic()
            payload: Dict[str, Any] = {
                "taskId": "t1",
                "version": __version__,
                "statusCode": 200,
                "responseHeaders": {},
            }
            client.put_result(payload)
            assert time.monotonic() - started < 1.0
        assert list(ac.results) == ["t1"]


def test_client_abort_interrupts_a_rate_limit_wait() -> None:
    with FakeACServer(api_key="k") as ac:
        config = AgentConfig(server_url=ac.url, api_key="k", rate_limit_per_min=1)
        with ACClient(config) as client:
            client.get_task()  # the only token for a minute
            outcome: List[BaseException] = []

            def fetch() -> None:
                try:
                    client.get_task()
                except BaseException as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=fetch)
            thread.start()
            try:
                client.abort.set()
                thread.join(JOIN)
            finally:
                client.abort.set()
                thread.join(JOIN)
            assert not thread.is_alive()
            assert len(outcome) == 1 and isinstance(outcome[0], AgentStopping)
        assert ac.count("get-task") == 1
