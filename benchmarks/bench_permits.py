"""Benchmark of the shared (Redis) AC permit.

1. Per-call cost: one thread takes and gives back a permit N times, without
   contention, against a private ``redis-server`` on 127.0.0.1; median and
   p99 of acquire, release and the pair, in ms. ``LocalPermits`` for scale;
   Redis without affinity (``keep_calls=0``), with and without the hand-off
   margin, and with it (``redis_kept``: 8 of 9 calls take the kept lease).
2. Several agent processes on one API key against ``FakeACServer`` (2
   permits, 429 above, fixed AC latency, 20 and 50 ms by default): tasks/min
   from the first result to the last, against the AC bound 2 permits / 2
   calls per task / AC latency (the median of ``--runs``); the server-side
   highest in-flight count and the 429s; Redis round trips (the commands the
   agents send) and all Redis commands (those inside the scripts too) per AC
   call, from ``INFO commandstats``; the CPU (cores) of the agents and of the
   benchmark's own process (the fake AC server and target). One agent
   (local permits), three coordinated, three coordinated with affinity off
   (``--affinity-off``: ``--coordinationKeepCalls 0``) and three
   uncoordinated.

    python benchmarks/bench_permits.py --affinity-off   # all, ~12 min
    python benchmarks/bench_permits.py --calls-only
    python benchmarks/bench_permits.py --agents-only --runs 1 --ac-latency 0.02
    python benchmarks/bench_permits.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from acagent.ac.permits import DEFAULT_KEEP_CALLS, LocalPermits, Permits, RedisPermits
from acagent.cli.demo_multi import run_agents
from acagent.testing import LocalRedis


def _pct(values: List[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def per_call(permits: Permits, n: int) -> Dict[str, float]:
    stop = threading.Event()
    acquire: List[float] = []
    release: List[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        lease = permits.acquire(stop, timeout=10)
        t1 = time.perf_counter()
        assert lease is not None
        permits.release(lease)
        t2 = time.perf_counter()
        acquire.append((t1 - t0) * 1000)
        release.append((t2 - t1) * 1000)
    both = [a + r for a, r in zip(acquire, release)]
    return {
        "acquire_median_ms": statistics.median(acquire),
        "acquire_p99_ms": _pct(acquire, 99),
        "release_median_ms": statistics.median(release),
        "release_p99_ms": _pct(release, 99),
        "pair_median_ms": statistics.median(both),
        "pair_p99_ms": _pct(both, 99),
    }


def bench_calls(n: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"calls": n, "local": per_call(LocalPermits(2), n)}
    with LocalRedis() as server:
        for name, handoff, keep in (
            ("redis", 0.0, 0),
            ("redis_with_handoff", None, 0),
            ("redis_kept", None, DEFAULT_KEEP_CALLS),
        ):
            p = RedisPermits(
                server.url,
                "bench-key",
                2,
                lease_seconds=0.5,
                handoff_seconds=handoff,
                keep_calls=keep,
            )
            try:
                # a fresh Redis grants nothing for one lease: wait it out first
                first = p.acquire(threading.Event(), timeout=10)
                assert first is not None
                p.release(first)
                out[name] = per_call(p, n)
            finally:
                p.close()
    return out


#: (agents, coordinated, keep calls or None for the agent's default) of one row
Setup = Tuple[int, bool, Optional[int]]


def setups(keep_calls: Optional[int], affinity_off: bool) -> List[Setup]:
    rows: List[Setup] = [(1, False, None), (3, True, keep_calls)]
    if affinity_off:
        rows.append((3, True, 0))
    rows.append((3, False, None))
    return rows


def bench_agents(
    tasks: int, latency: float, runs: int, keep_calls: Optional[int], affinity_off: bool
) -> List[Dict[str, Any]]:
    rows = []
    for agents, coordinated, keep in setups(keep_calls, affinity_off):
        extra = [] if keep is None else ["--coordinationKeepCalls", str(keep)]
        each = []
        for _ in range(runs):
            run = run_agents(
                agents, tasks, ac_latency=latency, coordinated=coordinated, extra=extra
            )
            each.append(
                {
                    "delivered_once": run.delivered_once,
                    "max_inflight": run.max_inflight,
                    "count_429": run.count_429,
                    "steady_per_min": round(run.steady_per_min),
                    "bound_per_min": round(run.bound_per_min),
                    "share_of_bound": round(run.steady_per_min / run.bound_per_min, 3),
                    "elapsed_s": round(run.elapsed, 1),
                    "ac_requests": run.ac_requests,
                    "redis_round_trips": run.redis_round_trips,
                    "redis_commands": run.redis_commands,
                    "agent_cpu_s": None if run.agent_cpu is None else round(run.agent_cpu, 1),
                    "server_cpu_s": round(run.server_cpu, 1),
                }
            )
        rows.append(
            {
                "agents": agents,
                "coordinated": coordinated,
                "keep_calls": keep,
                "tasks": tasks,
                "ac_latency_ms": latency * 1000,
                "runs": each,
                **summary(each),
            }
        )
    return rows


def summary(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The median share of the bound (and its run's tasks/min), the worst of the
    limits, the Redis calls per AC call and the agents' CPU over all runs."""
    shares = [r["share_of_bound"] for r in runs]
    median = statistics.median_low(shares)
    ac = sum(r["ac_requests"] for r in runs)
    trips = [r["redis_round_trips"] for r in runs]
    cmds = [r["redis_commands"] for r in runs]
    cpu = [r["agent_cpu_s"] for r in runs]
    elapsed = sum(r["elapsed_s"] for r in runs)
    return {
        "share_of_bound": median,
        "share_min": min(shares),
        "share_max": max(shares),
        "steady_per_min": runs[shares.index(median)]["steady_per_min"],
        "bound_per_min": runs[0]["bound_per_min"],
        "max_inflight": max(r["max_inflight"] for r in runs),
        "count_429": sum(r["count_429"] for r in runs),
        "delivered_once": min(r["delivered_once"] for r in runs),
        "redis_trips_per_ac": None if None in trips or not ac else round(sum(trips) / ac, 2),
        "redis_cmds_per_ac": None if None in cmds or not ac else round(sum(cmds) / ac, 1),
        "agent_cores": None if None in cpu else round(sum(cpu) / elapsed, 2),
        "server_cores": round(sum(r["server_cpu_s"] for r in runs) / elapsed, 2),
    }


