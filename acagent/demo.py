"""``python -m acagent demo``: the agent's main job on a built-in default.

Starts a ``FakeACServer`` and a ``FakeTarget`` in this process, queues a few
hundred tasks of mixed sizes, runs them through the real Pipeline over HTTP
on 127.0.0.1, shows its progress (a line redrawn in place on a terminal,
plain lines every few seconds otherwise), then prints a summary and exits 0
only if every result arrived exactly once and matched the target's bytes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

from .config import INLINE_BODY_LIMIT, AgentConfig
from .pipeline import Pipeline
from .testing import FakeACServer, FakeTarget, expected_sha256

#: (size in bytes, share of the tasks): mostly small, some large
SIZE_MIX: List[Tuple[int, float]] = [
    (0, 0.05),
    (1_024, 0.40),
    (16_384, 0.25),
    (200_000, 0.15),
    (INLINE_BODY_LIMIT + 1, 0.05),
    (1_500_000, 0.07),
    (5_000_000, 0.03),
]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acagent demo", description=__doc__)
    parser.add_argument("--tasks", type=int, default=300, help="how many tasks (default 300)")
    parser.add_argument("--executorPoolSize", type=int, default=20, help="executor threads")
    parser.add_argument("--targetLatency", type=float, default=0.05, help="seconds per target call")
    parser.add_argument("--acLatency", type=float, default=0.002, help="seconds per AC call")
    parser.add_argument("--uploadToAc", choices=("true", "false"), default="true")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(list(argv))
    if args.tasks < 1 or args.executorPoolSize < 1:
        parser.error("--tasks and --executorPoolSize must be >= 1")
    return args


def _pick_sizes(count: int, rng: random.Random) -> List[int]:
    sizes, weights = zip(*SIZE_MIX)
    return rng.choices(sizes, weights=weights, k=count)


#: seconds between progress lines when stdout is not a terminal
PLAIN_PROGRESS_EVERY = 2.0


def intro_line(tasks: int, threads: int) -> str:
    """What the demo is about to do, in one line (printed first)."""
    return (
        f"acagent demo: running {tasks} tasks (bodies of 0 B to 5 MB) through the real agent "
        f"({threads} executor threads) against a fake AC server and a fake tool on 127.0.0.1, "
        "then checking every result byte for byte"
    )


def main(argv: Sequence[str] = ()) -> int:
    args = _parse(argv)
    rng = random.Random(args.seed)
    sizes = _pick_sizes(args.tasks, rng)
    out = sys.stdout
    # A terminal gets one line redrawn in place; a pipe or a file gets plain lines.
    live = out.isatty()
    out.write(intro_line(len(sizes), args.executorPoolSize) + "\n")
    out.flush()
    with FakeTarget() as target, FakeACServer(max_concurrent=2, latency=args.acLatency) as ac:
        expected: Dict[str, Tuple[int, Optional[str]]] = {}
        for i, size in enumerate(sizes):
            task_id = f"demo-{i:05d}"
            seed = rng.randrange(1 << 30)
            expected[task_id] = (size, expected_sha256(size, seed) if size else None)
            ac.add_task(
                {
                    "taskId": task_id,
                    "method": "GET",
                    "url": f"{target.url}/bytes/{size}?seed={seed}&latency={args.targetLatency}",
                    "requestHeaders": {"Accept": "application/json"},
                }
            )
        with tempfile.TemporaryDirectory(prefix="acagent-demo-") as spool:
            config = AgentConfig(
                server_url=ac.url,
                api_key="demo-key",
                executor_pool_size=args.executorPoolSize,
                spool_dir=spool,
                poll_interval=0.05,
                rate_limit_per_min=0,
                upload_to_ac=args.uploadToAc == "true",
            )
            started = time.monotonic()
            next_plain = started + PLAIN_PROGRESS_EVERY
            with Pipeline(config) as agent:
                while not ac.wait_for_results(len(sizes), timeout=0.5):
                    now = time.monotonic()
                    done = len(ac.results)
                    fetched = int(agent.metrics.counter_totals()["fetched"])
                    progress = (
                        f"  {done}/{len(sizes)} results  fetched={fetched}"
                        f"  AC in flight max={ac.max_inflight}  {now - started:5.1f}s"
                    )
                    if live:
                        out.write("\r" + progress)
                        out.flush()
                    elif now >= next_plain:
                        out.write(progress + "\n")
                        out.flush()
                        next_plain = now + PLAIN_PROGRESS_EVERY
                    if now - started > 300:
                        out.write("\n  timed out after 300 s\n")
                        break
            elapsed = time.monotonic() - started
        if live:
            out.write("\r" + " " * 78 + "\r")
        return _summary(ac, expected, elapsed, out)


def _summary(
    ac: FakeACServer,
    expected: Dict[str, Tuple[int, Optional[str]]],
    elapsed: float,
    out: TextIO,
) -> int:
    results = ac.results
    wrong: List[str] = []
    by_via: Dict[str, int] = {}
    for task_id, (size, digest) in expected.items():
        got = results.get(task_id, [])
        if len(got) != 1:
            wrong.append(f"{task_id}: {len(got)} results")
            continue
        r = got[0]
        by_via[r.via] = by_via.get(r.via, 0) + 1
        if r.body_len != size or (digest is not None and r.body_sha256 != digest):
            wrong.append(f"{task_id}: body mismatch ({r.via}, {r.body_len} bytes)")
    verified = len(expected) - len(wrong)
    lines = [
        "acagent demo: summary",
        f"  tasks                  {len(expected)}",
        f"  results verified       {verified}/{len(expected)} (byte-for-byte, sha256)",
        f"  by path                {', '.join(f'{k}={v}' for k, v in sorted(by_via.items()))}",
        f"  throughput             {len(expected) / elapsed * 60:.0f} tasks/min ({elapsed:.1f}s)",
        f"  AC in flight, highest  {ac.max_inflight} (limit 2)",
        f"  AC 429 replies         {ac.count_429}",
        f"  AC connections opened  {ac.connections_opened}",
    ]
    lines += [f"  WRONG {w}" for w in wrong[:10]]
    ok = not wrong and ac.max_inflight <= 2 and ac.count_429 == 0
    lines.append("  result                 " + ("OK" if ok else "FAILED"))
    print("\n".join(lines), file=out)
    return 0 if ok else 1
