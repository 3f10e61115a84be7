"""The agent's folders and files are its own: nothing planted is followed or sent.

Run as root (CI does): a folder "owned by another user" is chowned to another
uid. The agent then runs as root and must still refuse it.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from helpers import (
    WAIT,
    assert_one_line_exit_2,
    bytes_tasks,
    leave_results_in_spool,
    make_config,
    make_pipeline,
    running,
)

from acagent import folders
from acagent.config import AgentConfig
from acagent.errors import ConfigError
from acagent.logs import OwnFileHandler, zip_logs
from acagent.testing import FakeACServer, FakeTarget, closed_port_url

OTHER_UID = 12345
SECRET = "aws_secret_access_key = not-for-the-server\n"


def _stat(mode: int, uid: int = 1000) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "problem"),
    [
        (stat.S_IFDIR | 0o700, 1000, None),
        (stat.S_IFDIR | 0o755, 1000, None),
        (stat.S_IFDIR | 0o2700, 1000, None),  # setgid alone: not writable by the group
        (stat.S_IFDIR | 0o770, 1000, "writable by group or others (mode 0770)"),
        (stat.S_IFDIR | 0o1777, 1000, "writable by group or others (mode 1777)"),
        (stat.S_IFDIR | 0o700, 0, "owned by uid 0, not by this user (uid 1000)"),
        (stat.S_IFLNK | 0o777, 1000, "symbolic link"),
        (stat.S_IFREG | 0o600, 1000, "not a folder"),
    ],
)
def test_folder_problem_table(mode: int, uid: int, problem: Optional[str]) -> None:
    found = folders.folder_problem(_stat(mode, uid), 1000)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"XDG_STATE_HOME": "/srv/state"}, 1000, "/srv/state/acagent"),
        ({"XDG_STATE_HOME": "/srv/state"}, 0, "/srv/state/acagent"),  # explicit wins
        ({"XDG_STATE_HOME": "relative/path"}, 0, "/var/lib/acagent"),  # not absolute: ignored
        ({}, 0, "/var/lib/acagent"),
        ({}, 1000, os.path.join(os.path.expanduser("~"), ".local", "state", "acagent")),
    ],
)
def test_default_base_dir_table(env: Dict[str, str], euid: int, expected: str) -> None:
    assert folders.default_base_dir(env, euid) == expected


def test_the_default_spool_is_outside_the_temp_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    spool = AgentConfig(server_url="https://ac.example", api_key="k").resolved_spool_dir()
    assert not spool.startswith(tempfile.gettempdir() + os.sep), spool
    assert spool.endswith(os.path.join("acagent", "spool_prod"))


# -- refused at start, with one line ------------------------------------------
def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    argv: List[str] = [
        sys.executable,
        "-m",
        "acagent",
        "run",
        "--serverUrl",
        closed_port_url(),
        "--apiKey",
        "k",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT * 3, env=env)


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim" / "credentials"
    victim.parent.mkdir()
    victim.write_text(SECRET)
    victim.chmod(0o644)
    return victim


def _untouched(victim: Path) -> None:
    assert victim.read_text() == SECRET
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_a_symlink_at_the_default_log_file_is_refused(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    log_dir = tmp_path / "state" / "acagent" / "log"
    log_dir.mkdir(parents=True, mode=0o700)
    (log_dir / "app_log_prod.log").symlink_to(victim)
    line = assert_one_line_exit_2(_run(tmp_path), "--logDir")
    assert "symbolic link" in line
    _untouched(victim)


def test_a_symlink_as_the_spool_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "spool"
    link.symlink_to(real)
    line = assert_one_line_exit_2(_run(tmp_path, "--spoolDir", str(link)), "--spoolDir")
    assert "symbolic link" in line
    assert list(real.iterdir()) == []


def test_a_symlink_as_the_quarantine_folder_is_refused(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (spool / "quarantine").symlink_to(elsewhere)
    line = assert_one_line_exit_2(_run(tmp_path, "--spoolDir", str(spool)), "--spoolDir")
    assert "quarantine" in line and "symbolic link" in line


def test_a_spool_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "this test runs as root (CI does) to give a folder to another uid"
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "planted.json").write_text("{}")
    os.chown(spool, OTHER_UID, OTHER_UID)
    line = assert_one_line_exit_2(_run(tmp_path, "--spoolDir", str(spool)), "--spoolDir")
    assert f"owned by uid {OTHER_UID}" in line
    assert (spool / "planted.json").read_text() == "{}"


def test_a_log_folder_writable_by_others_is_refused(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_dir.chmod(0o777)
    line = assert_one_line_exit_2(_run(tmp_path, "--logDir", str(log_dir)), "--logDir")
    assert "writable by group or others (mode 0777)" in line


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--spoolDir", ""], "--spoolDir"),
        (["--logDir", ""], "--logDir"),
        (["--index", "../x"], "--index"),
        (["--index", "a/b"], "--index"),
    ],
)
def test_an_empty_folder_or_an_escaping_index_is_refused(
    tmp_path: Path, args: List[str], flag: str
) -> None:
    assert_one_line_exit_2(_run(tmp_path, *args), flag)
    assert not (tmp_path / "x").exists()


def test_the_library_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o770)
    with FakeACServer() as ac:
        with pytest.raises(ConfigError, match="writable by group or others"):
            make_pipeline(make_config(ac.url, spool))
        assert ac.arrivals("get-task") == 0
    assert stat.S_IMODE(spool.stat().st_mode) == 0o770  # not "fixed" behind the owner's back


# -- files: never followed ---------------------------------------------------
def test_the_log_file_stays_0600_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "app_log_prod.log"
    old_umask = os.umask(0)  # a new file would be 0666 if the handler did not say
    try:
        handler = OwnFileHandler(str(path), backup_count=2)
        try:
            handler.emit(logging.makeLogRecord({"msg": "before"}))
            handler.doRollover()
            handler.emit(logging.makeLogRecord({"msg": "after"}))
        finally:
            handler.close()
    finally:
        os.umask(old_umask)
    rotated = [p for p in tmp_path.iterdir() if p != path]
    assert len(rotated) == 1
    assert path.read_text() == "after\n"
    for file in (path, *rotated):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_the_log_file_handler_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    path = tmp_path / "app_log_prod.log"
    path.symlink_to(victim)
    with pytest.raises(OSError):
        OwnFileHandler(str(path), backup_count=2)
    _untouched(victim)


def test_fetch_logs_leaves_a_planted_symlink_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = _victim(tmp_path)
    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o700)
    (log_dir / "app_log_prod.log").write_text("a line of the agent's log\n")
    (log_dir / "app_log_prod.log.2026-12-01").symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger="acagent.logs"):
        zipped = zip_logs(str(log_dir), str(tmp_path / "out" / "logs.zip"))
    with zipfile.ZipFile(zipped) as zf:
        assert zf.namelist() == ["app_log_prod.log"]
        assert SECRET.encode() not in b"".join(zf.read(n) for n in zf.namelist())
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        f"fetch-logs: skipped {log_dir / 'app_log_prod.log.2026-12-01'}: not a regular file"
    ]


@pytest.mark.parametrize("size", [100_000, 700_000], ids=["inline", "upload-result"])
def test_a_body_file_replaced_by_a_symlink_is_never_uploaded(tmp_path: Path, size: int) -> None:
    victim = _victim(tmp_path)
    spool = tmp_path / "spool"
    with FakeTarget() as target, FakeACServer() as ac:
        leave_results_in_spool(ac, spool, "k", bytes_tasks(target, "planted", 1, size))
        (body,) = spool.glob("*.body")
        body.unlink()
        body.symlink_to(victim)
        with running(make_pipeline(make_config(ac.url, spool))):
            assert ac.wait_for_results(1, WAIT)
        (got,) = ac.results["planted-0"]
        uploaded = [r.body for r in ac.all_results()]
    assert got.via == "error" and "symbolic link" in got.fields["output"]
    assert all(SECRET.encode() not in (b or b"") for b in uploaded)
    _untouched(victim)
    (folder,) = (spool / "quarantine").iterdir()
    assert (folder / "body").is_symlink()  # moved aside as it is, not followed


# -- the earlier default location ---------------------------------------------
def test_results_in_the_old_default_spool_are_named_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old_tmp = tmp_path / "tmp"
    legacy = old_tmp / "armorcode" / "spool_prod"
    legacy.mkdir(parents=True)
    (legacy / f"{'a' * 32}.json").write_text("{}")
    monkeypatch.setattr(tempfile, "tempdir", str(old_tmp))
    with FakeACServer() as ac:
        config = AgentConfig(server_url=ac.url, api_key="k", poll_interval=0.05)
        with caplog.at_level(logging.WARNING, logger="acagent"):
            with running(make_pipeline(config)) as pipeline:
                assert not str(pipeline.spool.directory).startswith(str(old_tmp))
    lines = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert len(lines) == 1
    assert f"--spoolDir {legacy}" in lines[0]
    assert (legacy / f"{'a' * 32}.json").exists()  # left for the operator to deliver
