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
    python benchmarks/bench_mechanisms.py --mechanism memo --scenario i13-b --tasks i13-b=300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mechanisms
from bench import SCENARIOS, BenchFailure, Outcome, _compile_agent, machine, run_scenario

DEFAULT_SCENARIOS = ["i13-a", "i13-b", "i13-c", "i13-d"]

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
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
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
        + ", ".join(f"{n}={SCENARIOS[n].tasks}+{len(SCENARIOS[n].extra_sizes)}" for n in names),
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
    summaries = [s for m in mechs for n in names if (s := summarise(runs, m, n)) is not None]
    print()
    print(report(summaries))
    print(f"\n{failed} failed runs; {time.monotonic() - started:.0f} s in all")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "runs": runs, "summaries": summaries}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
