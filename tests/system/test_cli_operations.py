"""Operating the CLI agent: signals, status line, log formats, log files.

Each test runs ``python -m acagent`` as a subprocess against the fake AC
server and reads its stdout through a pipe (a reader thread; every wait is
bounded by a condition with a timeout).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence

import pytest
import requests
from helpers import bytes_task

from acagent.cli.options import config_from_args
from acagent.testing import FakeACServer, FakeTarget

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")

WAIT = 30.0
API_KEY = "cli-ops-key-93a7e1"


class AgentCLI:
    """``python -m acagent ...`` with stdout and stderr read line by line."""

    def __init__(self, args: Sequence[str], env: Dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "acagent", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(cwd),
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout)),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: IO[str], into: List[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = WAIT) -> Optional[str]:
        """The first stdout line matching ``predicate``, waiting up to ``timeout``."""
        found: List[str] = []

        def match() -> bool:
            found[:] = [line for line in self.stdout if predicate(line)][:1]
            return bool(found) or self.proc.poll() is not None

        with self._cond:
            self._cond.wait_for(match, timeout)
            match()
        return found[0] if found else None

    def count(self, predicate: Callable[[str], bool]) -> int:
        with self._cond:
            return sum(1 for line in self.stdout if predicate(line))

    def wait_count(self, predicate: Callable[[str], bool], n: int, timeout: float = WAIT) -> bool:
        """Wait until ``n`` stdout lines match ``predicate``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.count(predicate) >= n, timeout)

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = WAIT) -> int:
        """Exit code after the process ended and its output was read to the end."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
            assert not reader.is_alive()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.stdout) + "\n--- stderr ---\n" + "\n".join(self.stderr)


@pytest.fixture
def agent_env(tmp_path: Path) -> Dict[str, str]:
    """The environment of the subprocess: its default <tmp> is inside tmp_path."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    for name in ("server_url", "api_key", "EXECUTOR_POOL_SIZE", "timeout", "verify"):
        env.pop(name, None)
    return env


def base_args(ac: FakeACServer, tmp_path: Path, *extra: str) -> List[str]:
    return [
        "--serverUrl",
        ac.url,
        "--apiKey",
        API_KEY,
        "--spoolDir",
        str(tmp_path / "spool"),
        "--pollInterval",
        "0.05",
        "--rateLimitPerMin",
        "0",
        "--shutdownTimeout",
        "10",
        *extra,
    ]


@pytest.fixture
def spawn(tmp_path: Path, agent_env: Dict[str, str]) -> Iterator[Callable[[List[str]], AgentCLI]]:
    started: List[AgentCLI] = []

    def start(args: List[str]) -> AgentCLI:
        agent = AgentCLI(args, agent_env, tmp_path)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


def is_started(line: str) -> bool:
    return " started: executor=" in line


# ---------------------------------------------------------------------------
def test_log_dir_flag_maps_to_the_config(tmp_path: Path) -> None:
    config = config_from_args(
        ["--serverUrl", "http://ac.local", "--apiKey", "k", "--logDir", str(tmp_path)], environ={}
    )
    assert config.log_dir == str(tmp_path)
    assert config.resolved_log_dir() == str(tmp_path)
    default = config_from_args(["--serverUrl", "http://ac.local", "--apiKey", "k"], environ={})
    assert default.log_dir is None
    assert default.enable_file_logging and default.enable_metrics_file  # today's defaults


def test_sigusr1_logs_a_status_line_and_sigterm_exits_0(
    ac: FakeACServer, tmp_path: Path, spawn: Callable[[List[str]], AgentCLI]
) -> None:
    agent = spawn(
        base_args(
            ac,
            tmp_path,
            "--statusInterval",
            "3600",
            "--healthAddr",
            "127.0.0.1:0",
            "--enableFileLogging",
            "false",
            "--metricsFile",
            "false",
        )
    )
    listener = agent.wait_line(lambda line: "health listener on http://" in line)
    assert listener is not None, agent.output()
    health = re.search(r"http://127\.0\.0\.1:\d+", listener)
    assert health is not None and not health.group(0).endswith(":0")
    assert agent.wait_line(is_started) is not None, agent.output()
    assert ac.wait_for_requests("get-task", 1, timeout=WAIT)
    r = requests.get(health.group(0) + "/healthz", timeout=5)
    assert r.status_code == 200

    def is_status(line: str) -> bool:
        return "status: fetched=" in line

    assert agent.count(is_status) == 0  # an hour between status lines: none yet
    agent.send(signal.SIGUSR1)
    line = agent.wait_line(is_status)
    assert line is not None, agent.output()
    assert "queue task=" in line and "ac_inflight=" in line and "per-min" in line
    assert agent.proc.poll() is None  # SIGUSR1 does not stop the agent

    agent.send(signal.SIGUSR1)
    assert agent.wait_count(is_status, 2), agent.output()

    agent.send(signal.SIGTERM)
    assert agent.finish() == 0, agent.output()
    assert agent.wait_line(lambda line: "exiting (all results delivered)" in line) is not None
    assert API_KEY not in agent.output()


