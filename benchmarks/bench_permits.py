"""Benchmark of the shared (Redis) AC permit.

1. Per-call cost: one thread takes and gives back a permit N times, without
   contention, against a private ``redis-server`` on 127.0.0.1; median and
   p99 of acquire, release and the pair, in ms. ``LocalPermits`` for scale.
2. Several agent processes on one API key against ``FakeACServer`` (2
   permits, 429 above, fixed AC latency): tasks/min from the first result to
   the last, against the AC bound 2 permits / 2 calls per task / AC latency;
   the server-side highest in-flight count and the 429s. Compared with one
   agent (local permits) and with three uncoordinated agents.

    python benchmarks/bench_permits.py                  # all, ~2 min
    python benchmarks/bench_permits.py --calls-only
    python benchmarks/bench_permits.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any, Dict, List

from acagent.ac.permits import LocalPermits, Permits, RedisPermits
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
        for name, handoff in (("redis", 0.0), ("redis_with_handoff", None)):
            p = RedisPermits(server.url, "bench-key", 2, lease_seconds=0.5, handoff_seconds=handoff)
            try:
                # a fresh Redis grants nothing for one lease: wait it out first
                first = p.acquire(threading.Event(), timeout=10)
                assert first is not None
                p.release(first)
                out[name] = per_call(p, n)
            finally:
                p.close()
    return out


def bench_agents(tasks: int, latency: float) -> List[Dict[str, Any]]:
    rows = []
    for agents, coordinated in ((1, False), (3, True), (3, False)):
        run = run_agents(agents, tasks, ac_latency=latency, coordinated=coordinated)
        rows.append(
            {
                "agents": agents,
                "coordinated": coordinated,
                "tasks": tasks,
                "ac_latency_ms": latency * 1000,
                "delivered_once": run.delivered_once,
                "max_inflight": run.max_inflight,
                "count_429": run.count_429,
                "steady_per_min": round(run.steady_per_min),
                "bound_per_min": round(run.bound_per_min),
                "share_of_bound": round(run.steady_per_min / run.bound_per_min, 3),
                "elapsed_s": round(run.elapsed, 1),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=600)
    parser.add_argument("--ac-latency", type=float, default=0.05)
    parser.add_argument("--calls-only", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    result: Dict[str, Any] = {"per_call": bench_calls(args.calls)}
    print(f"per-call cost, {args.calls} uncontended acquire+release (ms):")
    print(f"  {'permits':20} {'acquire med/p99':>16} {'release med/p99':>16} {'pair med/p99':>16}")
    for name in ("local", "redis", "redis_with_handoff"):
        r = result["per_call"][name]
        print(
            f"  {name:20} {r['acquire_median_ms']:7.3f}/{r['acquire_p99_ms']:<8.3f}"
            f" {r['release_median_ms']:7.3f}/{r['release_p99_ms']:<8.3f}"
            f" {r['pair_median_ms']:7.3f}/{r['pair_p99_ms']:<8.3f}"
        )
    if not args.calls_only:
        rows = bench_agents(args.tasks, args.ac_latency)
        result["agents"] = rows
        print(
            f"\n{args.tasks} tasks, FakeACServer(max_concurrent=2), AC latency "
            f"{args.ac_latency * 1000:.0f} ms, bound {rows[0]['bound_per_min']}/min:"
        )
        print(
            f"  {'agents':>6} {'shared':>6} {'tasks/min':>9} {'of bound':>8} {'max in flight':>13}"
            f" {'429s':>5} {'once':>6}"
        )
        for row in rows:
            print(
                f"  {row['agents']:>6} {'yes' if row['coordinated'] else 'no':>6}"
                f" {row['steady_per_min']:>9} {row['share_of_bound']:>8.0%}"
                f" {row['max_inflight']:>13} {row['count_429']:>5} {row['delivered_once']:>6}"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
