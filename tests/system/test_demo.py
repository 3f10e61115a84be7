"""The demos say what a production run would be limited to, and print plain lines to a pipe."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from redis_fixture import require_redis_server

from acagent.cli.demo import Progress, not_as_a_default_run, settings_notice
from acagent.config import AgentConfig

DEFAULT_RATE = AgentConfig(server_url="https://ac.example", api_key="k").rate_limit_per_min


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"rate_limit_per_min": DEFAULT_RATE}, []),
        (
            {"rate_limit_per_min": 0},
            [
                f"--rateLimitPerMin 0: rate limit off here; a default run is limited to "
                f"{DEFAULT_RATE} get-tasks/min and {DEFAULT_RATE} uploads/min, so at most "
                f"{DEFAULT_RATE} tasks/min"
            ],
        ),
        ({"executor_pool_size": 20}, ["--executorPoolSize 20 (a default run: 10)"]),
        ({"poll_interval": 0.05, "upload_to_ac": False},
         ["--pollInterval 0.05 (a default run: 1)", "--uploadToAc false (a default run: true)"]),
        # where things go, and secrets, are not limits
        ({"api_key": "demo-key", "spool_dir": "/tmp/x", "enable_file_logging": True}, []),
    ],
)
def test_what_differs_from_a_default_run(settings: dict, expected: list) -> None:
    assert not_as_a_default_run(settings) == expected


def test_the_shared_rate_limit_is_one_for_all_agents() -> None:
    (line,) = not_as_a_default_run({"rate_limit_per_min": 0}, shared=True)
    assert line.endswith("(all agents on the key together)")
    assert settings_notice({}) == "  settings: those of a default run\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_writes_plain_lines_elsewhere() -> None:
    terminal = _Terminal()
    shown = Progress(terminal, every=0.0)
    shown.show("  1/3 results")
    shown.show("  2/3")
    shown.done()
    assert terminal.getvalue() == "\r  1/3 results\r  2/3        \r     \r"
    piped = io.StringIO()
    plain = Progress(piped, every=0.0)
    plain.show("  1/3 results")
    plain.show("  2/3 results")
    plain.done()
    assert piped.getvalue() == "  1/3 results\n  2/3 results\n"
    # plain lines come at most once per `every` seconds
    sparse = io.StringIO()
    rare = Progress(sparse, every=3600.0)
    for n in range(5):
        rare.show(f"  {n}/5 results")
    assert sparse.getvalue() == ""


def _run_piped(args: list, timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", "demo", *args],
        capture_output=True, timeout=timeout,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "\r" not in out, "a pipe gets plain lines, never a redrawn one"
    return out


def test_demo_piped_names_the_production_limits_once() -> None:
    out = _run_piped(["--tasks", "20", "--targetLatency", "0.3", "--executorPoolSize", "2"], 300)
    lines = out.splitlines()
    assert lines[0].startswith("acagent demo: running 20 tasks")
    assert lines[1] == "  not as in a default production run:"
    limit = f"rate limit off here; a default run is limited to {DEFAULT_RATE} get-tasks/min"
    assert out.count(limit) == 1, out
    assert "--pollInterval 0.05 (a default run: 1)" in out
    # 20 tasks x 0.3 s on 2 threads take >= 3 s: plain progress lines
    assert any(re.fullmatch(r"  \d+/20 results .*", line) for line in lines), out
    assert "tasks/min (" in out and f"a default run: at most {DEFAULT_RATE} tasks/min" in out
    assert "result                 OK" in out


def test_demo_with_agents_piped_prints_plain_progress_lines() -> None:
    require_redis_server()
    out = _run_piped(["--agents", "2", "--tasks", "40", "--acLatency", "0.02"], 180)
    lines = out.splitlines()
    assert lines[0] == (
        "acagent demo: 2 agent processes on one API key, 40 tasks, "
        "against a fake AC server (2 requests at once) on 127.0.0.1"
    )
    assert f"so at most {DEFAULT_RATE} tasks/min (all agents on the key together)" in out
    assert "--coordinationLease 3 (a default run: 10)" in out
    # the agents take seconds to start: at least one plain progress line
    assert any(re.fullmatch(r"  \d+/40 results .*", line) for line in lines), out
    assert "results exactly once   40/40" in out
