"""The benchmark's short mode runs end to end: correctness only, never a timing.

``benchmarks/bench.py --short`` starts the real agent CLI as a subprocess
against the in-process fakes (200 small tasks and two bodies that go through
upload-result, 10 executor threads), stops it with SIGTERM, and verifies every
result byte for byte. Here we assert only what must hold on any machine:
exit 0, every task verified exactly once, the agent exited 0, and the AC
server never saw more than two requests at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.mark.timeout(240)
def test_bench_short_mode_is_correct(tmp_path: Path) -> None:
    out = tmp_path / "short.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--short", "--json", str(out)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    (run,) = report["runs"]
    assert run["scenario"] == "short"
    assert run["tasks"] > 0
    assert run["verified"] == run["tasks"]
    assert run["exit_code"] == 0
    # whole-process agent CPU is counted and covers at least the busy window
    assert run["process_cpu_ms_per_task"] >= run["cpu_ms_per_task"] > 0
    assert run["max_inflight"] <= 2
    assert run["rejected_concurrent"] == 0
    assert run["vias"].get("upload", 0) >= 1  # the large bodies took upload-result
