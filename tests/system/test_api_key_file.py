"""The API key from a file, rotated without a restart; start-up checks an operator sees.

- ``--apiKeyFile`` / ``ACAGENT_API_KEY_FILE`` (and ``--coordinationPasswordFile``):
  read at start, one trailing newline dropped; a missing, unreadable or empty
  file, or a key given twice, exits 2 with one line naming the flag;
- the server starts refusing the key while tasks flow, and the file gets the
  new key 3 s later: fetching resumes within 2 s of the rewrite, every result
  arrives once and intact, and no log line (text or JSON, debug on) holds
  either key;
- SIGHUP re-reads the file and never ends the agent;
- warnings (``--apiKey`` in the process list, a readable key file,
  ``--acMaxConcurrent`` above the server's limit), non-finite numbers,
  the health port taken, the 429 "Too many concurrent requests" log line.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers import (
    WAIT,
    AgentProcess,
    FastUploader,
    fast_policy,
    make_config,
    make_pipeline,
    running,
    wait_until,
)

from acagent import logs
from acagent.ac.backoff import Backoff
from acagent.ac.client import ACClient
from acagent.cli.options import _OPTIONS, _seconds, _seconds_or_zero, read_settings
from acagent.config import AgentConfig, read_secret_file, secret_mode_exposed
from acagent.errors import ACHTTPError, ConfigError
from acagent.hints import auth_hint
from acagent.observers import Observer
from acagent.readiness import Readiness
from acagent.spool import Origin
from acagent.stage import StageContext
from acagent.testing import FakeACServer, FakeTarget, expected_sha256


def _key_file(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def _cli_error(argv: List[str], env: Dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a bad setting prints, after checking it exits 2."""
    with pytest.raises(SystemExit) as info:
        read_settings(argv, env)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def base(tmp_path: Path) -> Tuple[List[str], Dict[str, str]]:
    """argv and environment of a valid run, less the API key."""
    argv = ["--serverUrl", "https://ac.example", "--spoolDir", str(tmp_path / "spool")]
    return argv, {"ACAGENT_LOG_DIR": str(tmp_path / "log")}


