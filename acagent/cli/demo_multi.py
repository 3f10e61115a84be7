"""``python -m acagent demo --agents 3``: several agents share one AC budget.

Starts a ``FakeACServer`` that allows 2 concurrent requests (and answers 429
above that), a ``FakeTarget`` and, when ``redis-server`` is on PATH or the
test extra bundles one (``acagent.testing.find_redis_server``), a private
Redis on 127.0.0.1. Then runs N real agent processes (``python -m acagent
run``) on one API key with ``--coordinationUrl`` pointing at that Redis,
and prints the server-side highest in-flight count, the 429s and the
throughput against the AC bound (permits / calls per task / AC latency).
Without ``redis-server`` the agents run uncoordinated, to show why it is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from ..testing import FakeACServer, FakeTarget, LocalRedis, find_redis_server
from .demo import PLAIN_PROGRESS_EVERY, Progress, default_limit_note, settings_notice
from .options import DEMO_AGENTS_DESCRIPTION, FLAG_OF_FIELD

#: AC calls per task: one get-task, one put-result
CALLS_PER_TASK = 2

#: seconds a killed demo agent's shared permit comes back after (short, to show it)
DEMO_LEASE = 3.0


def agent_settings(
    executor_pool_size: int = 10, lease: Optional[float] = DEMO_LEASE
) -> Dict[str, Any]:
    """The AgentConfig fields every demo agent sets, beyond its server, key and spool
    (``lease``: the coordination lease of coordinated agents, None without Redis)."""
    settings: Dict[str, Any] = {
        "executor_pool_size": executor_pool_size,
        "rate_limit_per_min": 0,
        "poll_interval": 0.05,
        "enable_file_logging": False,
        "enable_metrics_file": False,
        "shutdown_timeout": 10.0,
    }
    if lease is not None:
        settings["coordination_lease"] = lease
    return settings


def agent_command(
    server_url: str,
    spool_dir: str,
    *,
    coordination_url: Optional[str],
    executor_pool_size: int = 10,
    lease: float = DEMO_LEASE,
    extra: Sequence[str] = (),
) -> List[str]:
    """The command line of one demo agent process."""
    cmd = [
        sys.executable, "-m", "acagent", "run",
        "--serverUrl", server_url,
        "--apiKey", "demo-key",
        "--spoolDir", spool_dir,
    ]  # fmt: skip
    settings = agent_settings(executor_pool_size, lease if coordination_url else None)
    for name, value in settings.items():
        cmd += [FLAG_OF_FIELD[name], str(value).lower() if isinstance(value, bool) else str(value)]
    if coordination_url:
        cmd += ["--coordinationUrl", coordination_url]
    return cmd + list(extra)


def stop_agents(agents: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    for proc in agents:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in agents:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="acagent demo --agents N", description=DEMO_AGENTS_DESCRIPTION
    )
    parser.add_argument(
        "--agents", type=int, default=3, metavar="N", help="agent processes (default 3)"
    )
    parser.add_argument(
        "--tasks", type=int, default=600, metavar="N", help="how many tasks (default 600)"
    )
    parser.add_argument(
        "--acLatency",
        type=float,
        default=0.05,
        metavar="SECONDS",
        help="seconds per AC call (default 0.05)",
    )
    parser.add_argument(
        "--targetLatency",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="seconds per target call (default 0.02)",
    )
    args = parser.parse_args(list(argv))
    if args.agents < 1 or args.tasks < 1 or args.acLatency <= 0:
        parser.error("--agents and --tasks must be >= 1, --acLatency > 0")
    return args


def main(argv: Sequence[str] = ()) -> int:
    return run_demo(argv, sys.stdout)


@dataclass
class MultiAgentRun:
    """Figures of one run of several agents against the fake AC server."""

    agents: int
    tasks: int
    coordinated: bool
    ac_latency: float
    delivered_once: int
    max_inflight: int
    count_429: int
    elapsed: float
    #: seconds from the first result to the last (start-up excluded)
    steady: float
    #: AC requests the server counted from the first result on
    ac_requests: int = 0
    #: Redis round trips meanwhile (the commands agents send: scripts, BLPOP,
    #: PING, ZCOUNT); None uncoordinated
    redis_round_trips: Optional[int] = None
    #: every command Redis ran meanwhile, those inside the scripts too
    redis_commands: Optional[int] = None
    #: CPU seconds (user + system) the agent processes used, when known
    agent_cpu: Optional[float] = None
    #: CPU seconds of this process meanwhile: the fake AC server and target
    server_cpu: float = 0.0

    @property
    def bound_per_min(self) -> float:
        """The AC bound: permits / calls per task / AC latency."""
        return 2 / (CALLS_PER_TASK * self.ac_latency) * 60

    @property
    def steady_per_min(self) -> float:
        return (self.tasks - 1) / self.steady * 60 if self.steady > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.delivered_once == self.tasks and self.max_inflight <= 2 and self.count_429 == 0


def _ac_requests(ac: FakeACServer) -> int:
    return sum(1 for r in ac.requests if r.endpoint != "s3")


#: the commands agents send themselves (the others run inside the scripts)
_ROUND_TRIPS = (
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "script|load",
    "blpop",
    "ping",
    "zcount",
)


def _redis_calls(server: Optional[LocalRedis]) -> Optional[Tuple[int, int]]:
    """(round trips, commands) the Redis server ran so far (``INFO commandstats``;
    INFO itself and connection set-up left out)."""
    if server is None:
        return None
    import redis

    client = redis.Redis.from_url(server.url, socket_timeout=5.0)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = {
        name[len("cmdstat_") :]: int(v["calls"]) for name, v in stats.items() if isinstance(v, dict)
    }
    setup = ("info", "hello", "client|setinfo", "client")
    return (
        sum(calls.get(name, 0) for name in _ROUND_TRIPS),
        sum(n for name, n in calls.items() if name not in setup),
    )


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of a running process (Linux ``/proc``), else None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def add_tasks(
    ac: FakeACServer, target: FakeTarget, tasks: int, prefix: str, target_latency: float
) -> None:
    """Queue ``tasks`` GETs of 1 KB bodies (``target_latency`` each) at the fake server."""
    for i in range(tasks):
        ac.add_task(
            {
                "taskId": f"{prefix}-{i:05d}",
                "method": "GET",
                "url": f"{target.url}/bytes/1024?seed={i}&latency={target_latency}",
            }
        )


def run_agents(
    agents: int,
    tasks: int,
    *,
    ac_latency: float,
    target_latency: float = 0.02,
    coordinated: bool = True,
    out: Optional[TextIO] = None,
    timeout: float = 600.0,
    on_start: Optional[Callable[[FakeACServer], None]] = None,
    extra: Sequence[str] = (),
) -> MultiAgentRun:
    """Run ``agents`` agent processes on one key until ``tasks`` results arrived
    (``on_start``: told the server once the agents are started, e.g. to change
    its limit while they run; ``extra``: more flags for every agent)."""
    redis: Optional[LocalRedis] = LocalRedis().start() if coordinated else None
    workdir = tempfile.mkdtemp(prefix="acagent-demo-multi-")
    procs: List[subprocess.Popen[bytes]] = []
    try:
        with FakeTarget() as target, FakeACServer(max_concurrent=2, latency=ac_latency) as ac:
            add_tasks(ac, target, tasks, "multi", target_latency)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            started = time.monotonic()
            cpu_started = time.process_time()
            for n in range(agents):
                cmd = agent_command(
                    ac.url,
                    os.path.join(workdir, f"spool-{n}"),
                    coordination_url=redis.url if redis else None,
                    extra=extra,
                )
                log_file = open(os.path.join(workdir, f"agent-{n}.log"), "wb")
                procs.append(
                    subprocess.Popen(cmd, stdout=log_file, stderr=log_file, env=env)  # noqa: S603
                )
                log_file.close()
            if on_start is not None:
                on_start(ac)
            progress = Progress(out, PLAIN_PROGRESS_EVERY) if out is not None else None
            # Redis commands and AC requests are counted from the first result on
            # (the start-up, a fresh Redis's grace period, left out).
            ac.wait_for_results(1, timeout=timeout)
            first_ac = _ac_requests(ac)
            first_redis = _redis_calls(redis)
            while not ac.wait_for_results(tasks, timeout=0.5):
                if progress is not None:
                    progress.show(
                        f"  {len(ac.results)}/{tasks} results  "
                        f"AC in flight max={ac.max_inflight}  429s={ac.count_429}  "
                        f"{time.monotonic() - started:5.1f}s"
                    )
                if time.monotonic() - started > timeout:
                    break
            elapsed = time.monotonic() - started
            last_ac = _ac_requests(ac)
            last_redis = _redis_calls(redis)
            cpu = [_cpu_seconds(proc.pid) for proc in procs]
            server_cpu = time.process_time() - cpu_started
            stop_agents(procs)
            if progress is not None:
                progress.done()
            received = sorted(r.received for r in ac.all_results())
            return MultiAgentRun(
                agents=agents,
                tasks=tasks,
                coordinated=redis is not None,
                ac_latency=ac_latency,
                delivered_once=sum(1 for v in ac.results.values() if len(v) == 1),
                max_inflight=ac.max_inflight,
                count_429=ac.count_429,
                elapsed=elapsed,
                steady=received[-1] - received[0] if len(received) > 1 else 0.0,
                ac_requests=last_ac - first_ac,
                redis_round_trips=(
                    None
                    if first_redis is None or last_redis is None
                    else last_redis[0] - first_redis[0]
                ),
                redis_commands=(
                    None
                    if first_redis is None or last_redis is None
                    else last_redis[1] - first_redis[1]
                ),
                agent_cpu=None if None in cpu else sum(c for c in cpu if c is not None),
                server_cpu=server_cpu,
            )
    finally:
        stop_agents(procs)
        if redis is not None:
            redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_demo(argv: Sequence[str], out: TextIO) -> int:
    """The demo, printing to ``out``; 0 when every result arrived once within the limit."""
    args = _parse(argv)
    coordinated = find_redis_server() is not None
    if not coordinated:
        out.write("no redis-server (none on PATH, none bundled by the test extra): ")
        out.write("the agents run UNCOORDINATED (expect 429s)\n")
    elif importlib.util.find_spec("redis") is None:
        coordinated = False
        out.write("the redis package is missing (pip install 'acagent[redis]'): the agents run ")
        out.write("UNCOORDINATED (expect 429s)\n")
    out.write(
        f"acagent demo: {args.agents} agent processes on one API key, {args.tasks} tasks, "
        f"against a fake AC server (2 requests at once) on 127.0.0.1\n"
    )
    out.write(
        settings_notice(agent_settings(lease=DEMO_LEASE if coordinated else None), coordinated)
    )
    out.flush()
    run = run_agents(
        args.agents,
        args.tasks,
        ac_latency=args.acLatency,
        target_latency=args.targetLatency,
        coordinated=coordinated,
        out=out,
    )
    lines = [
        f"acagent demo: {run.agents} agents on one API key",
        f"  coordination           {'a private redis-server' if coordinated else 'none'}",
        f"  results exactly once   {run.delivered_once}/{run.tasks}",
        f"  AC in flight, highest  {run.max_inflight} (server limit 2, counted server-side)",
        f"  AC 429 replies         {run.count_429}",
        f"  throughput             {run.steady_per_min:.0f} tasks/min from first to last result "
        f"({run.elapsed:.1f}s in all, start-up included)"
        + default_limit_note(agent_settings()["rate_limit_per_min"]),
        f"  AC bound               {run.bound_per_min:.0f} tasks/min (2 permits / "
        f"{CALLS_PER_TASK} calls per task / {run.ac_latency * 1000:.0f} ms AC latency)",
        f"  share of the bound     {run.steady_per_min / run.bound_per_min:.0%}",
        "  result                 " + ("OK" if run.ok else "FAILED"),
    ]
    print("\n".join(lines), file=out)
    return 0 if run.ok else 1
