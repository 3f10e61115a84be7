"""Before/after: two source trees of the agent, measured alternately in one run.

Each pair runs ``bench.py --reference`` and ``bench_delivery.py`` once against
each tree (the agent gets ``PYTHONPATH=<tree>``; the benchmarks and their fake
servers are this checkout's, the same for both). The order of the trees flips
from one pair to the next, so a drift of the machine's load favours neither.
Every run's output goes into one results file, followed by a summary: per
scenario and tree, the range over the pairs of tasks/min as a share of the
server-time bound, of agent CPU per task (whole process) and, for the
delivery experiments, of their ratios. A failed run (a lost or wrong result,
a concurrency breach, a non-zero exit) is reported and makes the exit status 1.

Usage::

    python benchmarks/compare.py --before /path/to/old --after /path/to/new \\
        --pairs 3 --out benchmarks/results/DATE-before-after.txt
    # a quick check of the driver itself (tiny runs):
    python benchmarks/compare.py --before . --after . --pairs 1 --tasks 20 \\
        --idle-seconds 2 --delivery-args "--only hol" --out /tmp/cmp.txt

A tree is a folder holding the ``acagent`` package (a checkout, or
``git worktree add --detach /tmp/old <commit>``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(cmd: List[str], out: TextIO) -> int:
    """Run ``cmd`` (from a temporary folder), copying its output into ``out``."""
    out.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
    out.flush()
    proc = subprocess.run(
        cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(), check=False
    )
    out.write(f"(exit {proc.returncode})\n\n")
    out.flush()
    return proc.returncode


def _load(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as fh:
            return dict(json.load(fh))
    except (OSError, ValueError):
        return None


def _span(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{min(values):{fmt}}..{max(values):{fmt}}"


def summary(figures: Dict[Tuple[str, str, str], List[float]], trees: Sequence[str]) -> str:
    """One row per (experiment, figure): the range of each tree."""
    head = "| scenario | figure | " + " | ".join(trees) + " |"
    rows = [head, "|" + "---|" * (len(trees) + 2)]
    keys = sorted({(s, f) for s, f, _ in figures})
    for scenario, figure in keys:
        fmt = {"share of server-time bound": ".1%", "tasks/min": ".0f"}.get(figure, ".2f")
        cells = [_span(figures.get((scenario, figure, t), []), fmt) for t in trees]
        rows.append(f"| {scenario} | {figure} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="source tree of the agent before")
    parser.add_argument("--after", required=True, help="source tree of the agent after")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tasks", type=int, help="bench.py --tasks (all scenarios)")
    parser.add_argument("--idle-seconds", type=float, help="bench.py --idle-seconds")
    parser.add_argument(
        "--delivery-args", default="", help="extra arguments of bench_delivery.py (one string)"
    )
    parser.add_argument("--out", required=True, help="the results file (text)")
    args = parser.parse_args(argv)
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    for name, tree in trees.items():
        if not os.path.isfile(os.path.join(tree, "acagent", "__init__.py")):
            raise SystemExit(f"--{name} {tree}: no acagent package there")
    figures: Dict[Tuple[str, str, str], List[float]] = {}
    failed: List[str] = []
    work = tempfile.mkdtemp(prefix="acbench-compare-")
    started = time.monotonic()
    with open(args.out, "w") as out:
        out.write(
            f"# before/after, alternating, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
            f"# command: {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}\n"
            f"# before = {trees['before']}\n# after  = {trees['after']}\n"
            f"# load at start {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores\n\n"
        )
        for pair in range(args.pairs):
            order = ["before", "after"] if pair % 2 == 0 else ["after", "before"]
            for name in order:
                env = f"PYTHONPATH={trees[name]}"
                out.write(f"## pair {pair}: {name}\n")
                bench_json = os.path.join(work, f"bench-{pair}-{name}.json")
                cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--reference"]
                cmd += ["--agent-env", env, "--json", bench_json]
                if args.tasks is not None:
                    cmd += ["--tasks", str(args.tasks)]
                if args.idle_seconds is not None:
                    cmd += ["--idle-seconds", str(args.idle_seconds)]
                if _run(cmd, out) != 0:
                    failed.append(f"pair {pair} {name}: bench.py")
                data = _load(bench_json) or {}
                for r in data.get("runs", []):
                    s = r["scenario"]
                    figures.setdefault((s, "share of server-time bound", name), []).append(
                        r["server_ratio"]
                    )
                    figures.setdefault((s, "tasks/min", name), []).append(r["tasks_per_min"])
                    figures.setdefault((s, "CPU ms/task whole process", name), []).append(
                        r["process_cpu_ms_per_task"]
                    )
                idle = data.get("idle")
                if idle:
                    figures.setdefault(("idle", "CPU % of a core", name), []).append(
                        idle["cpu_pct_of_core"]
                    )
                delivery_json = os.path.join(work, f"delivery-{pair}-{name}.json")
                cmd = [sys.executable, os.path.join(HERE, "bench_delivery.py")]
                cmd += ["--agent-env", env, "--json", delivery_json]
                cmd += shlex.split(args.delivery_args)
                if _run(cmd, out) != 0:
                    failed.append(f"pair {pair} {name}: bench_delivery.py")
                for rep in (_load(delivery_json) or {}).get("experiments", []):
                    label = rep["experiment"]
                    if label == "faults":
                        label += f" {rep['target_latency_s'] * 1000:.0f} ms"
                    figures.setdefault((label, "ratio", name), []).append(rep["ratio"])
        out.write("## summary (range over the pairs)\n\n")
        out.write(summary(figures, ["before", "after"]) + "\n\n")
        out.write(f"{len(failed)} failed runs: {failed}\n")
        out.write(f"{time.monotonic() - started:.0f} s in all\n")
    print(f"results: {args.out}; {len(failed)} failed runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