# -- reading the file ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "key"),
    [
        ("k1\n", "k1"),
        ("k1", "k1"),
        ("k1\r\n", "k1"),
        ("k1\n\n", "k1\n"),  # one newline only: the rest is the file's business
        (" k1 \n", " k1 "),
    ],
)
def test_the_key_file_loses_one_trailing_newline(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "key"
    path.write_text(content, newline="")
    assert read_secret_file("api_key_file", str(path)) == key
    assert key in logs.registered_secrets()


@pytest.mark.parametrize("problem", ["missing", "empty", "newline only", "a folder"])
def test_a_bad_key_file_exits_2_naming_the_flag_and_the_path(
    tmp_path: Path,
    base: Tuple[List[str], Dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    problem: str,
) -> None:
    path = tmp_path / "key"
    if problem == "empty":
        path.write_text("")
    elif problem == "newline only":
        path.write_text("\n")
    elif problem == "a folder":
        path.mkdir()
    argv, env = base
    line = _cli_error([*argv, "--apiKeyFile", str(path)], env, capsys)
    assert line.startswith("acagent: error: argument --apiKeyFile: ")
    assert str(path) in line


def test_the_key_file_from_the_environment_and_its_source(
    tmp_path: Path, base: Tuple[List[str], Dict[str, str]]
) -> None:
    argv, env = base
    path = _key_file(tmp_path / "key", "file-key")
    settings = read_settings(argv, {**env, "ACAGENT_API_KEY_FILE": str(path)})
    assert settings.config.api_key == "file-key"
    assert settings.config.api_key_file == str(path)
    assert settings.key_source == f"file {path}"
    assert settings.warnings == ()
    assert read_settings(argv, {**env, "ACAGENT_API_KEY": "k"}).key_source == (
        "environment ACAGENT_API_KEY"
    )
    assert read_settings(argv, {**env, "api_key": "k"}).key_source == "environment api_key"
    assert read_settings([*argv, "--apiKey", "k"], env).key_source == "flag --apiKey"


@pytest.mark.parametrize(
    ("key_flag", "key_env"),
    [(True, False), (False, True)],
    ids=["flag", "environment"],
)
def test_a_key_and_a_key_file_together_exit_2(
    tmp_path: Path,
    base: Tuple[List[str], Dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    key_flag: bool,
    key_env: bool,
) -> None:
    argv, env = base
    path = _key_file(tmp_path / "key", "file-key")
    argv = [*argv, "--apiKeyFile", str(path)] + (["--apiKey", "flag-key"] if key_flag else [])
    env = {**env, "ACAGENT_API_KEY": "env-key"} if key_env else env
    line = _cli_error(argv, env, capsys)
    assert "--apiKey" in line and "--apiKeyFile" in line and "not both" in line
    assert "flag-key" not in line and "env-key" not in line and "file-key" not in line


def test_no_key_at_all_names_both_flags(
    base: Tuple[List[str], Dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _cli_error(*base, capsys)
    assert "--apiKey or --apiKeyFile is required" in line
    assert "ACAGENT_API_KEY_FILE" in line


def test_the_redis_password_from_a_file(
    tmp_path: Path,
    base: Tuple[List[str], Dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, env = base
    argv = [*argv, "--apiKey", "k", "--coordinationUrl", "redis://127.0.0.1:1/0"]
    path = _key_file(tmp_path / "redis-password", "s3cret-pw")
    config = read_settings(argv, {**env, "ACAGENT_COORDINATION_PASSWORD_FILE": str(path)}).config
    assert config.coordination_password == "s3cret-pw"
    assert "s3cret-pw" not in config.describe()
    both = {
        **env,
        "ACAGENT_COORDINATION_PASSWORD": "x",
        "ACAGENT_COORDINATION_PASSWORD_FILE": str(path),
    }
    assert "--coordinationPasswordFile" in _cli_error(argv, both, capsys)
    missing = [*argv, "--coordinationPasswordFile", str(tmp_path / "nope")]
    line = _cli_error(missing, env, capsys)
    assert line.startswith("acagent: error: argument --coordinationPasswordFile: file does not")


def test_the_library_reads_the_key_file_once_and_replace_keeps_the_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "key", "lib-key")
    config = AgentConfig(server_url="https://ac.example", api_key_file=str(path))
    assert config.api_key == "lib-key"
    _key_file(path, "changed")
    assert config.replace(timeout=5.0).api_key == "lib-key"  # replace() reads nothing
    with pytest.raises(ConfigError) as info:
        AgentConfig(server_url="https://ac.example", api_key_file=str(tmp_path / "nope"))
    assert info.value.field == "api_key_file"


# -- warnings at start ------------------------------------------------------------


def test_start_warnings(tmp_path: Path, base: Tuple[List[str], Dict[str, str]]) -> None:
    argv, env = base
    on_flag = read_settings([*argv, "--apiKey", "k"], env).warnings
    assert len(on_flag) == 1
    assert "process list" in on_flag[0] and "--apiKeyFile" in on_flag[0]
    assert read_settings(argv, {**env, "ACAGENT_API_KEY": "k"}).warnings == ()

    readable = _key_file(tmp_path / "readable", "k", mode=0o644)
    (line,) = read_settings([*argv, "--apiKeyFile", str(readable)], env).warnings
    assert f"--apiKeyFile {readable} can be read by group or others" in line
    group = _key_file(tmp_path / "group", "k", mode=0o640)
    assert read_settings([*argv, "--apiKeyFile", str(group)], env).warnings
    own = _key_file(tmp_path / "own", "k", mode=0o400)
    assert read_settings([*argv, "--apiKeyFile", str(own)], env).warnings == ()

    keyed = {**env, "ACAGENT_API_KEY": "k"}
    (line,) = read_settings([*argv, "--acMaxConcurrent", "3"], keyed).warnings
    assert "--acMaxConcurrent 3 is above 2" in line and "Too many concurrent requests" in line
    assert read_settings([*argv, "--acMaxConcurrent", "2"], keyed).warnings == ()


# -- non-finite numbers -----------------------------------------------------------

_SECONDS_FLAGS = [row[0] for row in _OPTIONS if row[2] in (_seconds, _seconds_or_zero)]


@pytest.mark.parametrize("value", ["1e999", "inf", "-inf", "nan", "Infinity"])
@pytest.mark.parametrize("flag", _SECONDS_FLAGS)
def test_non_finite_seconds_exit_2_naming_the_flag(
    base: Tuple[List[str], Dict[str, str]],
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
) -> None:
    argv, env = base
    line = _cli_error([*argv, "--apiKey", "k", flag, value], env, capsys)
    assert line.startswith(f"acagent: error: argument {flag}: "), line


def test_every_seconds_field_refuses_non_finite_values() -> None:
    assert len(_SECONDS_FLAGS) >= 10
    fields = [
        f
        for f in AgentConfig.__dataclass_fields__
        if isinstance(getattr(AgentConfig, f, None), float)
    ]
    assert "timeout" in fields and "poll_jitter" in fields
    for name in fields:
        for value in (math.inf, -math.inf, math.nan):
            with pytest.raises(ConfigError) as info:
                AgentConfig(server_url="https://ac.example", api_key="k", **{name: value})
            assert info.value.field == name
            assert "finite" in info.value.message


# -- rotation while tasks flow ------------------------------------------------------


class _Exchanges(Observer):
    """When each AC exchange ended, and how."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: List[Tuple[float, str, str]] = []

    def on_exchange(self, endpoint: str, status: str, seconds: float) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), endpoint, status))

    def first(self, endpoint: str, status: str, after: float) -> float:
        with self.lock:
            times = [
                t for t, e, s in self.seen if endpoint in ("*", e) and s == status and t > after
            ]
        return min(times) if times else math.inf


#: get-task waits a minute after a refused key: only a reload can make it fetch sooner
_PATIENT = fast_policy(fetch_key_refused=Backoff(60.0, 60.0))


class _PatientUploader(FastUploader):
    """Retries a refused result after a minute: only a reload can make it sooner."""

    def __init__(self, ctx: StageContext) -> None:
        super().__init__(ctx)
        self.policy = dataclasses.replace(self.policy, result_key_refused=Backoff(60.0, 60.0))


OLD_KEY = "old-key-7f3a91c2"
NEW_KEY = "new-key-b84de605"


@pytest.mark.timeout(90)
def _flowing_tasks(target: FakeTarget, prefix: str, n: int) -> List[Dict[str, str]]:
    """``n`` small tasks of 50 ms each: results keep flowing across the rotation."""
    return [
        {
            "taskId": f"{prefix}-{i}",
            "method": "GET",
            "url": f"{target.url}/bytes/{300 + i}?seed={i}&latency=0.05",
        }
        for i in range(n)
    ]


# The file is read once a second while the key is refused, in step with the
# first refusal: 3.0 s meets a read at once, 3.5 s waits half a period.
@pytest.mark.parametrize(("log_format", "rewrite_after"), [("text", 3.0), ("json", 3.5)])
def test_rotated_key_file_resumes_fetching_and_loses_nothing(
    tmp_path: Path, log_format: str, rewrite_after: float
) -> None:
    key_path = _key_file(tmp_path / "api-key", OLD_KEY)
    out = io.StringIO()
    logs.setup_logging(log_format=log_format, debug=True, stream=out)
    exchanges = _Exchanges()
    n = 60
    try:
        with FakeTarget() as target, FakeACServer(api_key=OLD_KEY) as ac:
            ac.add_tasks(_flowing_tasks(target, "rot", n))
            config = make_config(
                ac.url,
                tmp_path / "spool",
                api_key="",
                api_key_file=str(key_path),
                executor_pool_size=4,
                debug_mode=True,
                log_format=log_format,
            )
            pipeline = make_pipeline(
                config, uploader=_PatientUploader, observers=[exchanges], retry_policy=_PATIENT
            )
            with running(pipeline):
                assert ac.wait_for_results(10, WAIT)
                ac.api_key = NEW_KEY  # mid-run: tasks are running and results uploading
                switched = time.monotonic()
                # refused on get-task, or on upload (then fetching is held)
                assert wait_until(lambda: exchanges.first("*", "401", switched) < math.inf, WAIT)
                threading.Event().wait(max(0.0, switched + rewrite_after - time.monotonic()))
                rewritten = time.monotonic()
                _key_file(key_path, NEW_KEY)
                # results refused meanwhile go at once with the new key too
                assert ac.wait_for_results(n, 10), len(ac.results)
                resumed = exchanges.first("get-task", "200", after=rewritten) - rewritten
                delivered = time.monotonic() - rewritten
                # what is spooled from now on belongs to the new key
                assert pipeline.spool.origin == Origin.of(config.base_url, NEW_KEY)
        text = out.getvalue()
    finally:
        logs.reset_logging()
    print(
        f"{log_format}: fetching resumed {resumed:.2f}s after the rewrite; all results in {delivered:.2f}s"
    )
    assert resumed < 2.0, resumed
    refused = [t for t, e, s in exchanges.seen if s == "401" and switched <= t <= rewritten]
    assert refused, "the server never refused the old key"
    for i in range(n):
        got = ac.results[f"rot-{i}"]
        assert len(got) == 1, (i, len(got))
        assert got[0].body_sha256 == expected_sha256(300 + i, i)
    assert f"API key reloaded from {key_path}" in text
    assert OLD_KEY not in text and NEW_KEY not in text
    assert "-> 401" in text  # debug lines were on


# -- SIGHUP -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sighup_reloads_the_key_file_and_never_ends_the_agent(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    key_path = _key_file(tmp_path / "api-key", OLD_KEY)
    with FakeTarget() as target, FakeACServer(api_key=OLD_KEY) as ac:
        ac.add_task({"taskId": "before", "method": "GET", "url": f"{target.url}/bytes/10"})
        with AgentProcess(
            ac.url, spool, tmp_path / "agent.log", ["--apiKeyFile", str(key_path)], api_key=None
        ) as agent:
            assert ac.wait_for_results(1, WAIT), agent.output()
            # The server still takes the old key: only the signal can make the
            # agent read the file (it re-reads it by itself only while refused).
            _key_file(key_path, NEW_KEY)
            agent.signal(signal.SIGHUP)
            assert wait_until(lambda: "API key reloaded from" in agent.output(), WAIT), (
                agent.output()
            )
            ac.api_key = NEW_KEY
            ac.add_task({"taskId": "after", "method": "GET", "url": f"{target.url}/bytes/10"})
            assert ac.wait_for_results(2, WAIT), agent.output()
            agent.signal(signal.SIGHUP)  # the same key again
            assert wait_until(lambda: "no new API key in" in agent.output(), WAIT)
            assert agent.wait(0.3) is None  # still running
            agent.signal(signal.SIGTERM)
            assert agent.wait(15) == 0, agent.output()
        output = agent.output()
    assert f"API key reloaded from {key_path}" in output
    assert OLD_KEY not in output and NEW_KEY not in output


@pytest.mark.timeout(60)
def test_sighup_without_a_key_file_says_nothing_to_reload(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with FakeACServer() as ac:
        with AgentProcess(ac.url, spool, tmp_path / "agent.log") as agent:
            assert ac.wait_for(lambda: ac.count("get-task") >= 1, WAIT), agent.output()
            agent.signal(signal.SIGHUP)
            assert wait_until(lambda: "nothing to reload" in agent.output(), WAIT), agent.output()
            assert agent.wait(0.3) is None
            count = ac.count("get-task")
            assert ac.wait_for(lambda: ac.count("get-task") > count, WAIT)  # still fetching
            agent.signal(signal.SIGTERM)
            assert agent.wait(15) == 0, agent.output()
        assert agent.output().count("nothing to reload") == 1
        assert "--apiKey on the command line is visible" in agent.output()


# -- operator lines ------------------------------------------------------------------


def test_a_flag_key_refused_says_it_cannot_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeACServer(api_key="right") as ac:
        config = make_config(ac.url, tmp_path / "spool", api_key="wrong")
        with caplog.at_level("ERROR", logger="acagent"), running(make_pipeline(config)):
            assert ac.wait_for(lambda: ac.count("get-task", 401) >= 1, WAIT)
            assert wait_until(lambda: "HTTP 401" in caplog.text, WAIT)
    assert "cannot change while the agent runs" in caplog.text and "--apiKeyFile" in caplog.text


def test_too_many_concurrent_requests_is_logged_as_that(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeACServer() as ac:
        ac.inject("get-task", status=429, body=b"Too many concurrent requests")
        config = make_config(ac.url, tmp_path / "spool")
        with caplog.at_level("WARNING", logger="acagent"), running(make_pipeline(config)):
            assert wait_until(lambda: "429" in caplog.text, WAIT)
    (line,) = [r.getMessage() for r in caplog.records if "429" in r.getMessage()]
    assert "Too many concurrent requests" in line and "same key" in line
    assert "rate limited" not in line


def test_a_taken_health_port_names_the_flag_and_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with FakeACServer() as ac:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "acagent",
                    "--serverUrl",
                    ac.url,
                    "--spoolDir",
                    str(tmp_path / "spool"),
                    "--healthAddr",
                    address,
                    "--enableFileLogging",
                    "false",
                    "--metricsFile",
                    "false",
                    "--enableStdoutLogging",
                    "false",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "ACAGENT_API_KEY": "k"},
            )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"acagent: error: argument --healthAddr: cannot listen on {address}: ")


def test_check_names_the_key_source_and_the_expected_401(tmp_path: Path) -> None:
    key_path = _key_file(tmp_path / "api-key", OLD_KEY)
    with FakeACServer(api_key=OLD_KEY) as ac:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "acagent",
                "check",
                "--serverUrl",
                ac.url,
                "--apiKeyFile",
                str(key_path),
                "--spoolDir",
                str(tmp_path / "spool"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"; API key from file {key_path}" in proc.stdout
    assert "HTTP answer 401 (expected: no API key sent)" in proc.stdout
    assert OLD_KEY not in proc.stdout + proc.stderr


def test_the_client_uses_a_reloaded_key_from_its_next_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_path = _key_file(tmp_path / "api-key", OLD_KEY)
    with FakeACServer(api_key=OLD_KEY) as ac:
        config = AgentConfig(server_url=ac.url, api_key_file=str(key_path), rate_limit_per_min=0)
        with ACClient(config) as client:
            assert client.get_task() is None
            ac.api_key = NEW_KEY
            with pytest.raises(ACHTTPError):
                client.get_task()
            assert client.key_refused
            key_path.unlink()  # mid-rotation: no file for a moment
            with caplog.at_level("ERROR", logger="acagent"):
                assert not client.reload_api_key()
                assert not client.reload_api_key()
            assert [r.getMessage() for r in caplog.records].count(
                f"cannot re-read the API key (--apiKeyFile): file does not exist: {key_path}"
            ) == 1
            _key_file(key_path, NEW_KEY)
            assert client.reload_api_key()
            assert client.get_task() is None
            assert not client.key_refused and client.key_version == 1
            assert not client.reload_api_key()  # the same key: nothing changes
            assert client.key_version == 1


@pytest.mark.timeout(120)
def test_rotation_in_the_cli_agent_with_its_own_waits(tmp_path: Path) -> None:
    """The same rotation against ``python -m acagent`` (its real poll and retry waits)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    key_path = _key_file(tmp_path / "api-key", OLD_KEY)
    n = 60
    with FakeTarget() as target, FakeACServer(api_key=OLD_KEY) as ac:
        ac.add_tasks(_flowing_tasks(target, "cli", n))
        extra = ["--apiKeyFile", str(key_path), "--executorPoolSize", "4"]
        extra += ["--debugMode", "true", "--logFormat", "json"]
        with AgentProcess(ac.url, spool, tmp_path / "agent.log", extra, api_key=None) as agent:
            assert ac.wait_for_results(10, WAIT), agent.output()
            ac.api_key = NEW_KEY
            switched = time.monotonic()
            assert wait_until(lambda: "-> 401" in agent.output(), WAIT), agent.output()
            threading.Event().wait(max(0.0, switched + 3.0 - time.monotonic()))
            accepted = ac.count("get-task", 200)
            rewritten = time.monotonic()
            _key_file(key_path, NEW_KEY)
            assert wait_until(lambda: ac.count("get-task", 200) > accepted, WAIT, 0.01)
            resumed = time.monotonic() - rewritten
            assert ac.wait_for_results(n, 90), agent.output()
            delivered = time.monotonic() - rewritten
            agent.signal(signal.SIGTERM)
            assert agent.wait(15) == 0, agent.output()
        output = agent.output()
    print(
        f"cli: fetching resumed {resumed:.2f}s after the rewrite; all results in {delivered:.2f}s"
    )
    assert resumed < 2.0, resumed
    for i in range(n):
        got = ac.results[f"cli-{i}"]
        assert len(got) == 1 and got[0].body_sha256 == expected_sha256(300 + i, i), i
    assert f"API key reloaded from {key_path}" in output
    assert OLD_KEY not in output and NEW_KEY not in output


def test_readyz_names_the_key_file_when_the_key_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "key", "file-key")
    config = AgentConfig(server_url="https://ac.example", api_key_file=str(path))
    readiness = Readiness(60.0, auth_hint(config))
    readiness.on_exchange("get-task", "401", 0.01)
    ready, why = readiness.check()
    assert not ready and str(path) in why and "--apiKeyFile" in why


@pytest.mark.parametrize(
    ("mode", "owner", "exposed"),
    [
        (0o600, 1000, False),
        (0o400, 1000, False),
        (0o640, 1000, True),  # ours, group-readable: chmod 600 helps
        (0o644, 1000, True),
        (0o440, 0, False),  # a Secret volume with fsGroup: root's, read through the group
        (0o444, 0, True),  # anyone may read it
        (0o604, 0, True),
    ],
)
def test_secret_mode_exposed_table(mode: int, owner: int, exposed: bool) -> None:
    assert secret_mode_exposed(mode, owner, 1000) is exposed
