"""The Fetcher's waits after each kind of failed get-task, against a real
FakeACServer: every wait is a schedule of the policy the Pipeline was given
(exact, with no spread), and the log says each failure once, plainly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Tuple

from helpers import WAIT, fast_policy, make_config, make_pipeline, running, wait_until

from acagent.ac.backoff import Backoff
from acagent.ac.retry import RetryPolicy
from acagent.testing import FakeACServer

#: every schedule exact, so each logged wait can be compared
POLICY = fast_policy(
    fetch=Backoff(0.01, 0.08),
    fetch_breaker=Backoff(0.03, 0.06),
    fetch_key_refused=Backoff(0.02, 0.04),
    breaker_threshold=5,
    default_rate_limit_wait=0.07,
    concurrency_wait_max=0.05,
)




def _run_until(
    tmp_path: Path,
    ac: FakeACServer,
    records: List[logging.LogRecord],
    last_message: str,
    policy: RetryPolicy = POLICY,
) -> List[logging.LogRecord]:
    """Run an agent until the Fetcher logged ``last_message``; its records up to it."""
    config = make_config(ac.url, tmp_path / "spool")

    def logged() -> bool:
        return any(_logged_as(r, last_message) for r in list(records))

    with running(make_pipeline(config, retry_policy=policy)):
        assert wait_until(logged, WAIT)
    return records[: next(i for i, r in enumerate(records) if _logged_as(r, last_message)) + 1]


def _logged_as(record: logging.LogRecord, message: str) -> bool:
    return record.getMessage().startswith(message)


def _lines(records: List[logging.LogRecord]) -> List[Tuple[str, object]]:
    return [(r.levelname, getattr(r, "wait_s", None)) for r in records]


def test_5xx_waits_brief_then_the_breaker_and_logs_warnings_up_to_the_threshold(
    tmp_path: Path, fetcher_log: List[logging.LogRecord]
) -> None:
    with FakeACServer(api_key="k") as ac:
        ac.inject("get-task", status=503, body=b"busy", times=8)
        got = _run_until(tmp_path, ac, fetcher_log, "get-task works again")
    assert _lines(got) == [
        # below the threshold: policy.fetch, 10 ms doubling
        ("WARNING", 0.01),
        ("WARNING", 0.02),
        ("WARNING", 0.04),
        ("WARNING", 0.08),
        # the 5th failure opens the breaker: policy.fetch_breaker; quieter after it
        ("WARNING", 0.03),
        ("DEBUG", 0.06),
        ("DEBUG", 0.06),
        ("DEBUG", 0.06),
        ("WARNING", None),
    ]
    assert all("503" in r.getMessage() for r in got[:-1])
    assert got[-1].getMessage() == "get-task works again after 8 failures"


def test_a_few_failures_close_quietly(tmp_path: Path, fetcher_log: List[logging.LogRecord]) -> None:
    with FakeACServer(api_key="k") as ac:
        ac.inject("get-task", reset=True, times=2)
        ac.add_task({"taskId": "after", "method": "GET", "url": "http://127.0.0.1:9/"})
        config = make_config(ac.url, tmp_path / "spool")
        with running(make_pipeline(config, retry_policy=POLICY)):
            assert ac.wait_for_results(1, WAIT)
    assert _lines(fetcher_log) == [("WARNING", 0.01), ("WARNING", 0.02)]
    assert not any(_logged_as(r, "get-task works again") for r in fetcher_log)


def test_a_refused_key_waits_its_own_schedule_and_errors_once(
    tmp_path: Path, fetcher_log: List[logging.LogRecord]
) -> None:
    with FakeACServer(api_key="k") as ac:
        ac.inject("get-task", status=401, times=4)
        got = _run_until(tmp_path, ac, fetcher_log, "the AC server accepts the API key again")
    # policy.fetch_key_refused, doubling to its cap; the ERROR at most once a minute
    assert _lines(got) == [("ERROR", 0.02), ("WARNING", None)]
    refused = [r for r in got if r.levelno == logging.ERROR]
    assert "HTTP 401" in refused[0].getMessage()
    assert ac.count("get-task", 401) == 4


def test_429_waits_what_the_server_asks_else_the_policys_rate_limit_waits(
    tmp_path: Path, fetcher_log: List[logging.LogRecord]
) -> None:
    with FakeACServer(api_key="k") as ac:
        ac.inject("get-task", status=429, headers={"X-Rate-Limit-Retry-After-Seconds": "0"})
        ac.inject("get-task", status=429, headers={"Retry-After": "0.09"})
        ac.inject("get-task", status=429, body=b"slow down")
        ac.inject("get-task", status=429, body=b"Too many concurrent requests")
        ac.inject("get-task", status=503)
        got = _run_until(tmp_path, ac, fetcher_log, "get-task: HTTP 503")
    waits = [getattr(r, "wait_s", None) for r in got]
    assert [r.levelname for r in got] == ["WARNING"] * 5
    assert waits[:3] == [0.0, 0.09, 0.07]  # server waits, then default_rate_limit_wait
    concurrency = waits[3]
    # the first such 429 lowers the effective limit (2 -> 1): the short wait for it
    lowered = RetryPolicy().lowered_concurrency_wait_max
    assert isinstance(concurrency, float) and 0.0 <= concurrency <= lowered
    assert "Too many concurrent requests" in got[3].getMessage()
    # a 429 is no failure of the server: the 503 after four of them is the first, brief
    assert waits[4] == 0.01
