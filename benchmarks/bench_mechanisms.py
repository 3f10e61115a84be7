"""Each narrow mechanism on and off, alternately, in one invocation.

For every pair, mechanism and scenario the agent runs once as it is and once
with the mechanism patched out (``mechanisms.py``; the order flips from one
pair to the next, so a drift of the machine's load favours neither side).
Every run is a full ``bench.py`` scenario: every result verified byte for
byte, at most 2 AC requests in flight, exit 0; a failed run is reported and
counted as failed.

Per mechanism and scenario it prints agent CPU per task (whole process) and
the share of the server-time bound reached, as the range over the "on" runs,
the range over the "off" runs, and the per-pair gain (off - on CPU; on - off
ratio) as a range. A mechanism *gains* on a scenario when every pair gains
and the smallest gain is larger than the spread (max - min) of either side.

Usage::

    python benchmarks/bench_mechanisms.py --pairs 3 --json out.json
    python benchmarks/bench_mechanisms.py --mechanism memo --scenario b-fast-ac --tasks b-fast-ac=300
    python benchmarks/bench_mechanisms.py --mechanism borrow --scenario held-lane
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import bench_delivery
import mechanisms
from bench import SCENARIOS, BenchFailure, Outcome, _compile_agent, machine, run_scenario

from acagent.testing import FakeACServer

DEFAULT_SCENARIOS = ["a-slow-targets", "b-fast-ac", "c-slow-ac", "d-mixed-sizes"]
#: not a bench.py scenario: one upload-result held by the server while small results wait
HELD_LANE = "held-lane"
HELD_SECONDS = 20.0

Run = Dict[str, Any]


def _span(values: Sequence[float]) -> Tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def summarise(runs: Sequence[Run], mechanism: str, scenario: str) -> Optional[Dict[str, Any]]:
    """The on/off figures of one mechanism on one scenario (None without a good pair)."""
    pairs: Dict[int, Dict[str, Run]] = {}
    for r in runs:
        if r["mechanism"] == mechanism and r["scenario"] == scenario and r["ok"]:
            pairs.setdefault(r["pair"], {})[r["side"]] = r
    both = [p for _, p in sorted(pairs.items()) if "on" in p and "off" in p]
    if not both:
        return None
    cpu_on = [p["on"]["cpu"] for p in both]
    cpu_off = [p["off"]["cpu"] for p in both]
    ratio_on = [p["on"]["ratio"] for p in both]
    ratio_off = [p["off"]["ratio"] for p in both]
    cpu_gain = [off - on for on, off in zip(cpu_on, cpu_off)]
    ratio_gain = [on - off for on, off in zip(ratio_on, ratio_off)]

    def gains(gain: List[float], on: List[float], off: List[float]) -> bool:
        spread = max(max(on) - min(on), max(off) - min(off))
        return min(gain) > spread

    return {
        "mechanism": mechanism,
        "scenario": scenario,
        "pairs": len(both),
        "cpu_on": _span(cpu_on),
        "cpu_off": _span(cpu_off),
        "cpu_gain": _span(cpu_gain),
        "cpu_gain_pct": _span([g / off * 100.0 for g, off in zip(cpu_gain, cpu_off)]),
        "ratio_on": _span(ratio_on),
        "ratio_off": _span(ratio_off),
        "ratio_gain": _span(ratio_gain),
        "cpu_gains": gains(cpu_gain, cpu_on, cpu_off),
        "ratio_gains": gains(ratio_gain, ratio_on, ratio_off),
        "cpu_loses": gains([-g for g in cpu_gain], cpu_on, cpu_off),
        "ratio_loses": gains([-g for g in ratio_gain], ratio_on, ratio_off),
    }


def held_lane(env: Dict[str, str]) -> Run:
    """One 700 KB result (upload-result) whose upload the server holds for
    ``HELD_SECONDS``, then 20 small ones (2 KB, put-result), 10 threads, 5 ms
    AC: when the last small result arrives (seconds after the first
    get-task), and whether the held one arrived after it was let through."""
    specs: List[bench_delivery.TaskSpec] = [
        ("held-big", "/bytes/716800?seed=1&latency=0.05", "ok", 716800, 1)
    ]
    specs += [
        (f"held-small-{i:02d}", f"/bytes/2048?seed={i}&latency=0.05", "ok", 2048, i)
        for i in range(20)
    ]
    released: List[float] = []

    def hold(ac: FakeACServer) -> None:
        gate = ac.stall("upload-result")

        def release() -> None:
            released.append(time.monotonic())
            gate.set()

        timer = threading.Timer(HELD_SECONDS, release)
        timer.daemon = True
        timer.start()

    bench_delivery.AGENT_ENV.clear()
    bench_delivery.AGENT_ENV.update(env)
    run = bench_delivery.drive(
        HELD_LANE, specs, threads=10, ac_latency=0.005, setup=hold, timeout=120
    )
    small = [t[0] for t in specs[1:]]
    failures = list(run.failures)
    big_at = run.received.get("held-big")
    if big_at is None or not released or big_at < released[0]:
        failures.append("the held result did not arrive after the server let it through")
    return {
        "ok": not failures,
        "error": "; ".join(failures),
        "small_done_s": bench_delivery.span(run, small),
        "cpu": run.cpu_s * 1000.0 / run.tasks,
        "max_inflight": run.max_inflight,
        "replies": run.replies,
    }


def report(summaries: Sequence[Dict[str, Any]]) -> str:
    head = (
        "| mechanism | scenario | pairs | CPU ms/task on | off | gain (off - on) ms | gain % "
        "| ratio on | off | gain (on - off) | CPU gain > spread | ratio gain > spread |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]

    def rng(span: Tuple[float, float], fmt: str) -> str:
        return f"{span[0]:{fmt}}..{span[1]:{fmt}}"

    for s in summaries:
        rows.append(
            f"| {s['mechanism']} | {s['scenario']} | {s['pairs']} "
            f"| {rng(s['cpu_on'], '.2f')} | {rng(s['cpu_off'], '.2f')} "
            f"| {rng(s['cpu_gain'], '+.2f')} | {rng(s['cpu_gain_pct'], '+.1f')} "
            f"| {rng(s['ratio_on'], '.1%')} | {rng(s['ratio_off'], '.1%')} "
            f"| {s['ratio_gain'][0] * 100:+.1f}..{s['ratio_gain'][1] * 100:+.1f} pt "
            f"| {'yes' if s['cpu_gains'] else ('LOSS' if s['cpu_loses'] else 'no')} "
            f"| {'yes' if s['ratio_gains'] else ('LOSS' if s['ratio_loses'] else 'no')} |"
        )
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument(
        "--mechanism", action="append", choices=mechanisms.MECHANISMS, help="(repeatable)"
    )
    parser.add_argument("--scenario", action="append", choices=[*sorted(SCENARIOS), HELD_LANE])
    parser.add_argument(
        "--tasks", action="append", default=[], metavar="SCENARIO=N", help="task count override"
    )
    parser.add_argument("--agent-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    mechs = args.mechanism or list(mechanisms.MECHANISMS)
    names = args.scenario or DEFAULT_SCENARIOS
    for item in args.tasks:
        name, _, count = item.partition("=")
        SCENARIOS[name].tasks = int(count)
    base = dict(e.split("=", 1) for e in args.agent_env)
    _compile_agent(base)
    envs = {
        side: {m: mechanisms.agent_env([m] if side == "off" else [], base) for m in mechs}
        for side in ("on", "off")
    }
    print(f"machine: {json.dumps(machine())}", flush=True)
    print(f"pairs {args.pairs}, mechanisms {mechs}, scenarios {names}", flush=True)
    print(
        "tasks: "
        + ", ".join(
            f"{n}={SCENARIOS[n].tasks}+{len(SCENARIOS[n].extra_sizes)}"
            for n in names
            if n in SCENARIOS
        ),
        flush=True,
    )
    runs: List[Run] = []
    failed = 0
    started = time.monotonic()
    for pair in range(args.pairs):
        for mi, mech in enumerate(mechs):
            for si, name in enumerate(names):
                order = ("on", "off") if (pair + mi + si) % 2 == 0 else ("off", "on")
                for side in order:
                    run: Run = {"pair": pair, "mechanism": mech, "scenario": name, "side": side}
                    if name == HELD_LANE:
                        run.update(held_lane(envs[side][mech]))
                        runs.append(run)
                        failed += 0 if run["ok"] else 1
                        print(
                            f"pair {pair} {mech:12s} {name} {side:3s}: ok {run['ok']} {run['error']}"
                            f" last small result at {run['small_done_s']:.2f} s,"
                            f" CPU/task {run['cpu']:.1f} ms, max in-flight {run['max_inflight']},"
                            f" replies {run['replies']}, t+{time.monotonic() - started:.0f}s",
                            flush=True,
                        )
                        continue
                    try:
                        o: Outcome = run_scenario(
                            SCENARIOS[name], agent_env=list(envs[side][mech].items())
                        )
                    except BenchFailure as exc:
                        failed += 1
                        run.update(ok=False, error=str(exc)[:2000])
                        print(f"FAILED {pair} {mech} {name} {side}: {exc}", flush=True)
                        runs.append(run)
                        continue
                    run.update(
                        ok=True,
                        cpu=o.process_cpu_ms_per_task,
                        busy_cpu=o.cpu_ms_per_task,
                        ratio=o.server_ratio,
                        tasks_per_min=o.tasks_per_min,
                        outcome=asdict(o),
                    )
                    runs.append(run)
                    print(
                        f"pair {pair} {mech:12s} {name} {side:3s}: {o.verified}/{o.tasks} verified"
                        f" {o.vias}, exit {o.exit_code}, {o.tasks_per_min:.0f}/min,"
                        f" {o.server_ratio:.1%} of server-time bound, CPU/task whole process"
                        f" {o.process_cpu_ms_per_task:.2f} ms (busy window {o.cpu_ms_per_task:.2f}),"
                        f" max in-flight {o.max_inflight}, load {o.load_before:.1f}->"
                        f"{o.load_after:.1f}, t+{time.monotonic() - started:.0f}s",
                        flush=True,
                    )
    summaries = [
        s
        for m in mechs
        for n in names
        if n != HELD_LANE and (s := summarise(runs, m, n)) is not None
    ]
    for m in mechs:
        held = [r for r in runs if r["scenario"] == HELD_LANE and r["mechanism"] == m]
        for side in ("on", "off"):
            done = [r["small_done_s"] for r in held if r["side"] == side and r["ok"]]
            if done:
                print(
                    f"{HELD_LANE}, {m} {side}: last small result at {min(done):.2f}..{max(done):.2f} s"
                    f" ({len(done)} runs)"
                )
    print()
    print(report(summaries))
    print(f"\n{failed} failed runs; {time.monotonic() - started:.0f} s in all")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "runs": runs, "summaries": summaries}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
