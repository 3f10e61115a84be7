"""End-to-end benchmark of the agent: the real CLI in a subprocess against fakes.

The fake AC server runs in this process, the fake target in a child process.

Each scenario starts a ``FakeTarget`` and a ``FakeACServer`` (``max_concurrent=2``,
configurable AC latency per request and extra cost per new AC connection) in
this process, queues every task up front, then starts
``python -m acagent --serverUrl ... --apiKey ...`` as a child process. When the
server has one result per task, the child is sampled one last time, stopped
with SIGTERM and must exit 0. Every result is then checked byte for byte (sha256
of the deterministic body of the task's size and seed); any missing, duplicate,
failed or wrong result, a concurrency breach or a non-zero exit fails the run
(exit status 1).

Figures per run (timestamps are taken at the server, on this process's
monotonic clock):

- ``tasks/min``: tasks / (last result received - first get-task started).
- ``bound/min``: min(threads / target latency, 1 / AC latency for get-task,
  1 / AC latency for put-result, rate limit). The AC terms assume one call at a
  time per direction and zero overhead, so they are a true upper bound.
- ``max in-flight``, ``AC conns``: counted by the fake AC server.
- ``peak RSS``: VmHWM of the agent, read before SIGTERM.
- ``CPU/task``: agent utime+stime between the first get-task and the last
  result (sampled from /proc every 50 ms, interpolated), divided by tasks.
- ``whole process`` CPU/task: all the agent's CPU, start-up and stop
  included, divided by tasks. The agent's package is compiled to bytecode
  first, as ``pip install`` does, so start-up is an installed agent's.
- ``first get-task``: server time of the first get-task minus Popen time.
- ``fetch ms``/``upload ms``: mean interval between consecutive get-task
  (put-result/upload-result) starts while busy: AC latency + per-call overhead.
- ``server-time bound/min``: as ``bound/min``, but each AC term is 60 s over
  the server's own mean time per call in this run (configured latency plus
  its handling): how the reference table states its bounds (5,714/min for 10.5 ms).
- ``raw-client bound/min``: before each run a minimal client (``http.client``,
  one kept-alive connection, no agent) times 40 get-task calls against the same
  fake server; 60 / that round trip replaces the AC terms of the bound. It
  shows how much of the gap to the pure-latency bound is the fake server and
  loopback (sleep overshoot, HTTP parsing) rather than the agent.

Usage::

    python benchmarks/bench.py --short                  # CI: correctness, a few seconds
    python benchmarks/bench.py                          # every full scenario
    python benchmarks/bench.py --scenario small-50 --json out.json
    python benchmarks/bench.py --scenario small-200 --profile /tmp/prof   # py-spy
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mechanisms

from acagent.testing import FakeACServer, FakeTarget, expected_sha256

API_KEY = "bench-key-0123456789"
PERMITS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
KB = 1024
MB = 1024 * 1024

#: (weight, low size, high size) - a size is drawn uniformly from a picked band
SizeMix = Tuple[Tuple[float, int, int], ...]
SMALL: SizeMix = ((1.0, 1 * KB, 4 * KB),)


@dataclass
class Scenario:
    name: str
    description: str
    tasks: int
    threads: int
    target_latency: float = 0.2
    target_jitter: float = 0.0
    ac_latency: float = 0.02
    connection_cost: float = 0.005
    rate_limit: int = 0
    sizes: SizeMix = SMALL
    #: exact sizes appended after the drawn ones (the big-body runs)
    extra_sizes: Tuple[int, ...] = ()
    prefetch: Optional[int] = None
    poll_interval: float = 0.05
    #: name of the scenario whose peak RSS this one is compared with
    rss_baseline: Optional[str] = None
    #: targets checked for this scenario (see ``check_targets``)
    targets: Tuple[str, ...] = ()
    timeout: float = 120.0


SCENARIOS: Dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "short",
            "CI smoke run: 200 small tasks + 2 x 600 KB (upload-result), 10 threads, 20 ms targets",
            tasks=200,
            threads=10,
            target_latency=0.02,
            ac_latency=0.002,
            connection_cost=0.005,
            extra_sizes=(600 * KB, 600 * KB),
            timeout=90.0,
        ),
        Scenario(
            "small-10",
            "1-4 KB bodies, 10 threads, 200 ms targets, 20 ms AC, 5 ms/new conn, no rate limit",
            tasks=600,
            threads=10,
            targets=("throughput", "connections", "rss60", "cpu", "startup"),
        ),
        Scenario(
            "small-50",
            "1-4 KB bodies, 50 threads, 200 ms targets, 20 ms AC, 5 ms/new conn, no rate limit",
            tasks=900,
            threads=50,
            targets=("throughput", "connections", "cpu", "startup"),
        ),
        Scenario(
            "small-200",
            "1-4 KB bodies, 200 threads, 200 ms targets, 20 ms AC, 5 ms/new conn, no rate limit",
            tasks=900,
            threads=200,
            targets=("throughput", "connections", "cpu", "startup"),
        ),
        Scenario(
            "mixed",
            "mixed bodies 1 KB-20 MB, 10 threads, 200 ms +-50 ms targets, 20 ms AC, no rate limit",
            tasks=150,
            threads=10,
            target_jitter=0.1,
            target_latency=0.15,
            sizes=(
                (0.60, 1 * KB, 4 * KB),
                (0.25, 8 * KB, 500 * KB),
                (0.10, 512 * KB, 5 * MB),
                (0.05, 5 * MB, 20 * MB),
            ),
            extra_sizes=(20 * MB,),
            targets=("connections",),
            timeout=240.0,
        ),
        # the reference table, row by row
        Scenario(
            "a-slow-targets",
            "(a): 400 x 2 KB, 10 threads, 500 ms targets, 20 ms AC",
            tasks=400,
            threads=10,
            target_latency=0.5,
            ac_latency=0.02,
            sizes=((1.0, 2 * KB, 2 * KB),),
            targets=("ref_ratio95", "connections", "cpu2"),
        ),
        Scenario(
            "b-fast-ac",
            "(b): 1,500 x 1 KB, 50 threads, 200 ms targets, 10 ms AC",
            tasks=1500,
            threads=50,
            target_latency=0.2,
            ac_latency=0.01,
            sizes=((1.0, 1 * KB, 1 * KB),),
            targets=("ref_ratio90", "connections", "cpu2"),
            timeout=180.0,
        ),
        Scenario(
            "c-slow-ac",
            "(c): 300 tasks, 100 ms AC, 150 ms per new AC conn, 20 threads,"
            " 10% 700 KB bodies",
            tasks=300,
            threads=20,
            target_latency=0.2,
            ac_latency=0.1,
            connection_cost=0.15,
            sizes=((0.9, 1 * KB, 4 * KB), (0.1, 700 * KB, 700 * KB)),
            targets=("ref_ratio95", "connections"),
            timeout=180.0,
        ),
        Scenario(
            "d-mixed-sizes",
            "(d): 150 tasks 1 KB-20 MB, 10 threads, 150-250 ms targets, 20 ms AC",
            tasks=150,
            threads=10,
            target_jitter=0.1,
            target_latency=0.15,
            sizes=(
                (0.60, 1 * KB, 4 * KB),
                (0.25, 8 * KB, 500 * KB),
                (0.10, 512 * KB, 5 * MB),
                (0.05, 5 * MB, 20 * MB),
            ),
            extra_sizes=(20 * MB,),
            targets=("ref_rate1200", "connections"),
            timeout=240.0,
        ),
        Scenario(
            "big-200mb",
            "three 200 MB bodies (+20 small), 10 threads, 20 ms AC",
            tasks=20,
            threads=10,
            extra_sizes=(200 * MB, 200 * MB, 200 * MB),
            rss_baseline="small-10",
            targets=("connections", "rss_delta"),
            timeout=420.0,
        ),
        Scenario(
            "ratelimit-default",
            "defaults: 10 threads, rateLimitPerMin 250 per class, 200 ms targets, 20 ms AC",
            tasks=200,
            threads=10,
            rate_limit=250,
            targets=("rate", "connections"),
            timeout=150.0,
        ),
    )
}

FULL = [n for n in SCENARIOS if n != "short"] + ["idle"]
REFERENCE = ["a-slow-targets", "b-fast-ac", "c-slow-ac", "d-mixed-sizes", "idle"]

#: the issue's targets
TARGET_RATIO = 0.90
TARGET_RSS_MB = 60.0
TARGET_RSS_DELTA_MB = 20.0
TARGET_CPU_MS = 3.0
TARGET_STARTUP_S = 0.5
#: the rate-limited run must reach the limit over its steady part (the bucket's
#: 5 s burst lifts the whole-window figure above it)
TARGET_RATE_RATIO = 0.95


class BenchFailure(Exception):
    """A correctness check failed: the run is invalid."""


# --------------------------------------------------------------------------
# Sampling the child
# --------------------------------------------------------------------------


def _read_cpu_seconds(pid: int) -> Optional[Tuple[float, float]]:
    """(user, system) CPU seconds of ``pid`` from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # Fields after the parenthesised command: state is field 3; utime 14, stime 15.
    rest = raw[raw.rfind(")") + 2 :].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def _read_status_kb(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Samples the child's CPU seconds and RSS every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.times: List[float] = []
        self.cpu: List[float] = []
        self.sys_cpu: List[float] = []
        self.max_rss_kb = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        cpu = _read_cpu_seconds(self.pid)
        rss = _read_status_kb(self.pid, "VmRSS")
        if cpu is not None:
            self.times.append(now)
            self.cpu.append(cpu[0] + cpu[1])
            self.sys_cpu.append(cpu[1])
        if rss is not None:
            self.max_rss_kb = max(self.max_rss_kb, rss)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(2.0)
        self.sample()

    def cpu_at(self, t: float, *, system: bool = False) -> float:
        """CPU seconds (user+system, or system only) at ``t``, interpolated between samples."""
        values = self.sys_cpu if system else self.cpu
        if not self.times:
            return 0.0
        i = bisect.bisect_left(self.times, t)
        if i <= 0:
            return values[0]
        if i >= len(self.times):
            return values[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = values[i - 1], values[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    scenario: str
    description: str
    tasks: int
    threads: int
    target_latency_ms: float
    ac_latency_ms: float
    connection_cost_ms: float
    rate_limit_per_min: int
    bytes_total: int
    duration_s: float = 0.0
    tasks_per_min: float = 0.0
    steady_tasks_per_min: float = 0.0
    bound_per_min: float = 0.0
    bound_terms: Dict[str, float] = field(default_factory=dict)
    bound_used: str = ""
    ratio: float = 0.0
    #: round trip of a minimal client (http.client, one kept-alive connection)
    #: to this fake AC server, and the AC bound it implies (see ``calibrate``)
    raw_ac_round_trip_ms: float = 0.0
    raw_ac_bound_per_min: float = 0.0
    #: the reference table's bound: the AC terms use the server's own mean time per call
    #: in this run (configured latency + its handling), not the configured
    #: latency: min(executor, 60 / get-task server time, 60 / upload server time)
    server_bound_per_min: float = 0.0
    server_ratio: float = 0.0
    max_inflight: int = 0
    rejected_concurrent: int = 0
    ac_connections: int = 0
    peak_rss_mb: float = 0.0
    rss_delta_mb: Optional[float] = None
    cpu_ms_per_task: float = 0.0
    sys_cpu_ms_per_task: float = 0.0
    #: the whole agent process (start-up, idle polls, shutdown excluded: sampled
    #: just before SIGTERM) divided by tasks delivered
    process_cpu_ms_per_task: float = 0.0
    startup_cpu_ms: float = 0.0
    first_get_task_s: float = 0.0
    fetch_cycle_ms: float = 0.0
    upload_cycle_ms: float = 0.0
    #: mean server time of one get-task (AC latency + handling) and mean gap
    #: from one get-task's reply to the next one's arrival (the agent's part)
    fetch_server_ms: float = 0.0
    fetch_gap_ms: float = 0.0
    #: share of the busy window with 0, 1, 2 AC requests open at the server
    #: (permit use: the AC bound needs 2 open all the time)
    permits_busy: Tuple[float, ...] = ()
    get_task_calls: int = 0
    empty_get_tasks: int = 0
    server_cpu_ms_per_task: float = 0.0
    #: 1-minute load average when the run started and ended (others' work on the machine)
    load_before: float = 0.0
    load_after: float = 0.0
    exit_code: Optional[int] = None
    stop_s: float = 0.0
    verified: int = 0
    vias: Dict[str, int] = field(default_factory=dict)
    targets: Dict[str, str] = field(default_factory=dict)
    command: str = ""


def draw_sizes(s: Scenario, rng: random.Random) -> List[int]:
    weights = [w for w, _, _ in s.sizes]
    sizes = []
    for _ in range(s.tasks):
        _, low, high = rng.choices(s.sizes, weights=weights)[0]
        sizes.append(rng.randint(low, high))
    return sizes + list(s.extra_sizes)


def physical_bound(s: Scenario) -> Tuple[float, Dict[str, float], str]:
    mean_target = s.target_latency + s.target_jitter / 2.0
    terms = {
        "executor": s.threads * 60.0 / mean_target,
        "ac_fetch": 60.0 / s.ac_latency if s.ac_latency > 0 else float("inf"),
        "ac_upload": 60.0 / s.ac_latency if s.ac_latency > 0 else float("inf"),
    }
    if s.rate_limit:
        terms["rate_limit"] = float(s.rate_limit)
    used = min(terms, key=lambda k: terms[k])
    tied = [k for k, v in terms.items() if abs(v - terms[used]) < 1e-6]
    return terms[used], terms, "=".join(tied)


def _open_shares(spans: List[Tuple[float, float]], t0: float, t1: float) -> Tuple[float, ...]:
    """Share of [t0, t1] during which 0, 1, 2, ... of ``spans`` were open."""
    edges: List[Tuple[float, int]] = []
    for start, end in spans:
        start, end = max(start, t0), min(end, t1)
        if end > start:
            edges += [(start, 1), (end, -1)]
    edges.sort()
    held: Dict[int, float] = {}
    level, at = 0, t0
    for when, step in edges:
        held[level] = held.get(level, 0.0) + (when - at)
        level, at = level + step, when
    held[level] = held.get(level, 0.0) + (t1 - at)
    total = max(t1 - t0, 1e-9)
    return tuple(round(held.get(k, 0.0) / total, 3) for k in range(max(held) + 1))


def _mean_cycle(starts: List[float], t_end: float) -> float:
    """Mean interval between consecutive call starts up to ``t_end`` (ms)."""
    starts = sorted(t for t in starts if t <= t_end)
    if len(starts) < 2:
        return 0.0
    return (starts[-1] - starts[0]) / (len(starts) - 1) * 1000.0


_CALIBRATE = r"""
import http.client, json, sys, time
host, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPConnection(host)
headers = {"Authorization": "Bearer " + key, "Accept": "*/*"}
took = []
for i in range(n + 3):
    t = time.perf_counter()
    conn.request("GET", "/api/http-teleport/get-task?agentId=calibrate", headers=headers)
    json.loads(conn.getresponse().read())
    took.append(time.perf_counter() - t)
print(sum(took[3:]) / n)
"""


def calibrate(ac: FakeACServer, calls: int = 40) -> float:
    """Mean seconds per get-task of a minimal client against ``ac`` (its queue empty).

    This is what the fake server plus loopback cost without any agent: AC
    latency, the server's own sleep overshoot and HTTP handling.
    """
    host = ac.url.split("//", 1)[1]
    proc = subprocess.run(
        [sys.executable, "-c", _CALIBRATE, host, API_KEY, str(calls)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ac.reset_counters()
    return float(proc.stdout.strip())


def agent_command(s: Scenario, url: str, spool: str) -> List[str]:
    cmd = [
        sys.executable,
        "-m",
        "acagent",
        "--serverUrl",
        url,
        "--apiKey",
        API_KEY,
        "--executorPoolSize",
        str(s.threads),
        "--rateLimitPerMin",
        str(s.rate_limit),
        "--pollInterval",
        str(s.poll_interval),
        "--spoolDir",
        spool,
        "--enableFileLogging",
        "false",
        "--metricsFile",
        "false",
        "--logFormat",
        "text",
    ]
    if s.prefetch is not None:
        cmd += ["--prefetch", str(s.prefetch)]
    return cmd


def _start_profiler(
    pid: int, out_dir: str, name: str, extra: Sequence[str] = ()
) -> Optional[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("py-spy not found (pip install py-spy); profiling skipped", file=sys.stderr)
        return None
    os.makedirs(out_dir, exist_ok=True)
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--threads",
            *(extra or ["--gil"]),
            "--rate",
            "200",
            "--format",
            "raw",
            "-o",
            os.path.join(out_dir, f"{name}.txt"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_scenario(
    s: Scenario,
    *,
    profile_dir: Optional[str] = None,
    profile_args: Sequence[str] = (),
    agent_env: Sequence[Tuple[str, str]] = (),
    seed: int = 1,
) -> Outcome:
    rng = random.Random(f"{s.name}:{seed}")
    sizes = draw_sizes(s, rng)
    n = len(sizes)
    # Few distinct seeds keep the fake target's block cache warm (less server CPU).
    seeds = [i % 32 for i in range(n)]
    expected: Dict[Tuple[int, int], str] = {}
    for size, sd in zip(sizes, seeds):
        if (size, sd) not in expected:
            expected[(size, sd)] = expected_sha256(size, sd)
    bound, terms, used = physical_bound(s)
    out = Outcome(
        scenario=s.name,
        description=s.description,
        tasks=n,
        threads=s.threads,
        target_latency_ms=s.target_latency * 1000,
        ac_latency_ms=s.ac_latency * 1000,
        connection_cost_ms=s.connection_cost * 1000,
        rate_limit_per_min=s.rate_limit,
        bytes_total=sum(sizes),
        bound_per_min=bound,
        bound_terms=terms,
        bound_used=used,
    )
    workdir = tempfile.mkdtemp(prefix=f"acbench-{s.name}-")
    out.load_before = os.getloadavg()[0]
    failures: List[str] = []
    try:
        with (
            TargetProcess() as target,
            FakeACServer(
                max_concurrent=PERMITS,
                api_key=API_KEY,
                latency=s.ac_latency,
                connection_cost=s.connection_cost,
                keep_bodies_up_to=0,
            ) as ac,
        ):
            if s.ac_latency > 0:
                rt = calibrate(ac)
                out.raw_ac_round_trip_ms = rt * 1000.0
                out.raw_ac_bound_per_min = min(
                    terms["executor"], terms.get("rate_limit", 1e12), 60.0 / rt
                )
            ids = []
            for i, (size, sd) in enumerate(zip(sizes, seeds)):
                task_id = f"{s.name}-{i:06d}"
                ids.append(task_id)
                query = f"seed={sd}&latency={s.target_latency}&jitter={s.target_jitter}"
                ac.add_task(
                    {
                        "taskId": task_id,
                        "method": "GET",
                        "url": f"{target.url}/bytes/{size}?{query}",
                        "requestHeaders": {"Accept": "*/*"},
                    }
                )
            spool = os.path.join(workdir, "spool")
            cmd = agent_command(s, ac.url, spool)
            out.command = " ".join(
                ["python", "-m", "acagent", *[a if a != ac.url else "URL" for a in cmd[3:]]]
            ).replace(spool, "<tmp>/spool")
            env = dict(os.environ, TMPDIR=workdir, PYTHONUNBUFFERED="1", **dict(agent_env))
            log_path = os.path.join(workdir, "agent.log")
            self_cpu0 = _self_cpu()
            with open(log_path, "wb") as log_file:
                t_popen = time.monotonic()
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir
                )
                sampler = Sampler(proc.pid)
                sampler.sample()
                sampler.start()
                profiler = (
                    _start_profiler(proc.pid, profile_dir, s.name, profile_args)
                    if profile_dir
                    else None
                )
                try:
                    deadline = time.monotonic() + s.timeout
                    done = False
                    while not done and time.monotonic() < deadline and proc.poll() is None:
                        done = ac.wait_for_results(n, timeout=0.25)
                    got = len(ac.results)
                    if not done or got < n:
                        failures.append(
                            f"only {got}/{n} tasks have a result after {s.timeout:.0f}s"
                            f" (agent exit code {proc.poll()})"
                        )
                    sampler.stop()
                    process_cpu_s = sampler.cpu[-1] if sampler.cpu else 0.0
                    hwm = _read_status_kb(proc.pid, "VmHWM")
                    out.peak_rss_mb = max(hwm or 0, sampler.max_rss_kb) / 1024.0
                    self_cpu1 = _self_cpu()
                    if profiler is not None:
                        profiler.send_signal(signal.SIGINT)
                        try:
                            profiler.wait(20)
                        except subprocess.TimeoutExpired:
                            profiler.kill()
                            profiler.wait()
                    t_term = time.monotonic()
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                    try:
                        out.exit_code = proc.wait(60)
                    except subprocess.TimeoutExpired:
                        failures.append("agent did not exit within 60 s of SIGTERM")
                    out.stop_s = time.monotonic() - t_term
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            if out.exit_code != 0:
                failures.append(f"agent exit code {out.exit_code} (expected 0)")
            # Anything sent during shutdown counts too (duplicates are visible).
            time.sleep(0.1)
            results = ac.results
            requests = ac.requests
            out.max_inflight = ac.max_inflight
            out.rejected_concurrent = ac.rejected_concurrent
            out.ac_connections = ac.connections_opened
            if out.max_inflight > PERMITS:
                failures.append(f"AC in-flight reached {out.max_inflight} > {PERMITS}")
            if out.rejected_concurrent:
                failures.append(f"{out.rejected_concurrent} requests refused for concurrency")
            for text in ac.errors + target.errors:
                failures.append("fake server error: " + text.strip().splitlines()[-1])
            out.verified = _verify(ids, sizes, seeds, expected, results, failures, out.vias)

            gets = [r for r in requests if r.endpoint == "get-task"]
            uploads = [r for r in requests if r.endpoint in ("put-result", "upload-result")]
            received = sorted(r.received for lst in results.values() for r in lst)
            out.get_task_calls = len(gets)
            if gets and received:
                t_first = min(r.started for r in gets)
                t_last = received[min(n, len(received)) - 1]
                out.first_get_task_s = t_first - t_popen
                out.duration_s = t_last - t_first
                if out.duration_s > 0:
                    out.tasks_per_min = n * 60.0 / out.duration_s
                half = received[n // 2 - 1] if n >= 4 else t_first
                if t_last > half:
                    out.steady_tasks_per_min = (n - n // 2) * 60.0 / (t_last - half)
                out.ratio = out.tasks_per_min / bound if bound else 0.0
                cpu = sampler.cpu_at(t_last) - sampler.cpu_at(t_first)
                out.cpu_ms_per_task = cpu * 1000.0 / n
                out.process_cpu_ms_per_task = process_cpu_s * 1000.0 / n
                sys_cpu = sampler.cpu_at(t_last, system=True) - sampler.cpu_at(t_first, system=True)
                out.sys_cpu_ms_per_task = sys_cpu * 1000.0 / n
                out.startup_cpu_ms = sampler.cpu_at(t_first) * 1000.0
                busy = [r.started for r in gets if r.started <= t_last]
                out.empty_get_tasks = len(gets) - ac.tasks_handed_out
                out.fetch_cycle_ms = _mean_cycle(busy, t_last)
                out.upload_cycle_ms = _mean_cycle([r.started for r in uploads], t_last)
                window = sorted((r for r in gets if r.started <= t_last), key=lambda r: r.started)
                if len(window) >= 2:
                    out.fetch_server_ms = (
                        sum(r.finished - r.started for r in window) / len(window) * 1000.0
                    )
                    gaps = [b.started - a.finished for a, b in zip(window, window[1:])]
                    out.fetch_gap_ms = sum(gaps) / len(gaps) * 1000.0
                    sent = [r for r in uploads if r.started <= t_last]
                    upload_server_s = (
                        sum(r.finished - r.started for r in sent) / len(sent) if sent else 0.0
                    )
                    out.server_bound_per_min = min(
                        terms["executor"],
                        terms.get("rate_limit", 1e12),
                        60000.0 / out.fetch_server_ms,
                        60.0 / upload_server_s if upload_server_s > 0 else 1e12,
                    )
                    out.server_ratio = out.tasks_per_min / out.server_bound_per_min
                out.server_cpu_ms_per_task = (self_cpu1 - self_cpu0) * 1000.0 / n
                out.permits_busy = _open_shares(
                    [(r.started, r.finished) for r in requests], t_first, t_last
                )
            out.load_after = os.getloadavg()[0]
            if os.environ.get("BENCH_SHOW_LOG"):
                print(_tail(log_path, 5))
            if failures:
                tail = _tail(log_path, 30)
                raise BenchFailure(
                    f"scenario {s.name}: "
                    + "; ".join(failures[:20])
                    + "\n--- agent log tail ---\n"
                    + tail
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


IDLE_GOAL_PCT = 0.5


def run_idle(seconds: float = 60.0, warmup: float = 5.0) -> Dict[str, Any]:
    """An agent with no tasks, ``--pollInterval 1``: CPU % of one core and RSS growth.

    The window starts ``warmup`` seconds after the first get-task (start-up
    excluded here; it is reported on its own) and lasts ``seconds``.
    """
    s = Scenario("idle", "no tasks, empty polls every second", tasks=0, threads=10)
    s.poll_interval = 1.0
    workdir = tempfile.mkdtemp(prefix="acbench-idle-")
    report: Dict[str, Any] = {"scenario": "idle", "seconds": seconds}
    report["load_before"] = os.getloadavg()[0]
    try:
        with FakeACServer(max_concurrent=PERMITS, api_key=API_KEY, latency=0.02) as ac:
            cmd = agent_command(s, ac.url, os.path.join(workdir, "spool"))
            env = dict(os.environ, TMPDIR=workdir, PYTHONUNBUFFERED="1")
            with open(os.path.join(workdir, "agent.log"), "wb") as log_file:
                proc = subprocess.Popen(
                    cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir
                )
                try:
                    t0 = time.monotonic()
                    while not ac.requests and time.monotonic() - t0 < 30:
                        time.sleep(0.05)
                    time.sleep(warmup)
                    c0 = _read_cpu_seconds(proc.pid) or (0.0, 0.0)
                    rss0 = _read_status_kb(proc.pid, "VmRSS") or 0
                    w0 = time.monotonic()
                    polls0 = len(ac.requests)
                    time.sleep(seconds)
                    c1 = _read_cpu_seconds(proc.pid) or (0.0, 0.0)
                    rss1 = _read_status_kb(proc.pid, "VmRSS") or 0
                    w1 = time.monotonic()
                    polls1 = len(ac.requests)
                    proc.send_signal(signal.SIGTERM)
                    report["exit_code"] = proc.wait(60)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
        cpu = (c1[0] + c1[1]) - (c0[0] + c0[1])
        report["startup_cpu_ms"] = (c0[0] + c0[1]) * 1000.0
        report["cpu_pct_of_core"] = cpu / (w1 - w0) * 100.0
        report["polls"] = polls1 - polls0
        report["rss_start_mb"] = rss0 / 1024.0
        report["rss_end_mb"] = rss1 / 1024.0
        report["rss_growth_mb"] = (rss1 - rss0) / 1024.0
        report["load_after"] = os.getloadavg()[0]
        ok = report["cpu_pct_of_core"] <= IDLE_GOAL_PCT
        report["target"] = ("PASS " if ok else "MISS ") + (
            f"{report['cpu_pct_of_core']:.2f}% of a core (<= {IDLE_GOAL_PCT}%)"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            return b"".join(fh.readlines()[-lines:]).decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _verify(
    ids: Sequence[str],
    sizes: Sequence[int],
    seeds: Sequence[int],
    expected: Dict[Tuple[int, int], str],
    results: Dict[str, list],  # type: ignore[type-arg]
    failures: List[str],
    vias: Dict[str, int],
) -> int:
    """Exactly one result per task, status 200, body identical by sha256 and length."""
    good = 0
    known = set(ids)
    for task_id in results:
        if task_id not in known:
            failures.append(f"result for unknown task {task_id}")
    for task_id, size, sd in zip(ids, sizes, seeds):
        got = results.get(task_id, [])
        if len(got) != 1:
            failures.append(f"{task_id}: {len(got)} results (expected exactly 1)")
            continue
        r = got[0]
        vias[r.via] = vias.get(r.via, 0) + 1
        status = r.fields.get("statusCode")
        if r.via == "error" or status != 200:
            failures.append(f"{task_id}: via={r.via} status={status} {str(r.fields)[:200]}")
            continue
        if r.body_len != size or r.body_sha256 != expected[(size, sd)]:
            failures.append(
                f"{task_id}: body differs (len {r.body_len}, expected {size}; sha256 {r.body_sha256})"
            )
            continue
        good += 1
    return good


# --------------------------------------------------------------------------
# The fake target in its own process
# --------------------------------------------------------------------------


def _serve_target(conn: Any) -> None:
    """Child process: run a FakeTarget, send its URL, wait for "stop", send its errors."""
    with FakeTarget() as target:
        conn.send(target.url)
        conn.recv()  # "stop" (or EOF when the parent died: the with-block still closes)
        conn.send(list(target.errors))


class TargetProcess:
    """``FakeTarget`` in a child process (``.url``, ``.errors`` after exit).

    In the bench's own process the target's request handling shared one GIL
    with the fake AC server: at 50 concurrent target requests the AC server
    read each request late, and that delay was counted as the agent's gap
    (a real AC server and real targets do not share an interpreter). The
    child's CPU is not the agent's either, so nothing the agent is judged by
    moves into or out of the measurement.
    """

    START_TIMEOUT = 30.0

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_target, args=(child,), name="bench-target")
        self.url = ""
        self.errors: List[str] = []

    def __enter__(self) -> TargetProcess:
        self._proc.start()
        if not self._conn.poll(self.START_TIMEOUT):
            self._proc.kill()
            raise BenchFailure("the fake target process did not start")
        self.url = str(self._conn.recv())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
            if self._conn.poll(10.0):
                self.errors = list(self._conn.recv())
        except (OSError, EOFError):
            self.errors = ["the fake target process ended early"]
        self._proc.join(10.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)


# --------------------------------------------------------------------------
# Targets and reporting
# --------------------------------------------------------------------------


def check_targets(s: Scenario, o: Outcome) -> None:
    def mark(name: str, ok: bool, text: str) -> None:
        o.targets[name] = ("PASS " if ok else "MISS ") + text

    for t in s.targets:
        if t == "throughput":
            mark(t, o.ratio >= TARGET_RATIO, f"{o.ratio:.0%} of bound (>= 90%)")
        elif t == "connections":
            mark(t, o.ac_connections <= PERMITS, f"{o.ac_connections} AC conns (<= {PERMITS})")
        elif t == "rss60":
            mark(t, o.peak_rss_mb <= TARGET_RSS_MB, f"peak RSS {o.peak_rss_mb:.1f} MB (<= 60)")
        elif t == "cpu":
            mark(t, o.cpu_ms_per_task <= TARGET_CPU_MS, f"{o.cpu_ms_per_task:.2f} ms/task (<= 3)")
        elif t == "cpu2":
            c = o.process_cpu_ms_per_task
            mark(t, c <= 2.0, f"{c:.2f} ms/task whole process (<= 2)")
        elif t.startswith("ref_ratio"):
            # The reference table states its bounds from the server's measured time per
            # call (5,714/min = 60 s / 10.5 ms): judged the same way here.
            goal = int(t[len("ref_ratio") :]) / 100.0
            r = o.server_ratio
            mark(
                t,
                r >= goal,
                f"{r:.1%} of server-time bound {o.server_bound_per_min:.0f}/min (>= {goal:.0%});"
                f" {o.ratio:.1%} of the configured-latency bound",
            )
        elif t == "ref_rate1200":
            mark(t, o.tasks_per_min >= 1200, f"{o.tasks_per_min:.0f}/min (>= 1200)")
        elif t == "startup":
            mark(t, o.first_get_task_s <= TARGET_STARTUP_S, f"{o.first_get_task_s:.2f} s (<= 0.5)")
        elif t == "rate":
            steady = o.steady_tasks_per_min / o.bound_per_min if o.bound_per_min else 0.0
            mark(t, steady >= TARGET_RATE_RATIO, f"steady {steady:.0%} of 250/min (>= 95%)")
        elif t == "rss_delta":
            if o.rss_delta_mb is None:
                o.targets[t] = f"n/a (run {s.rss_baseline} in the same invocation)"
            else:
                mark(
                    t,
                    o.rss_delta_mb <= TARGET_RSS_DELTA_MB,
                    f"+{o.rss_delta_mb:.1f} MB vs {s.rss_baseline} (<= 20)",
                )


def table(outcomes: Sequence[Outcome]) -> str:
    head = (
        "| scenario | tasks | threads | tasks/min | bound/min (term) | ratio "
        "| server-time bound/min | ratio to it "
        "| raw-client bound/min | ratio to it | steady/min | max in-flight | AC conns "
        "| peak RSS MB | CPU ms/task busy window | CPU ms/task whole process "
        "| first get-task s | fetch ms | upload ms |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for o in outcomes:
        rss = f"{o.peak_rss_mb:.1f}"
        raw_ratio = o.tasks_per_min / o.raw_ac_bound_per_min if o.raw_ac_bound_per_min else 0.0
        if o.rss_delta_mb is not None:
            rss += f" (+{o.rss_delta_mb:.1f})"
        rows.append(
            f"| {o.scenario} | {o.tasks} | {o.threads} | {o.tasks_per_min:.0f} "
            f"| {o.bound_per_min:.0f} ({o.bound_used}) | {o.ratio:.0%} "
            f"| {o.server_bound_per_min:.0f} | {o.server_ratio:.1%} "
            f"| {o.raw_ac_bound_per_min:.0f} | {raw_ratio:.0%} "
            f"| {o.steady_tasks_per_min:.0f} | {o.max_inflight} | {o.ac_connections} | {rss} "
            f"| {o.cpu_ms_per_task:.2f} | {o.process_cpu_ms_per_task:.2f} "
            f"| {o.first_get_task_s:.2f} "
            f"| {o.fetch_cycle_ms:.1f} | {o.upload_cycle_ms:.1f} |"
        )
    return "\n".join(rows)


def machine() -> Dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def _compile_agent(agent_env: Dict[str, str]) -> None:
    """Compile the agent's package to bytecode, as ``pip install`` does.

    A checkout (an editable install) has no bytecode until the first import
    writes it, and none at all under PYTHONDONTWRITEBYTECODE=1: every agent
    start would then count compiling the package as its start-up CPU, which
    an installed agent never pays.
    """
    code = (
        "import acagent, compileall, os, sys; where = os.path.dirname(acagent.__file__); "
        "print('agent package (compiled to bytecode):', where); "
        "sys.exit(0 if compileall.compile_dir(where, quiet=1) else 1)"
    )
    env = dict(os.environ, **agent_env)
    # Not from this folder: a checkout here would win over --agent-env PYTHONPATH,
    # as it does not for the agent, which runs in a temporary folder.
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(), timeout=120, check=False
    )
    if done.returncode != 0:
        raise SystemExit("could not compile the agent package to bytecode")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI run (scenario 'short')")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*sorted(SCENARIOS), "idle"],
        help="run only this scenario (repeatable); default: every full scenario",
    )
    parser.add_argument(
        "--reference", action="store_true", help="the reference table: scenarios a..d and idle"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--tasks", type=int, help="override the task count")
    parser.add_argument("--threads", type=int, help="override the executor thread count")
    parser.add_argument("--prefetch", type=int, help="pass --prefetch N to the agent")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--profile", metavar="DIR", help="py-spy raw profiles of the agent")
    parser.add_argument(
        "--profile-args",
        metavar="ARGS",
        help="py-spy record options instead of the default '--gil' (e.g. '--idle')",
    )
    parser.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the agent process (repeatable)",
    )
    parser.add_argument("--check-targets", action="store_true", help="exit 3 if a target is missed")
    parser.add_argument(
        "--off",
        action="append",
        default=[],
        choices=mechanisms.MECHANISMS,
        help="benchmark switch: run the agent with this mechanism patched out (repeatable;"
        " see mechanisms.py)",
    )
    parser.add_argument(
        "--probe",
        metavar="PREFIX",
        help="the agent writes what each mechanism did to PREFIX.<pid>.json (costs CPU)",
    )
    args = parser.parse_args(argv)
    names = ["short"] if args.short else (REFERENCE if args.reference else args.scenario or FULL)
    agent_env = dict(e.split("=", 1) for e in args.agent_env)
    _compile_agent(agent_env)
    if args.off or args.probe:
        agent_env = mechanisms.agent_env(args.off, agent_env, probe=args.probe)
        print(f"mechanisms off: {', '.join(sorted(set(args.off))) or 'none'}", flush=True)
    idle: Optional[Dict[str, Any]] = None
    outcomes: List[Outcome] = []
    by_name: Dict[str, Outcome] = {}
    failed = False
    print(f"machine: {json.dumps(machine())}", flush=True)
    for name in names:
        if name == "idle":
            print(f"--- idle: no tasks, --pollInterval 1, {args.idle_seconds:.0f} s", flush=True)
            idle = run_idle(args.idle_seconds)
            print(
                f"    idle: {idle['cpu_pct_of_core']:.2f}% of one core, {idle['polls']} polls,"
                f" RSS {idle['rss_start_mb']:.1f} -> {idle['rss_end_mb']:.1f} MB"
                f" ({idle['rss_growth_mb']:+.2f}), exit {idle['exit_code']};"
                f" target {idle['target']}",
                flush=True,
            )
            if idle["exit_code"] != 0:
                failed = True
            continue
        s = SCENARIOS[name]
        if args.tasks is not None:
            s.tasks = args.tasks
        if args.threads is not None:
            s.threads = args.threads
        if args.prefetch is not None:
            s.prefetch = args.prefetch
        print(f"--- {name}: {s.description}", flush=True)
        try:
            o = run_scenario(
                s,
                profile_dir=args.profile,
                profile_args=(args.profile_args or "").split(),
                agent_env=list(agent_env.items()),
            )
        except BenchFailure as exc:
            print(f"FAILED: {exc}", file=sys.stderr, flush=True)
            failed = True
            continue
        base = by_name.get(s.rss_baseline or "")
        if base is not None:
            o.rss_delta_mb = o.peak_rss_mb - base.peak_rss_mb
        check_targets(s, o)
        outcomes.append(o)
        by_name[name] = o
        print(
            f"    {o.verified}/{o.tasks} verified ({o.vias}), exit {o.exit_code} "
            f"after SIGTERM in {o.stop_s:.2f}s, {o.tasks_per_min:.0f}/min, "
            f"cpu {o.cpu_ms_per_task:.2f} ms/task busy window ({o.sys_cpu_ms_per_task:.2f} system),"
            f" {o.process_cpu_ms_per_task:.2f} ms/task whole process, startup cpu {o.startup_cpu_ms:.0f} ms, "
            f"server cpu {o.server_cpu_ms_per_task:.2f} ms/task, {o.duration_s:.1f}s, "
            f"get-task {o.fetch_server_ms:.1f} ms at server + {o.fetch_gap_ms:.1f} ms gap, "
            f"AC requests open 0/1/2: {'/'.join(f'{x:.0%}' for x in o.permits_busy)}, "
            f"{o.empty_get_tasks} empty, load {o.load_before:.1f}->{o.load_after:.1f}",
            flush=True,
        )
        for key, text in o.targets.items():
            print(f"    target {key}: {text}", flush=True)
    if outcomes:
        print()
        print(table(outcomes))
        print()
        for o in outcomes:
            print(f"- {o.scenario}: `{o.command}`")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "machine": machine(),
                    "ok": not failed,
                    "runs": [asdict(o) for o in outcomes],
                    "idle": idle,
                },
                fh,
                indent=2,
            )
    if failed:
        return 1
    missed = any(t.startswith("MISS") for o in outcomes for t in o.targets.values())
    if idle is not None and idle["target"].startswith("MISS"):
        missed = True
    if args.check_targets and missed:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
