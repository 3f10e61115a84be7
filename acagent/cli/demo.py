"""``python -m acagent demo``: the agent's main job on a built-in default.

Starts a ``FakeACServer`` and a ``FakeTarget`` in this process, queues a few
hundred tasks of mixed sizes, runs them through the real Pipeline over HTTP
on 127.0.0.1, shows its progress (a line redrawn in place on a terminal,
plain lines every few seconds otherwise), then prints a summary and exits 0
only if every result arrived exactly once and matched the target's bytes.

It runs with settings a production agent would not use (no rate limit, a
short poll interval): it says which at the start, and what a default run is
limited to, so its throughput is not mistaken for a default run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

from ..config import INLINE_BODY_LIMIT, AgentConfig
from ..pipeline import Pipeline
from ..testing import FakeACServer, FakeTarget, expected_sha256
from .options import DEMO_AGENTS_HELP, DEMO_DESCRIPTION, FLAG_OF_FIELD

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
    parser = argparse.ArgumentParser(prog="acagent demo", description=DEMO_DESCRIPTION)
    parser.add_argument("--agents", type=int, metavar="N", help=DEMO_AGENTS_HELP)
    parser.add_argument(
        "--tasks", type=int, default=300, metavar="N", help="how many tasks (default 300)"
    )
    parser.add_argument(
        "--executorPoolSize",
        type=int,
        default=20,
        metavar="N",
        help="executor threads (default 20)",
    )
    parser.add_argument(
        "--targetLatency",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="seconds per target call (default 0.05)",
    )
    parser.add_argument(
        "--acLatency",
        type=float,
        default=0.002,
        metavar="SECONDS",
        help="seconds per AC call (default 0.002)",
    )
    parser.add_argument(
        "--uploadToAc",
        choices=("true", "false"),
        default="true",
        help="large bodies to upload-result (true) or to the fake S3 (false) (default true)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the body sizes (default 7)")
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


#: settings the notice leaves out: where things go and what is logged, not what a run can do
_NOT_LIMITS = frozenset(
    {"server_url", "api_key", "spool_dir", "log_dir", "enable_file_logging", "enable_metrics_file"}
)


def _defaults() -> Dict[str, Any]:
    return {
        f.name: f.default
        for f in dataclasses.fields(AgentConfig)
        if f.default is not dataclasses.MISSING
    }


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


def not_as_a_default_run(settings: Mapping[str, Any], shared: bool = False) -> List[str]:
    """One line per setting (AgentConfig field -> value) that a default run has otherwise.

    The rate limit says what a default run is limited to: the demo's throughput
    is not one a default agent reaches. ``shared``: agents sharing one budget
    through Redis, whose rate limit is one for all of them.
    """
    defaults = _defaults()
    lines = []
    for name, value in settings.items():
        if name in _NOT_LIMITS or name not in defaults or value == defaults[name]:
            continue
        flag = f"{FLAG_OF_FIELD.get(name, name)} {_shown(value)}"
        if name == "rate_limit_per_min" and value == 0:
            per_min = defaults[name]
            lines.append(
                f"{flag}: rate limit off here; a default run is limited to {per_min} "
                f"get-tasks/min and {per_min} uploads/min, so at most {per_min} tasks/min"
                + (" (all agents on the key together)" if shared else "")
            )
        else:
            lines.append(f"{flag} (a default run: {_shown(defaults[name])})")
    return lines


def settings_notice(settings: Mapping[str, Any], shared: bool = False) -> str:
    """The lines printed once at the start: what differs from a default production run."""
    lines = not_as_a_default_run(settings, shared)
    if not lines:
        return "  settings: those of a default run\n"
    return "".join(
        ["  not as in a default production run:\n", *(f"    {line}\n" for line in lines)]
    )


class Progress:
    """A progress line: redrawn in place on a terminal, else a plain line every few seconds.

    A pipe or a file never gets a carriage return.
    """

    def __init__(self, out: TextIO, every: float = 2.0) -> None:
        self.out = out
        self.live = out.isatty()
        self.every = every
        self._next = time.monotonic() + every
        self._width = 0

    def show(self, text: str) -> None:
        if self.live:
            self.out.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.out.flush()
            return
        now = time.monotonic()
        if now >= self._next:
            self.out.write(text + "\n")
            self.out.flush()
            self._next = now + self.every

    def done(self) -> None:
        """Clear the redrawn line (nothing to do for plain lines)."""
        if self.live and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0


def main(argv: Sequence[str] = ()) -> int:
    args = _parse(argv)
    rng = random.Random(args.seed)
    sizes = _pick_sizes(args.tasks, rng)
    out = sys.stdout
    progress = Progress(out, PLAIN_PROGRESS_EVERY)
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
            out.write(intro_line(len(sizes), args.executorPoolSize) + "\n")
            out.write(settings_notice(dataclasses.asdict(config)))
            out.flush()
            started = time.monotonic()
            with Pipeline(config) as agent:
                while not ac.wait_for_results(len(sizes), timeout=0.5):
                    now = time.monotonic()
                    fetched = int(agent.metrics.counter_totals()["fetched"])
                    progress.show(
                        f"  {len(ac.results)}/{len(sizes)} results  fetched={fetched}"
                        f"  AC in flight max={ac.max_inflight}  {now - started:5.1f}s"
                    )
                    if now - started > 300:
                        progress.done()
                        out.write("  timed out after 300 s\n")
                        break
            elapsed = time.monotonic() - started
        progress.done()
        return _summary(ac, expected, elapsed, out, config.rate_limit_per_min)


def _summary(
    ac: FakeACServer,
    expected: Dict[str, Tuple[int, Optional[str]]],
    elapsed: float,
    out: TextIO,
    rate_limit_per_min: int,
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
        f"  throughput             {len(expected) / elapsed * 60:.0f} tasks/min ({elapsed:.1f}s)"
        + default_limit_note(rate_limit_per_min),
        f"  AC in flight, highest  {ac.max_inflight} (limit 2)",
        f"  AC 429 replies         {ac.count_429}",
        f"  AC connections opened  {ac.connections_opened}",
    ]
    lines += [f"  WRONG {w}" for w in wrong[:10]]
    ok = not wrong and ac.max_inflight <= 2 and ac.count_429 == 0
    lines.append("  result                 " + ("OK" if ok else "FAILED"))
    print("\n".join(lines), file=out)
    return 0 if ok else 1


def default_limit_note(rate_limit_per_min: int) -> str:
    """What a default run reaches at most, for a throughput figure got without the rate limit."""
    if rate_limit_per_min:
        return ""
    return f"; a default run: at most {_defaults()['rate_limit_per_min']} tasks/min"
