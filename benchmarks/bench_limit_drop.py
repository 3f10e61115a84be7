"""Benchmark: the AC server's limit drops from 2 to 1 for a while, then comes back.

Real agent processes (``python -m acagent run``, default settings) against
``FakeACServer`` (2 requests at once, 429 "Too many concurrent requests"
above, fixed AC latency): one agent with local permits, and three agents
sharing their permits through a private ``redis-server``. ``DROP_AFTER``
seconds after the first result another client takes one of the two slots
(``FakeACServer.occupy(1)``) for ``DROP_FOR`` seconds. Reported, per case:

* the "Too many concurrent requests" 429s from the drop to its end
  (goal: at most 10);
* tasks/s during the drop against the lowered bound, 1 permit / 2 calls per
  task / AC latency (goal: >= 0.85);
* tasks/s from ``SETTLE`` s after the slot came back to the last result,
  against the same case run with no drop (its first result to its last;
  goal: >= 0.95).

    python benchmarks/bench_limit_drop.py              # 1 and 3 agents, drop and none, ~3 min
    python benchmarks/bench_limit_drop.py --agents 1 --tasks 600 --drop-for 8
    python benchmarks/bench_limit_drop.py --json out.json
    python benchmarks/bench_limit_drop.py --one-permit    # reference: held at 1, no drop
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from acagent.cli.demo_multi import (
    CALLS_PER_TASK,
    add_tasks,
    agent_command,
    run_agents,
    stop_agents,
)
from acagent.testing import FakeACServer, FakeTarget

DROP_AFTER = 3.0
DROP_FOR = 20.0
#: the after-drop window starts this long after the slot came back
SETTLE = 3.0


@dataclass
class DropRun:
    agents: int
    tasks: int
    dropped: bool
    ac_latency: float
    delivered_once: int
    max_inflight: int
    #: "Too many concurrent requests" 429s from the drop to its end, and in all
    rejected_during: int
    rejected_total: int
    #: tasks per second: during the drop, from SETTLE s after it, first to last result
    during_per_s: float
    after_per_s: float
    steady_per_s: float


def _rate(received: List[float], start: float, end: float) -> float:
    n = sum(1 for t in received if start <= t <= end)
    return n / (end - start) if end > start else 0.0


def drop_run(
    agents: int, tasks: int, *, drop: bool, latency: float, drop_after: float, drop_for: float
) -> DropRun:
    """One case: ``agents`` agents (coordinated when more than one) through a
    drop of the server's limit (or, ``drop=False``, the same run without it)."""
    servers: List[FakeACServer] = []
    marks: Dict[str, float] = {}
    done = threading.Event()

    def drive(ac: FakeACServer) -> None:
        if not ac.wait_for_results(1, timeout=120.0) or done.wait(drop_after):
            return
        marks["rejected_before"] = ac.rejected_concurrent
        marks["start"] = time.monotonic()
        if drop:
            ac.occupy(1)
        done.wait(drop_for)
        marks["end"] = time.monotonic()
        marks["rejected_end"] = ac.rejected_concurrent
        ac.release_occupied()

    threads: List[threading.Thread] = []

    def on_start(ac: FakeACServer) -> None:
        servers.append(ac)
        thread = threading.Thread(target=drive, args=(ac,), name="bench-limit-drop", daemon=True)
        thread.start()
        threads.append(thread)

    run = run_agents(agents, tasks, ac_latency=latency, coordinated=agents > 1, on_start=on_start)
    done.set()
    for thread in threads:
        thread.join(timeout=5.0)
    ac = servers[0]
    received = sorted(r.received for r in ac.all_results())
    if "end" not in marks or len(received) < 2:
        raise SystemExit(f"the run ended before the drop did: raise --tasks ({marks})")
    return DropRun(
        agents=agents,
        tasks=tasks,
        dropped=drop,
        ac_latency=latency,
        delivered_once=run.delivered_once,
        max_inflight=run.max_inflight,
        rejected_during=int(marks["rejected_end"] - marks["rejected_before"]),
        rejected_total=ac.rejected_concurrent,
        during_per_s=_rate(received, marks["start"], marks["end"]),
        after_per_s=_rate(received, marks["end"] + SETTLE, received[-1]),
        steady_per_s=_rate(received, received[0], received[-1]),
    )


def report(dropped: DropRun, plain: DropRun) -> Dict[str, Any]:
    lowered_bound = 1 / (CALLS_PER_TASK * dropped.ac_latency)
    during = dropped.during_per_s / lowered_bound
    after = dropped.after_per_s / plain.steady_per_s if plain.steady_per_s else 0.0
    print(
        f"{dropped.agents} agent(s), {dropped.tasks} tasks, AC {dropped.ac_latency * 1000:.0f} ms:"
        f" 429s during the drop {dropped.rejected_during} (all {dropped.rejected_total};"
        f" goal <= 10); during the drop {dropped.during_per_s:.1f} tasks/s ="
        f" {during:.2f} of the lowered bound {lowered_bound:.0f}/s (goal >= 0.85);"
        f" from {SETTLE:.0f} s after the return {dropped.after_per_s:.1f} tasks/s ="
        f" {after:.2f} of the run with no drop ({plain.steady_per_s:.1f}/s; goal >= 0.95);"
        f" delivered once {dropped.delivered_once}/{dropped.tasks} and"
        f" {plain.delivered_once}/{plain.tasks}; max in flight {dropped.max_inflight}",
        flush=True,
    )
    return {
        "dropped": asdict(dropped),
        "no_drop": asdict(plain),
        "during_of_lowered_bound": during,
        "after_of_no_drop": after,
    }


def one_permit(tasks: int, latency: float) -> float:
    """Reference: one agent held at ``--acMaxConcurrent 1`` against a server
    limit of 1, no drop; tasks/s from its first result to its last."""
    with tempfile.TemporaryDirectory(prefix="acagent-bench-") as workdir:
        with FakeTarget() as target, FakeACServer(max_concurrent=1, latency=latency) as ac:
            add_tasks(ac, target, tasks, "one", 0.02)
            cmd = agent_command(
                ac.url,
                os.path.join(workdir, "spool"),
                coordination_url=None,
                extra=["--acMaxConcurrent", "1"],
            )
            with open(os.path.join(workdir, "agent.log"), "wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=log)
            try:
                ac.wait_for_results(tasks, timeout=300.0)
            finally:
                stop_agents([proc])
            received = sorted(r.received for r in ac.all_results())
    rate = _rate(received, received[0], received[-1])
    bound = 1 / (CALLS_PER_TASK * latency)
    print(
        f"1 agent at --acMaxConcurrent 1, server limit 1, {tasks} tasks, no drop:"
        f" {rate:.1f} tasks/s = {rate / bound:.2f} of the bound {bound:.0f}/s",
        flush=True,
    )
    return rate


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, action="append", help="1 and 3 unless given")
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--latency", type=float, default=0.02, help="AC latency, seconds")
    parser.add_argument("--drop-after", type=float, default=DROP_AFTER)
    parser.add_argument("--drop-for", type=float, default=DROP_FOR)
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--one-permit", action="store_true", help="only the reference at 1")
    args = parser.parse_args(argv)
    if args.one_permit:
        one_permit(min(args.tasks, 500), args.latency)
        return 0
    figures = []
    for agents in args.agents or [1, 3]:
        runs = [
            drop_run(
                agents,
                args.tasks,
                drop=drop,
                latency=args.latency,
                drop_after=args.drop_after,
                drop_for=args.drop_for,
            )
            for drop in (True, False)
        ]
        figures.append(report(*runs))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
