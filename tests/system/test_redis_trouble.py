"""Starting, stopping and checking an agent whose Redis (``--coordinationUrl``) is in trouble.

Real agent processes against the fake AC server and a real redis-server: a
Redis that is down stops no agent and lets no AC call through; a stop while
it is down is as quick as any; a Redis that refuses the password is a
setting to fix, told in one line (exit 2); ``acagent check`` says at once
which of these it is, naming the flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import redis
from helpers import WAIT, AgentProcess, wait_until
from redis_fixture import redis_server  # noqa: F401 - the fixture

from acagent.testing import FakeACServer, LocalRedis, closed_port_url

#: an idle agent stops within this, whatever its Redis does
STOP_WITHIN = 2.0


def _agent(ac: FakeACServer, tmp: Path, url: str, *extra: str) -> AgentProcess:
    flags = ["--coordinationUrl", url, "--coordinationLease", "1", "--shutdownTimeout", "20"]
    return AgentProcess(ac.url, tmp / "spool", tmp / "agent.log", [*flags, *extra])


def _stop_time(agent: AgentProcess) -> float:
    signalled = time.monotonic()
    agent.signal(signal.SIGTERM)
    code = agent.wait(WAIT)
    took = time.monotonic() - signalled
    assert code == 0, agent.output()
    return took


def test_sigterm_to_an_idle_agent_whose_redis_went_down_exits_0_at_once(
    tmp_path: Path,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    with FakeACServer() as ac, _agent(ac, tmp_path, redis_server.url) as agent:
        assert ac.wait_for(lambda: ac.count("get-task") >= 2, WAIT), agent.output()
        redis_server.stop()
        assert wait_until(lambda: "unreachable" in agent.output(), WAIT), agent.output()
        took = _stop_time(agent)
        print(f"\nSIGTERM with Redis down: exit 0 after {took:.2f}s")
        assert took < STOP_WITHIN, agent.output()
        assert "aborted" not in agent.output()


def test_a_redis_down_at_start_holds_every_ac_call_until_it_is_up_and_a_stop_is_quick(
    tmp_path: Path,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    redis_server.stop()
    with FakeACServer() as ac, _agent(ac, tmp_path, redis_server.url) as agent:
        # fail safe: the agent runs, says why it makes no AC call, and makes none
        assert wait_until(lambda: "unreachable" in agent.output(), WAIT), agent.output()
        assert agent.proc.poll() is None
        assert ac.arrivals("get-task") == 0
        assert agent.output().count("ERROR") == 1  # once a minute, not once a try
        redis_server.start()
        assert ac.wait_for(lambda: ac.count("get-task") >= 2, WAIT), agent.output()
        redis_server.stop()
        took = _stop_time(agent)
        print(f"\nRedis down at start, up, down again: SIGTERM exit 0 after {took:.2f}s")
        assert took < STOP_WITHIN, agent.output()


def _refusing(server: LocalRedis) -> None:
    store = redis.Redis.from_url(server.url)
    store.config_set("requirepass", "the-right-one")
    store.close()


def _run(args: List[str], tmp: Path, env: dict) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acagent", *args, "--spoolDir", str(tmp / "spool")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env.update(extra)
    return env


def test_a_redis_that_refuses_the_password_stops_the_agent_with_one_line_exit_2(
    tmp_path: Path,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    _refusing(redis_server)
    wrong = tmp_path / "redis-password"
    wrong.write_text("not-it\n")
    wrong.chmod(0o600)
    base = ["run", "--serverUrl", closed_port_url(), "--apiKey", "k"]
    base += ["--enableFileLogging", "false", "--metricsFile", "false"]
    base += ["--coordinationUrl", redis_server.url]
    cases = {
        "none given": (base, _env()),
        "--coordinationPasswordFile": (
            [*base, "--coordinationPasswordFile", str(wrong)],
            _env(),
        ),
        "ACAGENT_COORDINATION_PASSWORD": (base, _env(ACAGENT_COORDINATION_PASSWORD="not-it")),
    }
    for source, (args, env) in cases.items():
        started = time.monotonic()
        proc = _run(args, tmp_path, env)
        took = time.monotonic() - started
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (source, proc.stdout, proc.stderr)
        assert len(lines) == 1, (source, proc.stderr)
        assert lines[0].startswith("acagent: error: argument --coordinationUrl: "), lines
        assert "refused to authenticate" in lines[0] and source in lines[0], lines
        assert "not-it" not in proc.stdout + proc.stderr
        assert took < 15, took


def test_check_says_within_seconds_that_the_redis_cannot_be_used(
    tmp_path: Path,
    redis_server: LocalRedis,  # noqa: F811
) -> None:
    with FakeACServer() as ac:
        base = ["check", "--serverUrl", ac.url, "--apiKey", "k"]
        up = _run([*base, "--coordinationUrl", redis_server.url], tmp_path, _env())
        assert up.returncode == 0, up.stdout + up.stderr
        assert "OK    coordination: --coordinationUrl redis://127.0.0.1:" in up.stdout
        down_url = closed_port_url().replace("http://", "redis://") + "/0"
        for url in (down_url, redis_server.url):
            if url == redis_server.url:
                _refusing(redis_server)
            started = time.monotonic()
            proc = _run([*base, "--coordinationUrl", url], tmp_path, _env())
            took = time.monotonic() - started
            print(f"\ncheck with an unusable Redis ({url}): answered in {took:.2f}s")
            assert proc.returncode == 1, proc.stdout + proc.stderr
            fail = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
            assert len(fail) == 1 and fail[0].startswith("FAIL  coordination: --coordinationUrl")
            assert "authenticate:" not in proc.stdout  # no get-task tried
            assert took < 15, proc.stdout
        assert ac.arrivals("get-task") == 1  # only the check with a usable Redis asked
