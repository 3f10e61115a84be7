"""A gzip bomb from a target does not blow up the agent's memory.

A target answers ``Content-Encoding: gzip`` with a body of about 130 KB that
expands to 128 MiB. With ``--maxResponseBytes 1000000`` the agent must stop
after about 1 MB of decoded bytes and answer an error result saying the
response was too large, and its peak RSS must stay within 10 MB of a
baseline run whose gzip body expands to only 2 MiB (over the cap as well, so
both runs take the same path).

urllib3 before 2.6 decoded a whole network read at once (CVE-2025-66471): one
256 KiB read of this body became 128 MiB in memory before the agent's cap
could look at it. The agent reads with ``stream(amt)`` and relies on
urllib3 >= 2.6 bounding each decoded piece by ``amt``. CI runs this test in
the minimum-versions env (the lowest urllib3 pyproject.toml allows) and in
the full suite (the newest).

The agent runs as a real CLI subprocess; its peak RSS is the kernel's VmHWM
for that process, read while it is still alive.
"""

from __future__ import annotations

import signal
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import urllib3
from helpers import WAIT, AgentProcess, peak_rss_kb

from acagent.testing import FakeACServer

CAP = 1_000_000
BOMB_EXPANDED = 128 * 1024 * 1024
BASELINE_EXPANDED = 2 * 1024 * 1024
RSS_GROWTH_LIMIT_KB = 10 * 1024


def gzip_of_zeros(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes, compressed 1 MiB at a time."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts: List[bytes] = []
    left = size
    while left > 0:
        n = min(left, len(block))
        parts.append(comp.compress(block[:n]))
        left -= n
    parts.append(comp.flush())
    return b"".join(parts)


class _BombHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection does not hold a thread forever

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, BombServer)
        redirect_to = server.redirects.get(self.path)
        body = server.bodies.get(redirect_to or self.path)
        if body is None:
            self.send_error(404)
            return
        with server.lock:
            server.served.append(self.path)
        if redirect_to is not None:
            # A redirect whose own body is the bomb: a client never needs
            # that body, it only follows Location.
            self.send_response(302)
            self.send_header("Location", "/baseline")
            body = server.bodies["/bomb"]
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent hung up after its cap: that is the point


class BombServer(ThreadingHTTPServer):
    """A target on 127.0.0.1 serving fixed gzip bodies by path."""

    daemon_threads = True

    def __init__(self, bodies: Dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _BombHandler)
        self.bodies = bodies
        # path -> the body its 302 reply carries; Location is always /baseline
        self.redirects = {"/redirect-bomb": "/bomb"}
        self.served: List[str] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="gzip-bomb-target"
        )
        self._connections: List[threading.Thread] = []

    def process_request(self, request: Any, client_address: Any) -> None:
        # One named thread per connection, joined on exit.
        conn = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="gzip-bomb-conn",
            daemon=True,
        )
        with self.lock:
            self._connections.append(conn)
        conn.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> BombServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(10)
        assert not self._thread.is_alive()
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            conn.join(_BombHandler.timeout + 5)  # an idle keep-alive ends at the handler timeout
            assert not conn.is_alive()


@pytest.fixture(scope="module")
def bodies() -> Dict[str, bytes]:
    return {"/bomb": gzip_of_zeros(BOMB_EXPANDED), "/baseline": gzip_of_zeros(BASELINE_EXPANDED)}


@pytest.fixture
def target(bodies: Dict[str, bytes]) -> Iterator[BombServer]:
    with BombServer(bodies) as server:
        yield server


def run_agent_once(target: BombServer, path: str, tmp: Path) -> Tuple[int, str, str]:
    """One CLI agent, one task against ``path``: (peak RSS kB, result output, via)."""
    spool = tmp / "spool"
    spool.mkdir(parents=True)
    with FakeACServer() as ac:
        ac.add_task({"taskId": "t", "method": "GET", "url": target.url + path})
        with AgentProcess(
            ac.url,
            spool,
            tmp / "agent.log",
            ["--maxResponseBytes", str(CAP), "--executorPoolSize", "2"],
        ) as agent:
            assert ac.wait_for_results(1, WAIT), agent.output()
            peak = peak_rss_kb(agent.pid)
            agent.signal(signal.SIGTERM)
            assert agent.wait(WAIT) == 0, agent.output()
        got = ac.results["t"]
        assert len(got) == 1
        return peak, str(got[0].fields.get("output")), got[0].via


def test_gzip_bomb_stays_within_10_mb_of_baseline_and_answers_too_large(
    target: BombServer, bodies: Dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = bodies["/bomb"]
    # A small body that expands at least a hundredfold past the 100 MB mark.
    assert len(bomb) < 1_000_000 and BOMB_EXPANDED >= 100 * 1024 * 1024
    assert len(zlib.decompress(bomb, 31)) == BOMB_EXPANDED

    base_rss, base_output, base_via = run_agent_once(target, "/baseline", tmp_path / "baseline")
    bomb_rss, bomb_output, bomb_via = run_agent_once(target, "/bomb", tmp_path / "bomb")
    assert target.served == ["/baseline", "/bomb"]

    with capsys.disabled():
        print(
            f"\ngzip bomb ({len(bomb)} B -> {BOMB_EXPANDED} B, urllib3 {urllib3.__version__}): "
            f"agent peak RSS {bomb_rss / 1024:.1f} MB, baseline {base_rss / 1024:.1f} MB, "
            f"growth {(bomb_rss - base_rss) / 1024:+.1f} MB"
        )
    for via, output in ((base_via, base_output), (bomb_via, bomb_output)):
        assert via == "error", output[:200]
        assert output == f"Agent Side Error: response larger than {CAP} bytes", output[:200]
    assert bomb_rss - base_rss <= RSS_GROWTH_LIMIT_KB, (bomb_rss, base_rss)


def test_gzip_bomb_in_a_redirect_reply_stays_within_10_mb_of_baseline(
    target: BombServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_rss, _, _ = run_agent_once(target, "/baseline", tmp_path / "baseline")
    bomb_rss, output, via = run_agent_once(target, "/redirect-bomb", tmp_path / "redirect")
    assert target.served == ["/baseline", "/redirect-bomb", "/baseline"]
    with capsys.disabled():
        print(
            f"\ngzip bomb in a 302 reply (urllib3 {urllib3.__version__}): agent peak RSS "
            f"{bomb_rss / 1024:.1f} MB, baseline {base_rss / 1024:.1f} MB, "
            f"growth {(bomb_rss - base_rss) / 1024:+.1f} MB"
        )
    # The redirect is followed to /baseline, which is over the cap as well.
    assert via == "error" and output == f"Agent Side Error: response larger than {CAP} bytes"
    assert bomb_rss - base_rss <= RSS_GROWTH_LIMIT_KB, (bomb_rss, base_rss)
