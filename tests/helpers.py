"""Shared helpers of the reliability tests: fast stage subclasses, configs, subprocess agents.

Every wait here is bounded. ``wait_until`` polls a condition (for things no
event announces, such as files appearing in a spool folder written by another
process); it never sleeps to "let something happen".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from acagent import __version__
from acagent.ac.backoff import Backoff
from acagent.ac.client import ACClient
from acagent.ac.retry import RetryPolicy
from acagent.config import AgentConfig
from acagent.executor import Executor
from acagent.fetcher import Fetcher
from acagent.pipeline import Pipeline
from acagent.spool import LOCK_FILE
from acagent.testing import FakeACServer, FakeTarget
from acagent.uploader import Uploader

#: generous bound for one "this must happen" wait; a pass takes a fraction of it
WAIT = 20.0
#: the repository (tests read its docs, deployment files and packaging)
ROOT = Path(__file__).resolve().parent.parent


class FastFetcher(Fetcher):
    """Looks for room every 50 ms; its waits are ``fast_policy``'s schedules."""

    CAPACITY_POLL = 0.05


class FastUploader(Uploader):
    """Polls often; its retry waits are the policy's (``fast_policy``, set by ``make_pipeline``)."""

    POLL = 0.05


class FastExecutor(Executor):
    POLL = 0.05


def fast_policy(**changes: Any) -> RetryPolicy:
    values: Dict[str, Any] = {
        "concurrency_wait_max": 0.05,
        "default_rate_limit_wait": 0.05,
        # every stage schedule in tens of milliseconds
        "result": Backoff(0.05, 0.3, 0.5),
        "result_key_refused": Backoff(0.05, 0.3, 0.2),
        "fetch": Backoff(0.05, 0.2, 0.5),
        "fetch_breaker": Backoff(0.05, 0.2, 0.2),
        "upload_breaker": Backoff(0.05, 0.3),
        "fetch_key_refused": Backoff(0.05, 0.2),
    }
    values.update(changes)
    return RetryPolicy(**values)


def make_config(server_url: str, spool_dir: Path, **changes: Any) -> AgentConfig:
    values: Dict[str, Any] = {
        "server_url": server_url,
        "api_key": "k",
        "spool_dir": str(spool_dir),
        "poll_interval": 0.02,
        "poll_jitter": 0.0,
        "rate_limit_per_min": 0,
        "shutdown_timeout": 10.0,
    }
    values.update(changes)
    return AgentConfig(**values)


def make_pipeline(config: AgentConfig, **kw: Any) -> Pipeline:
    kw.setdefault("fetcher", FastFetcher)
    kw.setdefault("uploader", FastUploader)
    kw.setdefault("executor", FastExecutor)
    kw.setdefault("retry_policy", fast_policy())
    return Pipeline(config, **kw)


@contextlib.contextmanager
def running(pipeline: Pipeline, stop_timeout: float = 10.0) -> Iterator[Pipeline]:
    """Start ``pipeline``; on exit stop it (bounded) and check its threads ended."""
    pipeline.start()
    try:
        yield pipeline
    finally:
        pipeline.stop(timeout=stop_timeout)
        assert pipeline.wait_stopped(1.0)
        assert not pipeline.fetcher.is_alive()
        assert not pipeline.uploader.is_alive()


def wait_until(
    predicate: Callable[[], bool], timeout: float = WAIT, interval: float = 0.02
) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def spool_names(spool_dir: Path) -> List[str]:
    """The names in a spool folder, less the lock file every running agent keeps there."""
    return sorted(p.name for p in spool_dir.iterdir() if p.name != LOCK_FILE)


