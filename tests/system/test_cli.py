"""The command line: drop-in flags and environment names, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Dict, Optional

import pytest

from acagent import AgentConfig
from acagent.cli.options import _OPTIONS, config_from_args

BASE = ["--serverUrl", "https://ac.example", "--apiKey", "k"]


def parse(*argv: str, env: Optional[Dict[str, str]] = None) -> AgentConfig:
    return config_from_args([*BASE, *argv], env or {})


def test_defaults_match_the_design_card() -> None:
    cfg = parse()
    assert cfg.executor_pool_size == 10
    assert cfg.response_queue_threshold == 80
    assert cfg.ac_max_concurrent == 2
    assert cfg.rate_limit_per_min == 250
    assert cfg.verify is True
    assert cfg.upload_to_ac is True
    assert cfg.index == "_prod"
    assert cfg.read_timeout_seconds == 100 and cfg.connect_timeout == 15


def test_every_old_flag_is_accepted() -> None:
    cfg = parse(
        "--index",
        "_x",
        "--envName",
        "prod-eu",
        "--timeout",
        "12",
        "--verify",
        "false",
        "--debugMode",
        "true",
        "--poolSize",
        "7",
        "--rateLimitPerMin",
        "100",
        "--connectTimeout",
        "3",
        "--readTimeoutSeconds",
        "50",
        "--metricsRetentionDays",
        "3",
        "--uploadToAc",
        "false",
        "--enableStdoutLogging",
        "true",
        "--inwardProxyHttps",
        "http://in:3128",
        "--inwardProxyHttp",
        "http://in:3128",
        "--outgoingProxyHttps",
        "http://out:3128",
        "--outgoingProxyHttp",
        "http://out:3128",
        "--ipv4Fallback",
        "true",
    )
    assert cfg.index == "_x" and cfg.env_name == "prod-eu" and cfg.timeout == 12
    assert cfg.verify is False and cfg.debug_mode is True
    assert cfg.executor_pool_size == 7  # --poolSize is the old name of the executor size
    assert cfg.rate_limit_per_min == 100 and isinstance(cfg.rate_limit_per_min, int)
    assert cfg.connect_timeout == 3 and cfg.read_timeout_seconds == 50
    assert cfg.metrics_retention_days == 3 and cfg.upload_to_ac is False
    assert cfg.inward_proxies == {"http": "http://in:3128", "https": "http://in:3128"}
    assert cfg.outgoing_proxies == {"http": "http://out:3128", "https": "http://out:3128"}
    assert cfg.ipv4_fallback is True


def test_new_flags_and_precedence() -> None:
    cfg = parse(
        "--executorPoolSize",
        "30",
        "--poolSize",
        "5",
        "--responseQueueThreshold",
        "9",
        "--acMaxConcurrent",
        "1",
        "--allowedTargets",
        "jira.corp,*.corp,10.0.0.0/8",
    )
    assert cfg.executor_pool_size == 30  # the new name wins over the old one
    assert cfg.response_queue_threshold == 9 and cfg.ac_max_concurrent == 1
    assert cfg.allowed_targets == ("jira.corp", "*.corp", "10.0.0.0/8")


def test_bare_boolean_flag_means_true() -> None:
    assert parse("--uploadToAc").upload_to_ac is True
    assert parse("--debugMode").debug_mode is True


def test_environment_fallbacks() -> None:
    env = {
        "server_url": "https://env.example",
        "api_key": "envkey",
        "verify": "false",
        "timeout": "9",
        "metricsRetentionDays": "2",
        "EXECUTOR_POOL_SIZE": "13",
    }
    cfg = config_from_args([], env)
    assert cfg.server_url == "https://env.example" and cfg.api_key == "envkey"
    assert cfg.verify is False and cfg.timeout == 9
    assert cfg.metrics_retention_days == 2 and cfg.executor_pool_size == 13
    # a flag beats the environment
    assert config_from_args(["--timeout", "4"], env).timeout == 4


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--executorPoolSize", "abc"], "--executorPoolSize"),
        (["--executorPoolSize", "0"], "--executorPoolSize"),
        (["--rateLimitPerMin", "-1"], "--rateLimitPerMin"),
        (["--verify", "maybe"], "--verify"),
        (["--timeout", "0"], "--timeout"),
        (["--acMaxConcurrent", "100"], "--acMaxConcurrent"),
        (["--allowedTargets", "10.0.0.0/99"], "--allowedTargets"),
        (["--logFormat", "xml"], "--logFormat"),
        (["--healthAddr", "nope"], "--healthAddr"),
        (["--outgoingProxyHttps", "noscheme"], "--outgoingProxyHttps"),
    ],
)
def test_bad_value_exits_2_with_one_line_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args([*BASE, *argv], {})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert flag in err


def test_missing_server_url_or_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args(["--apiKey", "k"], {})
    assert exc.value.code == 2
    assert "--serverUrl" in capsys.readouterr().err


def test_help_documents_every_flag_and_the_process_exits_2_on_bad_input() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "acagent", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for flag, *_ in _OPTIONS:
        assert flag in out.stdout, flag
    bad = subprocess.run(
        [sys.executable, "-m", "acagent", *BASE, "--poolSize", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--poolSize" in bad.stderr


def test_api_key_not_in_config_repr() -> None:
    assert "super-secret-key" not in repr(parse("--apiKey", "super-secret-key"))


# -- the demo's output ----------------------------------------------------------
def test_demo_says_what_it_runs_and_prints_plain_progress_lines_when_piped() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", "demo", "--tasks", "40", "--targetLatency", "0.2",
         "--executorPoolSize", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("acagent demo: running 40 tasks") and "fake AC server" in lines[0]
    assert "\r" not in proc.stdout
    # 40 tasks x 0.2 s on 2 threads take >= 4 s: at least one plain progress line
    progress = [line for line in lines if "/40 results" in line]
    assert progress, proc.stdout
    assert "result                 OK" in proc.stdout


def test_demo_redraws_one_line_on_a_terminal() -> None:
    import os
    import pty
    import select

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "acagent", "demo", "--tasks", "20", "--targetLatency", "0.2",
             "--executorPoolSize", "2"],
            stdout=follower, stderr=subprocess.DEVNULL,
        )
        os.close(follower)
        chunks = []
        while True:
            ready, _, _ = select.select([leader], [], [], 120)
            assert ready, "the demo printed nothing for 120 s"
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(leader)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert out.startswith("acagent demo: running 20 tasks")
    assert "\r  " in out and "/20 results" in out
