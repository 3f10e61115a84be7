"""The demo and every example run (as a user would run them) and succeed."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import ROOT

from acagent import AgentConfig, Pipeline
from acagent.testing import FakeACServer, FakeTarget

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"auth_allowlist_executor.py", "archiving_observer.py", "jsonl_fetcher.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_allowlist_example_is_refused_by_the_allow_list(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "auth_allowlist_executor.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    example = _load("auth_allowlist_executor")
    assert example.DENIED_OUTPUT == (
        "Agent Side Error: target host not in the allow-list: 10.0.0.7"
    )
    assert f"denied: {example.DENIED_OUTPUT}" in proc.stdout


def test_a_failing_archive_never_sends_a_result_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    example = _load("archiving_observer")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the archive folder should be")
    observer = example.ArchivingObserver(str(blocker / "archive"))
    with FakeTarget() as target, FakeACServer() as ac:
        ids = [ac.add_task(url=f"{target.url}/bytes/{size}?seed=1") for size in (10, 700_000)]
        config = AgentConfig(
            server_url=ac.url,
            api_key="k",
            spool_dir=str(tmp_path / "spool"),
            poll_interval=0.05,
            shutdown_timeout=5,
        )
        with caplog.at_level(logging.ERROR, logger="acagent"):
            agent = Pipeline(config, observers=[observer])
            agent.start()
            try:
                assert ac.wait_for_results(len(ids), timeout=30)
            finally:
                # A result whose delivery raised would be re-sent, and the
                # stop would wait for it until the shutdown timeout.
                drained = agent.stop()
        assert drained
        assert {tid: len(ac.results[tid]) for tid in ids} == {tid: 1 for tid in ids}
    failed = [
        r.getMessage() for r in caplog.records if "ArchivingObserver failed" in r.getMessage()
    ]
    assert any("on_task_executed" in m for m in failed), failed
    assert any("on_result_delivered" in m for m in failed), failed


def test_demo_verifies_every_result() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", "demo", "--tasks", "120", "--targetLatency", "0.01"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results verified       120/120" in proc.stdout
    assert "AC in flight, highest  " in proc.stdout
    assert "result                 OK" in proc.stdout


def test_demo_s3_path() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", "demo", "--tasks", "40", "--uploadToAc", "false"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "s3=" in proc.stdout