def spool_records(spool_dir: Path) -> List[Dict[str, Any]]:
    """The saved result records in a spool folder (``<key>.json``), parsed."""
    records = []
    if not spool_dir.is_dir():
        return records
    for path in sorted(spool_dir.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; the next poll sees it
    return records


def spool_task_ids(spool_dir: Path) -> List[str]:
    return [str(r["fields"].get("taskId")) for r in spool_records(spool_dir)]


def saved_results(spool_dir: Path) -> List[Dict[str, Any]]:
    """The result records in a spool folder, not the journals of tasks still running."""
    return [r for r in spool_records(spool_dir) if r.get("failure") != "interrupted"]


def bytes_task(
    target: FakeTarget, task_id: str, size: int, seed: int, **extra: Any
) -> Dict[str, Any]:
    """A GET task for ``size`` bytes from ``target`` (``seed`` varies the body)."""
    task = {"taskId": task_id, "method": "GET", "url": f"{target.url}/bytes/{size}?seed={seed}"}
    task.update(extra)
    return task


def bytes_tasks(target: FakeTarget, prefix: str, n: int, size: int) -> List[Dict[str, str]]:
    """``n`` GET tasks for ``size`` bytes each from ``target``, ids ``<prefix>-<i>``."""
    return [
        {"taskId": f"{prefix}-{i}", "method": "GET", "url": f"{target.url}/bytes/{size}?seed={i}"}
        for i in range(n)
    ]


def leave_results_in_spool(
    ac: FakeACServer, spool: Path, key: str, tasks: List[Dict[str, str]]
) -> None:
    """Run an agent whose uploads the server refuses, until every task's result
    is saved and was offered once; stop it: the results stay in the spool."""
    ids = [t["taskId"] for t in tasks]
    # longer than any wait of a test: the server refuses until told otherwise
    ac.refuse_results(ids, status=503, seconds=600.0)
    config = make_config(ac.url, spool, api_key=key, executor_pool_size=2, shutdown_timeout=1.0)
    with running(make_pipeline(config), stop_timeout=1.0):
        ac.add_tasks(tasks)
        assert wait_until(lambda: len(saved_results(spool)) == len(tasks), WAIT)
        assert ac.wait_for(
            lambda: ac.count("put-result") + ac.count("upload-result") >= len(tasks), WAIT
        )
    assert ac.results == {}
    ac.refuse_results(ids, status=503, seconds=0.0)  # refused no more


def assert_one_line_exit_2(proc: subprocess.CompletedProcess[str], flag: str) -> str:
    """The CLI refused to start: exit 2, one stderr line naming ``flag``, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    return lines[0]


def peak_rss_kb(pid: int) -> int:
    """VmHWM (peak resident set size, kB) of a live process."""
    status = Path(f"/proc/{pid}/status")
    assert status.exists(), "this test reads /proc/<pid>/status (Linux)"
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in {status}")


# --------------------------------------------------------------------------
# the CLI as a subprocess
# --------------------------------------------------------------------------


class AgentProcess:
    """``python -m acagent`` in a subprocess; its combined output goes to a file."""

    def __init__(
        self,
        server_url: str,
        spool_dir: Path,
        log_path: Path,
        extra: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
        api_key: Optional[str] = "k",
    ) -> None:
        """``api_key`` None: no ``--apiKey`` (give ``--apiKeyFile`` in ``extra``)."""
        args = [
            sys.executable,
            "-m",
            "acagent",
            "--serverUrl",
            server_url,
            *(["--apiKey", api_key] if api_key is not None else []),
            "--spoolDir",
            str(spool_dir),
            "--pollInterval",
            "0.05",
            "--rateLimitPerMin",
            "0",
            "--enableFileLogging",
            "false",
            "--metricsFile",
            "false",
            *extra,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.log_path = log_path
        self._log = open(log_path, "ab")  # closed in wait()/kill()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(spool_dir.parent),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> Optional[int]:
        """Exit code, or None if it did not exit within ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- ACClient tests (test_client.py, test_retry.py) ----------------------------

#: short retry waits for client tests
FAST_CLIENT = RetryPolicy(call=Backoff(0.05, 120.0, jitter=0.01), concurrency_wait_max=0.1)


def make_client(ac: FakeACServer, policy: RetryPolicy = FAST_CLIENT, **settings: Any) -> ACClient:
    config = AgentConfig(server_url=ac.url, api_key="k", rate_limit_per_min=0, **settings)
    return ACClient(config, retry_policy=policy)


def result_payload(task_id: str, **extra: Any) -> Dict[str, Any]:
    """A minimal put-result body."""
    payload: Dict[str, Any] = {
        "taskId": task_id,
        "version": __version__,
        "statusCode": 200,
        "responseHeaders": {},
    }
    payload.update(extra)
    return payload


class FakeClock:
    """A clock for code that takes one (``clock=``): time moves only when a test moves ``now``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
