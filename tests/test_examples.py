"""The demo and every example run (as a user would run them) and succeed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"auth_allowlist_executor.py", "archiving_uploader.py", "jsonl_fetcher.py"} <= names


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