def test_json_logs_one_object_per_line_with_task_ids(
    ac: FakeACServer,
    target: FakeTarget,
    tmp_path: Path,
    spawn: Callable[[List[str]], AgentCLI],
) -> None:
    ids = [f"json-task-{i}-x" for i in range(4)]
    ac.add_tasks(bytes_task(target, tid, 200 + i, i) for i, tid in enumerate(ids))
    agent = spawn(
        base_args(
            ac,
            tmp_path,
            "--logFormat",
            "json",
            "--debugMode",
            "true",
            "--enableFileLogging",
            "false",
            "--metricsFile",
            "false",
        )
    )
    assert ac.wait_for_results(len(ids), timeout=WAIT), agent.output()
    for tid in ids:
        marker = f'"task_id": "{tid}"'
        assert agent.wait_line(lambda line: marker in line and "delivered" in line)
    agent.send(signal.SIGTERM)
    assert agent.finish() == 0, agent.output()

    records = []
    for line in agent.stdout:
        assert line.startswith("{") and line.endswith("}"), line
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        assert list(obj)[:5] == ["ts", "level", "logger", "thread", "msg"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"]), line
        records.append(obj)
    assert any(r["level"] == "DEBUG" for r in records)  # --debugMode took effect
    assert any(" started: executor=" in r["msg"] for r in records)
    assert API_KEY not in "\n".join(agent.stdout + agent.stderr)
    assert "Traceback" not in "\n".join(agent.stderr), agent.output()

    for tid in ids:
        about = [r for r in records if tid in r["msg"] or r.get("task_id") == tid]
        for r in about:
            assert r.get("task_id") == tid, r  # a line naming a task carries its id
        threads = {r["thread"] for r in about}
        assert any(t.startswith("acagent-exec") for t in threads), (tid, threads)
        assert any(t.startswith("acagent-uploader") for t in threads), (tid, threads)
        messages = [r["msg"] for r in about]
        assert any(m.startswith("result ready: status=200") for m in messages), messages
        assert any(m.startswith("result delivered via") for m in messages), messages
        assert any(m == "put-result -> 200" for m in messages), messages
    for r in records:
        if r["thread"].startswith("acagent-exec"):
            assert r.get("task_id") in ids, r  # executor threads only log for a task


def test_file_logging_and_metrics_file_under_log_dir(
    ac: FakeACServer,
    target: FakeTarget,
    tmp_path: Path,
    agent_env: Dict[str, str],
    spawn: Callable[[List[str]], AgentCLI],
) -> None:
    ac.add_tasks(bytes_task(target, f"file-{i}", 300, i) for i in range(2))
    log_dir = tmp_path / "custom-logs"
    agent = spawn(
        base_args(
            ac,
            tmp_path,
            "--enableFileLogging",
            "true",
            "--logDir",
            str(log_dir),
            "--index",
            "_ops",
        )
    )
    assert agent.wait_line(is_started) is not None, agent.output()
    assert ac.wait_for_results(2, timeout=WAIT)
    agent.send(signal.SIGTERM)
    assert agent.finish() == 0, agent.output()

    log_file = log_dir / "app_log_ops.log"
    assert log_file.is_file(), sorted(str(p) for p in tmp_path.rglob("*"))
    assert stat.S_IMODE(log_file.stat().st_mode) & 0o077 == 0
    file_lines = log_file.read_text(encoding="utf-8").splitlines()
    assert file_lines == agent.stdout  # the same records, in the same text format
    assert any(is_started(line) for line in file_lines)
    assert any("stopped (drained)" in line for line in file_lines)
    assert API_KEY not in log_file.read_text(encoding="utf-8")

    metrics_file = log_dir / "metrics" / "metrics_ops.json"
    assert metrics_file.is_file()
    lines = [json.loads(x) for x in metrics_file.read_text(encoding="utf-8").splitlines()]
    uploads = [x for x in lines if x["tags"]["operation"] == "put-result"]
    assert sorted(x["tags"]["task_id"] for x in uploads) == ["file-0", "file-1"]
    assert all(list(x) == ["@timestamp", "metric_name", "value", "tags"] for x in lines)

    # nothing went to the default folder
    default_log = Path(agent_env["XDG_STATE_HOME"]) / "acagent" / "log"
    assert not (default_log / "app_log_ops.log").exists()
    assert not (default_log / "metrics" / "metrics_ops.json").exists()


def test_default_file_logging_goes_to_the_state_folder(
    ac: FakeACServer,
    tmp_path: Path,
    agent_env: Dict[str, str],
    spawn: Callable[[List[str]], AgentCLI],
) -> None:
    agent = spawn(base_args(ac, tmp_path, "--index", "_dflt"))
    assert agent.wait_line(is_started) is not None, agent.output()
    assert ac.wait_for_requests("get-task", 1, timeout=WAIT)
    start = time.monotonic()
    agent.send(signal.SIGTERM)
    assert agent.finish() == 0, agent.output()
    assert time.monotonic() - start < WAIT
    default_log = Path(agent_env["XDG_STATE_HOME"]) / "acagent" / "log"
    assert (default_log / "app_log_dflt.log").is_file()
    assert (default_log / "metrics" / "metrics_dflt.json").is_file()
