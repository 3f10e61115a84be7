"""Every path, file and proxy-URL flag is checked before anything starts: one stderr line, exit 2.

Each case runs the real CLI in a subprocess against a port where nothing
listens; a flag that slipped through would start the agent, which the
timeout turns into a failure instead of a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from helpers import assert_one_line_exit_2

from acagent.testing import closed_port_url

TIMEOUT = 60


def run_agent(tmp_path: Path, *args: str, subcommand: str = "run") -> subprocess.CompletedProcess[str]:
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env["TMPDIR"] = str(tmp_path)
    argv: List[str] = [
        sys.executable, "-m", "acagent", subcommand,
        "--serverUrl", closed_port_url(), "--apiKey", "k",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.fixture
def a_file(tmp_path: Path) -> str:
    path = tmp_path / "plain-file"
    path.write_text("not a folder, not a certificate\n")
    return str(path)


def test_spool_dir_that_cannot_be_created(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(run_agent(tmp_path, "--spoolDir", "/proc/nope"), "--spoolDir")
    assert "/proc/nope" in line


def test_spool_dir_that_is_a_file(tmp_path: Path, a_file: str) -> None:
    line = assert_one_line_exit_2(run_agent(tmp_path, "--spoolDir", a_file), "--spoolDir")
    assert "not a folder" in line


def test_log_dir_that_cannot_be_created(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(run_agent(tmp_path, "--logDir", "/proc/nope"), "--logDir")
    assert "/proc/nope" in line


def test_log_dir_that_is_a_file(tmp_path: Path, a_file: str) -> None:
    assert_one_line_exit_2(run_agent(tmp_path, "--logDir", a_file), "--logDir")


def test_ca_bundle_that_does_not_exist(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(run_agent(tmp_path, "--caBundle", "/nonexistent"), "--caBundle")
    assert "does not exist" in line


def test_ca_bundle_that_holds_no_certificate(tmp_path: Path, a_file: str) -> None:
    line = assert_one_line_exit_2(run_agent(tmp_path, "--caBundle", a_file), "--caBundle")
    assert "certificate" in line


@pytest.mark.parametrize(
    "flag",
    ["--inwardProxyHttps", "--inwardProxyHttp", "--outgoingProxyHttps", "--outgoingProxyHttp"],
)
@pytest.mark.parametrize("value", ["proxy.example:3128", "http://", "http://proxy:port"])
def test_proxy_url_that_is_not_a_url(tmp_path: Path, flag: str, value: str) -> None:
    assert_one_line_exit_2(run_agent(tmp_path, flag, value), flag)


def test_proxy_credentials_are_not_echoed(tmp_path: Path) -> None:
    line = assert_one_line_exit_2(
        run_agent(tmp_path, "--outgoingProxyHttps", "ftp://user:secret@proxy:3128"),
        "--outgoingProxyHttps",
    )
    assert "secret" not in line


def test_check_validates_paths_the_same_way(tmp_path: Path) -> None:
    proc = run_agent(tmp_path, "--spoolDir", "/proc/nope", subcommand="check")
    assert_one_line_exit_2(proc, "--spoolDir")


def test_paths_from_the_environment_name_the_flag(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env.update(TMPDIR=str(tmp_path), ACAGENT_CA_BUNDLE="/nonexistent")
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", "--serverUrl", closed_port_url(), "--apiKey", "k"],
        capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )
    assert_one_line_exit_2(proc, "--caBundle")
