"""Every flag can be set as ``ACAGENT_<FLAG_IN_UPPER_SNAKE>``; flag > ACAGENT_* > old name > default."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import trustme

from acagent import AgentConfig
from acagent.cli.options import _OPTIONS, build_parser, config_from_args, env_name_for, startup_line
from acagent.testing import FakeACServer

#: values tried in turn for a flag the test has no special value for; the first
#: one the CLI accepts and that differs from the default is used
CANDIDATES = [
    "7",
    "3",
    "2.5",
    "json",
    "127.0.0.1:0",
    "http://proxy.example:3128",
    "10.0.0.0/8",
    "redis://127.0.0.1:6379/0",
    "x-custom-secret",
    "_env",
]


@pytest.fixture
def base_env(tmp_path: Path) -> Dict[str, str]:
    return {
        "ACAGENT_SERVER_URL": "https://ac.example",
        "ACAGENT_API_KEY": "env-key",
        "ACAGENT_SPOOL_DIR": str(tmp_path / "spool"),
        "ACAGENT_LOG_DIR": str(tmp_path / "log"),
    }


def _exits(env: Dict[str, str]) -> bool:
    try:
        config_from_args([], env)
    except SystemExit:
        return True
    return False


def _special(flag: str, tmp_path: Path) -> List[str]:
    if flag == "--caBundle":
        path = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(path))
        return [str(path)]
    if flag in ("--spoolDir", "--logDir"):
        return [str(tmp_path / flag.strip("-"))]
    if flag == "--serverUrl":
        return ["https://other.example"]
    if flag == "--apiKey":
        return ["other-key"]
    if flag in ("--apiKeyFile", "--coordinationPasswordFile"):
        path = tmp_path / flag.strip("-")
        path.write_text("from-a-file\n")
        path.chmod(0o600)
        return [str(path)]
    return []


def test_env_name_is_derived_from_the_flag() -> None:
    assert env_name_for("--executorPoolSize") == "ACAGENT_EXECUTOR_POOL_SIZE"
    assert env_name_for("--acMaxConcurrent") == "ACAGENT_AC_MAX_CONCURRENT"
    assert env_name_for("--ipv4Fallback") == "ACAGENT_IPV4_FALLBACK"
    assert env_name_for("--serverUrl") == "ACAGENT_SERVER_URL"
    assert env_name_for("--timeout") == "ACAGENT_TIMEOUT"


@pytest.mark.parametrize("row", _OPTIONS, ids=[row[0] for row in _OPTIONS])
def test_every_flag_is_settable_from_its_acagent_variable(
    row: Any, base_env: Dict[str, str], tmp_path: Path
) -> None:
    flag, field, kind, _legacy, _help = row
    name = env_name_for(flag)
    env = {k: v for k, v in base_env.items() if k != name}
    if flag in ("--serverUrl", "--apiKey"):
        env[name] = _special(flag, tmp_path)[0]
        cfg = config_from_args([], env)
        assert getattr(cfg, field) == env[name]
        return
    if flag == "--apiKeyFile":  # instead of the key itself, not on top of it
        env = {k: v for k, v in env.items() if k != "ACAGENT_API_KEY"}
        env[name] = _special(flag, tmp_path)[0]
        cfg = config_from_args([], env)
        assert (cfg.api_key_file, cfg.api_key) == (env[name], "from-a-file")
        return
    default = config_from_args([], env)
    target = "executor_pool_size" if field == "pool_size" else field
    candidates = _special(flag, tmp_path)
    if kind.__name__ == "str2bool":
        candidates = ["false" if getattr(default, target) else "true"]
    candidates += CANDIDATES
    for value in candidates:
        trial = {**env, name: value}
        if _exits(trial):
            continue
        cfg = config_from_args([], trial)
        if getattr(cfg, target) != getattr(default, target):
            break
    else:
        pytest.fail(f"no value of {name} changed {target}")
    # the flag itself still wins over the variable
    on_flag = config_from_args([flag, value], {**env, name: "not-a-valid-value-" + value})
    assert getattr(on_flag, target) == getattr(cfg, target)


def test_a_bad_acagent_value_exits_2_naming_variable_and_flag(
    base_env: Dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        config_from_args([], {**base_env, "ACAGENT_EXECUTOR_POOL_SIZE": "many"})
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "ACAGENT_EXECUTOR_POOL_SIZE" in err[0] and "--executorPoolSize" in err[0]


def test_precedence_flag_then_acagent_then_old_name_then_default(
    base_env: Dict[str, str],
) -> None:
    env = dict(base_env)
    assert config_from_args([], env).executor_pool_size == 10
    env["EXECUTOR_POOL_SIZE"] = "11"
    assert config_from_args([], env).executor_pool_size == 11
    env["ACAGENT_EXECUTOR_POOL_SIZE"] = "12"
    assert config_from_args([], env).executor_pool_size == 12
    assert config_from_args(["--executorPoolSize", "13"], env).executor_pool_size == 13
    # the old names of today's agent still work alone
    old = {"server_url": "https://old.example", "api_key": "old", "verify": "false",
           "ACAGENT_SPOOL_DIR": base_env["ACAGENT_SPOOL_DIR"],
           "ACAGENT_LOG_DIR": base_env["ACAGENT_LOG_DIR"]}
    cfg = config_from_args([], old)
    assert cfg.server_url == "https://old.example" and cfg.verify is False
    # an empty variable counts as unset
    assert config_from_args([], {**env, "ACAGENT_EXECUTOR_POOL_SIZE": ""}).executor_pool_size == 11


def test_help_names_the_variable_of_every_flag() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag, *_ in _OPTIONS:
        assert env_name_for(flag) in text, flag
    assert "precedence: flag, then ACAGENT_* variable, then old name, then default" in text


def test_startup_line_shows_version_server_spool_log_and_changes_only(
    base_env: Dict[str, str],
) -> None:
    env = {
        **base_env,
        "ACAGENT_SERVER_URL": "https://user:pw@ac.example/base?token=q",
        "ACAGENT_OUTGOING_PROXY_HTTPS": "http://puser:ppass@proxy.example:3128",
        "ACAGENT_EXECUTOR_POOL_SIZE": "12",
    }
    cfg = config_from_args([], env)
    line = startup_line(cfg)
    from acagent import __version__

    assert f"acagent {__version__}" in line
    assert "server=https://ac.example/base" in line
    assert f"spool={base_env['ACAGENT_SPOOL_DIR']}" in line
    assert f"log_file={os.path.join(base_env['ACAGENT_LOG_DIR'], 'app_log_prod.log')}" in line
    assert "executor_pool_size=12" in line
    assert "outgoing_proxy_https=http://proxy.example:3128" in line
    for secret in ("env-key", "pw", "token", "ppass", "puser"):
        assert secret not in line, secret
    # defaults (the CLI's own included) are not listed
    assert "enable_file_logging" not in line and "ac_max_concurrent" not in line
    fields = {f.name for f in dataclasses.fields(AgentConfig)}
    assert "api_key" in fields and "api_key" not in line


def test_check_through_the_cli_with_only_acagent_variables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    with FakeACServer(api_key="env-only-key") as ac:
        env.update(
            ACAGENT_SERVER_URL=ac.url,
            ACAGENT_API_KEY="env-only-key",
            ACAGENT_SPOOL_DIR=str(tmp_path / "spool"),
            ACAGENT_LOG_DIR=str(tmp_path / "log"),
            ACAGENT_EXECUTOR_POOL_SIZE="3",
        )
        proc = subprocess.run(
            [sys.executable, "-m", "acagent", "check"],
            capture_output=True, text=True, timeout=120, env=env,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "executor_pool_size=3" in proc.stdout
    assert f"spool={tmp_path / 'spool'}" in proc.stdout
    assert ac.count("get-task") == 1


def test_run_logs_the_startup_line_before_the_pipeline_starts(tmp_path: Path) -> None:
    import json
    import signal

    from helpers import AgentProcess, wait_until

    spool = tmp_path / "spool"
    with FakeACServer(api_key="run-key") as ac, AgentProcess(
        ac.url,
        spool,
        tmp_path / "agent.log",
        extra=["--logFormat", "json"],
        env={"ACAGENT_EXECUTOR_POOL_SIZE": "4"},
        api_key="run-key",
    ) as agent:
        assert wait_until(lambda: ac.count("get-task") >= 1, timeout=30)
        agent.signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0
        output = agent.output()
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        url = ac.url
    messages = [line["msg"] for line in lines]
    first = next((i for i, m in enumerate(messages) if m.startswith("acagent ")), None)
    assert first is not None, output
    started = next(i for i, m in enumerate(messages) if " started: " in m)
    assert first < started
    line = messages[first]
    assert f"server={url}" in line and f"spool={spool}" in line
    assert "log_file=off" in line and "executor_pool_size=4" in line
    assert "run-key" not in agent.output()


def test_old_pool_size_flag_beats_the_new_names_variable(base_env: Dict[str, str]) -> None:
    env = {**base_env, "ACAGENT_EXECUTOR_POOL_SIZE": "12"}
    assert config_from_args(["--poolSize", "5"], env).executor_pool_size == 5
    assert config_from_args(["--poolSize", "5", "--executorPoolSize", "6"], env).executor_pool_size == 6
    assert config_from_args([], {**env, "ACAGENT_POOL_SIZE": "5"}).executor_pool_size == 12


def test_describe_hides_credentials_in_any_url_setting() -> None:
    cfg = AgentConfig(
        server_url="https://ac.example",
        api_key="k",
        inward_proxy_http="http://u:inward-secret@in.example:3128",
        env_name="redis://:redis-secret@r.example:6379/0",  # any str field holding a URL
    )
    line = cfg.describe()
    assert "inward-secret" not in line and "redis-secret" not in line
    assert "inward_proxy_http=http://in.example:3128" in line