def _opt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument(
        "--ac-latency", type=float, nargs="+", default=[0.02, 0.05], metavar="SECONDS"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per row (median share)")
    parser.add_argument(
        "--keep-calls", type=int, help="--coordinationKeepCalls of the coordinated agents"
    )
    parser.add_argument(
        "--affinity-off",
        action="store_true",
        help="also 3 coordinated agents with --coordinationKeepCalls 0 (before/after)",
    )
    parser.add_argument("--calls-only", action="store_true")
    parser.add_argument("--agents-only", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    result: Dict[str, Any] = {}
    if not args.agents_only:
        result["per_call"] = bench_calls(args.calls)
        print(f"per-call cost, {args.calls} uncontended acquire+release (ms):")
        print(
            f"  {'permits':20} {'acquire med/p99':>16} {'release med/p99':>16} {'pair med/p99':>16}"
        )
        for name in ("local", "redis", "redis_with_handoff", "redis_kept"):
            r = result["per_call"][name]
            print(
                f"  {name:20} {r['acquire_median_ms']:7.3f}/{r['acquire_p99_ms']:<8.3f}"
                f" {r['release_median_ms']:7.3f}/{r['release_p99_ms']:<8.3f}"
                f" {r['pair_median_ms']:7.3f}/{r['pair_p99_ms']:<8.3f}"
            )
    if not args.calls_only:
        result["agents"] = []
        for latency in args.ac_latency:
            rows = bench_agents(args.tasks, latency, args.runs, args.keep_calls, args.affinity_off)
            result["agents"].extend(rows)
            print(
                f"\n{args.tasks} tasks, FakeACServer(max_concurrent=2), AC latency "
                f"{latency * 1000:.0f} ms, bound {rows[0]['bound_per_min']}/min, "
                f"median of {args.runs} run(s):"
            )
            print(
                f"  {'agents':>6} {'shared':>6} {'keep':>4} {'tasks/min':>9} {'of bound':>8}"
                f" {'(min-max)':>11} {'max in flight':>13} {'429s':>5} {'once':>6}"
                f" {'redis/AC':>8} {'cmds/AC':>7} {'agents CPU':>10} {'servers CPU':>11}"
            )
            for row in rows:
                keep = "-" if not row["coordinated"] else _opt(row["keep_calls"], "d")
                if row["coordinated"] and row["keep_calls"] is None:
                    keep = "dflt"
                print(
                    f"  {row['agents']:>6} {'yes' if row['coordinated'] else 'no':>6} {keep:>4}"
                    f" {row['steady_per_min']:>9} {row['share_of_bound']:>8.1%}"
                    f" {row['share_min']:>5.0%}-{row['share_max']:<5.0%}"
                    f" {row['max_inflight']:>13} {row['count_429']:>5} {row['delivered_once']:>6}"
                    f" {_opt(row['redis_trips_per_ac'], '.2f'):>8}"
                    f" {_opt(row['redis_cmds_per_ac'], '.1f'):>7}"
                    f" {_opt(row['agent_cores'], '.2f'):>10} {row['server_cores']:>11.2f}"
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
