"""Delivery figures: the real agent CLI against a FakeACServer with real faults.

Two experiments, each run twice on the same tasks (once clean, once with faults):

- ``hol`` (head-of-line): 400 healthy small results, plus 3 whose uploads the
  server refuses with 503 for 20 s (``FakeACServer.refuse_results``). Figures:
  time from the first get-task to the last *healthy* result in both runs, their
  ratio (goal <= 1.5x), and when the refused results arrived (they must arrive,
  and only after the refusals stopped).
- ``faults``: 300 tasks (10% of them failing targets: a 500 with a body, or a
  connection reset mid-body) with ~11% AC faults on every AC call
  (``fault_rate(0.11, kinds=("503", "429s", "reset"), retry_after=1)``) versus
  no faults. Figures: tasks/min both ways and the ratio (goal >= 0.5).

Correctness checks (any failure: exit status 1): every task has a result (0
lost); every result of a task is the expected one (0 changed: sha256 of the
body and the status for a 200 or 500 target, an error result for a reset
target); the AC server never had more than 2 requests in flight and refused
none for concurrency; the agent exits 0 on SIGTERM. A POST retried after a
lost reply can reach the server twice: such duplicates are counted (they must
be identical) but are not a failure. The goals are reported as PASS/MISS lines.

Usage::

    python benchmarks/bench_delivery.py --json delivery.json
    python benchmarks/bench_delivery.py --only hol
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench import (
    API_KEY,
    PERMITS,
    Sampler,
    Scenario,
    _compile_agent,
    _read_status_kb,
    _tail,
    agent_command,
    machine,
)

from acagent.testing import FakeACServer, FakeTarget, expected_sha256

HOL_GOAL = 1.5
FAULT_GOAL = 0.5
REFUSE_SECONDS = 20.0
#: extra environment of the agent process (``--agent-env``)
AGENT_ENV: Dict[str, str] = {}

#: (task id, url suffix on the target, expected kind, size, seed); kind is
#: "ok" (200 + body), "status500" (500 + body) or "error" (an error result)
TaskSpec = Tuple[str, str, str, int, int]


def hol_tasks(prefix: str) -> Tuple[List[TaskSpec], List[str]]:
    specs: List[TaskSpec] = []
    for i in range(400):
        size = 1024 + (i * 37) % 3072
        specs.append(
            (
                f"{prefix}-ok-{i:04d}",
                f"/bytes/{size}?seed={i % 16}&latency=0.05",
                "ok",
                size,
                i % 16,
            )
        )
    refused = []
    for i in range(3):
        tid = f"{prefix}-refused-{i}"
        # spread among the healthy ones so they are fetched early, not last
        specs.insert(20 + 40 * i, (tid, "/bytes/2048?seed=3&latency=0.05", "ok", 2048, 3))
        refused.append(tid)
    return specs, refused


def fault_tasks(prefix: str, latency: float = 0.05) -> List[TaskSpec]:
    specs: List[TaskSpec] = []
    for i in range(300):
        size = 1024 + (i * 53) % 3072
        if i % 20 == 7:
            specs.append(
                (
                    f"{prefix}-{i:04d}",
                    f"/bytes/{size}?seed=5&status=500&latency={latency}",
                    "status500",
                    size,
                    5,
                )
            )
        elif i % 20 == 17:
            specs.append(
                (f"{prefix}-{i:04d}", f"/reset/{size}?seed=5&latency={latency}", "error", size, 5)
            )
        else:
            specs.append(
                (
                    f"{prefix}-{i:04d}",
                    f"/bytes/{size}?seed={i % 16}&latency={latency}",
                    "ok",
                    size,
                    i % 16,
                )
            )
    return specs


class Run:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks = 0
        self.first_get = 0.0
        self.t_start = 0.0
        self.received: Dict[str, float] = {}
        self.duplicates = 0
        self.lost: List[str] = []
        self.changed: List[str] = []
        self.max_inflight = 0
        self.rejected_concurrent = 0
        self.connections = 0
        self.exit_code: Optional[int] = None
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self.requests = 0
        #: "endpoint status" -> count (status 0: the connection was reset)
        self.replies: Dict[str, int] = {}
        self.failures: List[str] = []
        self.log_tail = ""

    def as_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["received"] = {k: v - self.first_get for k, v in self.received.items()}
        return d


def drive(
    name: str,
    specs: Sequence[TaskSpec],
    *,
    threads: int,
    ac_latency: float,
    setup: Callable[[FakeACServer], None],
    timeout: float,
) -> Run:
    run = Run(name)
    run.tasks = len(specs)
    expected = {(size, seed): expected_sha256(size, seed) for _, _, _, size, seed in specs}
    workdir = tempfile.mkdtemp(prefix=f"acbench-{name}-")
    try:
        with (
            FakeTarget() as target,
            FakeACServer(
                max_concurrent=PERMITS,
                api_key=API_KEY,
                latency=ac_latency,
                connection_cost=0.005,
                keep_bodies_up_to=0,
            ) as ac,
        ):
            for tid, suffix, _, _, _ in specs:
                ac.add_task(
                    {
                        "taskId": tid,
                        "method": "GET",
                        "url": target.url + suffix,
                        "requestHeaders": {"Accept": "*/*"},
                    }
                )
            s = Scenario(name, "", tasks=len(specs), threads=threads)
            cmd = agent_command(s, ac.url, os.path.join(workdir, "spool"))
            env = dict(os.environ, TMPDIR=workdir, PYTHONUNBUFFERED="1", **AGENT_ENV)
            log_path = os.path.join(workdir, "agent.log")
            with open(log_path, "wb") as log_file:
                setup(ac)
                run.t_start = time.monotonic()
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir
                )
                sampler = Sampler(proc.pid, interval=0.2)
                sampler.start()
                try:
                    deadline = time.monotonic() + timeout
                    done = False
                    while not done and time.monotonic() < deadline and proc.poll() is None:
                        done = ac.wait_for_results(len(specs), timeout=0.25)
                        if done:
                            have = ac.results
                            done = all(tid in have for tid, *_ in specs)
                    sampler.stop()
                    run.cpu_s = sampler.cpu[-1] if sampler.cpu else 0.0
                    run.peak_rss_mb = (_read_status_kb(proc.pid, "VmHWM") or 0) / 1024.0
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                    try:
                        run.exit_code = proc.wait(60)
                    except subprocess.TimeoutExpired:
                        run.failures.append("agent did not exit within 60 s of SIGTERM")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            time.sleep(0.1)
            results = ac.results
            gets = [r for r in ac.requests if r.endpoint == "get-task"]
            run.requests = len(ac.requests)
            for rec in ac.requests:
                key = f"{rec.endpoint} {rec.status}"
                run.replies[key] = run.replies.get(key, 0) + 1
            run.first_get = min(r.started for r in gets) if gets else run.t_start
            run.max_inflight = ac.max_inflight
            run.rejected_concurrent = ac.rejected_concurrent
            run.connections = ac.connections_opened
            for tid, _, kind, size, seed in specs:
                got = results.get(tid, [])
                if not got:
                    run.lost.append(tid)
                    continue
                run.duplicates += len(got) - 1
                run.received[tid] = min(r.received for r in got)
                for r in got:
                    status = r.fields.get("statusCode")
                    if kind == "error":
                        good = r.via == "error"
                    else:
                        good = (
                            r.via != "error"
                            and status == (200 if kind == "ok" else 500)
                            and r.body_len == size
                            and r.body_sha256 == expected[(size, seed)]
                        )
                    if not good:
                        run.changed.append(f"{tid}: via={r.via} status={status} len={r.body_len}")
            if run.lost:
                run.failures.append(f"{len(run.lost)} lost: {run.lost[:5]}")
            if run.changed:
                run.failures.append(f"{len(run.changed)} changed: {run.changed[:5]}")
            if run.max_inflight > PERMITS or run.rejected_concurrent:
                run.failures.append(
                    f"AC limit violated: max in flight {run.max_inflight},"
                    f" {run.rejected_concurrent} refused for concurrency"
                )
            if run.exit_code != 0:
                run.failures.append(f"agent exit code {run.exit_code}")
            if run.failures:
                run.log_tail = _tail(log_path, 20)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return run


def span(run: Run, ids: Sequence[str]) -> float:
    times = [run.received[t] for t in ids if t in run.received]
    return (max(times) - run.first_get) if times else float("nan")


def hol(threads: int) -> Dict[str, Any]:
    specs_clean, _ = hol_tasks("hol")
    healthy = [t[0] for t in specs_clean if "-ok-" in t[0]]
    clean = drive(
        "hol-clean",
        specs_clean,
        threads=threads,
        ac_latency=0.005,
        setup=lambda ac: None,
        timeout=180,
    )
    specs, refused = hol_tasks("hol")
    t_refuse: List[float] = []

    def refuse(ac: FakeACServer) -> None:
        t_refuse.append(time.monotonic())
        ac.refuse_results(refused, status=503, seconds=REFUSE_SECONDS)

    faulty = drive(
        "hol-refused", specs, threads=threads, ac_latency=0.005, setup=refuse, timeout=180
    )
    clean_s, faulty_s = span(clean, healthy), span(faulty, healthy)
    refusal_end = t_refuse[0] + REFUSE_SECONDS if t_refuse else 0.0
    refused_at = {t: faulty.received[t] - refusal_end for t in refused if t in faulty.received}
    if len(refused_at) != len(refused) or any(v < 0 for v in refused_at.values()):
        faulty.failures.append(
            f"refused results not all delivered after the refusals: {refused_at}"
        )
    ratio = faulty_s / clean_s if clean_s else float("inf")
    return {
        "experiment": "hol",
        "healthy_tasks": len(healthy),
        "clean_s": clean_s,
        "with_refusals_s": faulty_s,
        "ratio": ratio,
        "goal": f"<= {HOL_GOAL}x",
        "pass": ratio <= HOL_GOAL,
        "refused_after_refusals_end_s": refused_at,
        "runs": [clean.as_dict(), faulty.as_dict()],
        "failures": clean.failures + faulty.failures,
    }


def faults(threads: int, seed: int, target_latency: float) -> Dict[str, Any]:
    specs = fault_tasks("flt", target_latency)
    ids = [t[0] for t in specs]
    clean = drive(
        "faults-none", specs, threads=threads, ac_latency=0.01, setup=lambda ac: None, timeout=180
    )

    def inject(ac: FakeACServer) -> None:
        ac.fault_rate(0.11, seed, kinds=("503", "429s", "reset"), retry_after=1)

    faulty = drive(
        "faults-11pct", specs, threads=threads, ac_latency=0.01, setup=inject, timeout=300
    )
    rates = []
    for r in (clean, faulty):
        s = span(r, ids)
        rates.append(len(ids) * 60.0 / s if s and s == s else 0.0)
    ratio = rates[1] / rates[0] if rates[0] else 0.0
    return {
        "experiment": "faults",
        "target_latency_s": target_latency,
        "tasks": len(ids),
        "clean_per_min": rates[0],
        "faults_per_min": rates[1],
        "ratio": ratio,
        "goal": f">= {FAULT_GOAL}",
        "pass": ratio >= FAULT_GOAL,
        "runs": [clean.as_dict(), faulty.as_dict()],
        "failures": clean.failures + faulty.failures,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("hol", "faults"))
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--target-latency",
        type=float,
        action="append",
        help="target latency (s) of the fault experiment's tasks (repeatable; default 0.05)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the agent process (repeatable), as in bench.py",
    )
    args = parser.parse_args(argv)
    AGENT_ENV.update(e.split("=", 1) for e in args.agent_env)
    _compile_agent(AGENT_ENV)
    load_before = os.getloadavg()[0]
    print(f"machine: {json.dumps(machine())}, load {load_before:.2f}", flush=True)
    reports: List[Dict[str, Any]] = []
    if args.only in (None, "hol"):
        reports.append(hol(args.threads))
    if args.only in (None, "faults"):
        for latency in args.target_latency or [0.05]:
            reports.append(faults(args.threads, args.seed, latency))
    print()
    print(
        "| experiment | clean | with faults | ratio | goal | lost | changed | duplicates | max in flight | refused for concurrency | exit codes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rep in reports:
        runs = rep["runs"]
        name = "head-of-line (3 refused 20 s), healthy done in"
        if rep["experiment"] == "hol":
            a, b = f"{rep['clean_s']:.1f} s", f"{rep['with_refusals_s']:.1f} s"
            ratio = f"{rep['ratio']:.2f}x"
        else:
            name = f"faults, {rep['target_latency_s'] * 1000:.0f} ms targets"
            a, b = f"{rep['clean_per_min']:.0f}/min", f"{rep['faults_per_min']:.0f}/min"
            ratio = f"{rep['ratio']:.2f}"
        print(
            f"| {name} | {a} | {b} | {ratio} | {rep['goal']} "
            f"| {sum(len(r['lost']) for r in runs)} | {sum(len(r['changed']) for r in runs)} "
            f"| {sum(r['duplicates'] for r in runs)} | {max(r['max_inflight'] for r in runs)} "
            f"| {sum(r['rejected_concurrent'] for r in runs)} | {[r['exit_code'] for r in runs]} |"
        )
    print()
    failed = False
    for rep in reports:
        print(
            f"{'PASS' if rep['pass'] else 'MISS'} {rep['experiment']}: ratio {rep['ratio']:.2f} (goal {rep['goal']})"
        )
        if rep["experiment"] == "hol":
            print(
                f"     refused results arrived this long after the refusals stopped: "
                f"{ {k: round(v, 2) for k, v in rep['refused_after_refusals_end_s'].items()} }"
            )
        for r in rep["runs"]:
            print(
                f"     {r['name']}: cpu {r['cpu_s']:.2f} s, peak RSS {r['peak_rss_mb']:.1f} MB,"
                f" {r['requests']} AC requests, {r['connections']} AC connections,"
                f" replies {dict(sorted(r['replies'].items()))}"
            )
        for f in rep["failures"]:
            failed = True
            print(f"FAILED {rep['experiment']}: {f}", file=sys.stderr)
        for r in rep["runs"]:
            if r["log_tail"]:
                print(f"--- {r['name']} agent log tail ---\n{r['log_tail']}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(f"load {load_before:.2f} -> {load_after:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": machine(),
                    "load": [load_before, load_after],
                    "ok": not failed,
                    "experiments": reports,
                },
                fh,
                indent=2,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
