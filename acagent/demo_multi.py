"""``python -m acagent demo --agents 3``: several agents share one AC budget.

Starts a ``FakeACServer`` that allows 2 concurrent requests (and answers 429
above that), a ``FakeTarget`` and, when ``redis-server`` is on PATH, a private
Redis on 127.0.0.1. Then runs N real agent processes (``python -m acagent
run``) on one API key with ``--coordinationUrl`` pointing at that Redis,
and prints the server-side highest in-flight count, the 429s and the
throughput against the AC bound (permits / calls per task / AC latency).
Without ``redis-server`` the agents run uncoordinated, to show why it is needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence, TextIO

from .testing import FakeACServer, FakeTarget

#: AC calls per task: one get-task, one put-result
CALLS_PER_TASK = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A private ``redis-server`` on 127.0.0.1 (no persistence), for demos and tests.

    ``stop()`` and ``start()`` again reuse the same port, so clients see the
    server go away and come back (empty: it keeps no data).
    """

    def __init__(self, port: Optional[int] = None, workdir: Optional[str] = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="acagent-redis-")
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.workdir,
            "--protected-mode", "no",
        ]  # fmt: skip
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed command line
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def agent_command(
    server_url: str,
    spool_dir: str,
    *,
    coordination_url: Optional[str],
    executor_pool_size: int = 10,
    lease: float = 3.0,
    extra: Sequence[str] = (),
) -> List[str]:
    """The command line of one demo agent process."""
    cmd = [
        sys.executable, "-m", "acagent", "run",
        "--serverUrl", server_url,
        "--apiKey", "demo-key",
        "--spoolDir", spool_dir,
        "--executorPoolSize", str(executor_pool_size),
        "--rateLimitPerMin", "0",
        "--pollInterval", "0.05",
        "--enableFileLogging", "false",
        "--metricsFile", "false",
        "--shutdownTimeout", "10",
    ]  # fmt: skip
    if coordination_url:
        cmd += ["--coordinationUrl", coordination_url, "--coordinationLease", str(lease)]
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
    parser = argparse.ArgumentParser(prog="acagent demo --agents N", description=__doc__)
    parser.add_argument("--agents", type=int, default=3, help="agent processes (default 3)")
    parser.add_argument("--tasks", type=int, default=600, help="how many tasks (default 600)")
    parser.add_argument("--acLatency", type=float, default=0.05, help="seconds per AC call")
    parser.add_argument("--targetLatency", type=float, default=0.02, help="seconds per target")
    args = parser.parse_args(list(argv))
    if args.agents < 1 or args.tasks < 1 or args.acLatency <= 0:
        parser.error("--agents and --tasks must be >= 1, --acLatency > 0")
    return args


def main(argv: Sequence[str] = ()) -> int:
    return run_demo(argv, sys.stdout)


def run_demo(argv: Sequence[str], out: TextIO) -> int:
    """The demo, printing to ``out``; 0 when every result arrived once within the limit."""
    args = _parse(argv)
    redis: Optional[LocalRedis] = None
    if shutil.which("redis-server"):
        redis = LocalRedis().start()
    else:
        out.write("redis-server not on PATH: the agents run UNCOORDINATED (expect 429s)\n")
    workdir = tempfile.mkdtemp(prefix="acagent-demo-multi-")
    agents: List[subprocess.Popen[bytes]] = []
    try:
        with FakeTarget() as target, FakeACServer(max_concurrent=2, latency=args.acLatency) as ac:
            for i in range(args.tasks):
                ac.add_task(
                    {
                        "taskId": f"multi-{i:05d}",
                        "method": "GET",
                        "url": f"{target.url}/bytes/1024?seed={i}&latency={args.targetLatency}",
                    }
                )
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            started = time.monotonic()
            for n in range(args.agents):
                cmd = agent_command(
                    ac.url,
                    os.path.join(workdir, f"spool-{n}"),
                    coordination_url=redis.url if redis else None,
                )
                log_file = open(os.path.join(workdir, f"agent-{n}.log"), "wb")
                agents.append(
                    subprocess.Popen(cmd, stdout=log_file, stderr=log_file, env=env)  # noqa: S603
                )
                log_file.close()
            first: Optional[float] = None
            while not ac.wait_for_results(args.tasks, timeout=0.5):
                if first is None and ac.results:
                    first = time.monotonic()
                out.write(
                    f"\r  {len(ac.results)}/{args.tasks} results  "
                    f"AC in flight max={ac.max_inflight}  429s={ac.count_429}  "
                    f"{time.monotonic() - started:5.1f}s"
                )
                out.flush()
                if time.monotonic() - started > 600:
                    out.write("\n  timed out after 600 s\n")
                    break
            elapsed = time.monotonic() - started
            stop_agents(agents)
            out.write("\r" + " " * 78 + "\r")
            done = sum(1 for v in ac.results.values() if len(v) == 1)
            bound = 2 / (CALLS_PER_TASK * args.acLatency)  # tasks per second
            rate = done / elapsed
            ok = done == args.tasks and ac.max_inflight <= 2 and ac.count_429 == 0
            lines = [
                f"acagent demo: {args.agents} agents on one API key",
                f"  coordination           {redis.url if redis else 'none'}",
                f"  results exactly once   {done}/{args.tasks}",
                f"  AC in flight, highest  {ac.max_inflight} (server limit 2, counted server-side)",
                f"  AC 429 replies         {ac.count_429}",
                f"  throughput             {rate * 60:.0f} tasks/min ({elapsed:.1f}s, start-up "
                "included)",
                f"  AC bound               {bound * 60:.0f} tasks/min (2 permits / "
                f"{CALLS_PER_TASK} calls per task / {args.acLatency * 1000:.0f} ms AC latency)",
                f"  share of the bound     {rate / bound:.0%}",
                "  result                 " + ("OK" if ok else "FAILED"),
            ]
            print("\n".join(lines), file=out)
            return 0 if ok else 1
    finally:
        stop_agents(agents)
        if redis is not None:
            redis.close()
        shutil.rmtree(workdir, ignore_errors=True)
