"""The target policy against a corpus of URL tricks, through the real Executor path.

A "denied" plain TCP listener on 127.0.0.1 counts every connection it
accepts; the "allowed" HTTP server listens on 127.0.0.2 on the *same port*,
so any confusion about the host (two parsers, numeric forms, names,
redirects) lands on the denied listener. Every trick must end in an error
result with 0 connections to the denied listener; the controls succeed.
The corpus grows with every report: add the URL, not a new test.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from helpers import WAIT, make_config, make_pipeline, running

from acagent.testing import FakeACServer

ALLOWED_BODY = b"allowed"
PROXY_BODY = b"via-proxy"


class CountingListener:
    """A plain TCP listener that counts accepted connections and closes each one."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, port))  # raises if taken: the caller picks another port
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="denied-listener", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self._accepted += 1
            conn.close()

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        self.sock.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: RecordingServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _reply(self, status: int, body: bytes, location: Optional[str] = None) -> None:
        self.send_response(status)
        if location is not None:
            # raw bytes: a trick may hold characters Latin-1 cannot carry
            self._headers_buffer.append(b"Location: " + location.encode("utf-8") + b"\r\n")  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.record(self.command, self.path, dict(self.headers.items()))
        if self.server.proxy:
            self._reply(200, PROXY_BODY)
            return
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/ok":
            self._reply(200, ALLOWED_BODY)
        elif parts.path == "/redirect":
            self._reply(int(query.get("code", "302")), b"", location=query["to"])
        elif parts.path == "/echo":
            self._reply(200, json.dumps(dict(self.headers.items())).encode())
        else:
            self._reply(404, b"no such route")

    do_GET = do_POST = do_PUT = do_HEAD = _handle


class RecordingServer(ThreadingHTTPServer):
    """A small HTTP server on a chosen loopback address that records every request."""

    daemon_threads = True

    def __init__(self, host: str, port: int = 0, *, proxy: bool = False) -> None:
        super().__init__((host, port), _Handler)
        self.proxy = proxy
        self.seen: List[Tuple[str, str, Dict[str, str]]] = []
        self._seen_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"server-{host}"
        )
        self._thread.start()

    def record(self, method: str, path: str, headers: Dict[str, str]) -> None:
        with self._seen_lock:
            self.seen.append((method, path, headers))

    def requests_to(self, path: str) -> List[Tuple[str, str, Dict[str, str]]]:
        with self._seen_lock:
            return [r for r in self.seen if urlsplit(r[1]).path == path]

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def servers() -> Iterator[Tuple[RecordingServer, CountingListener]]:
    """The allowed server on 127.0.0.2:P and the denied listener on 127.0.0.1:P."""
    for _ in range(50):
        allowed = RecordingServer("127.0.0.2")
        try:
            denied = CountingListener("127.0.0.1", allowed.port)
        except OSError:  # that port is taken on 127.0.0.1: try another
            allowed.close()
            continue
        try:
            yield allowed, denied
        finally:
            denied.close()
            allowed.close()
        return
    pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")


def tricks(port: int) -> List[Tuple[str, str]]:
    """(name, url) of direct attempts on the denied listener 127.0.0.1:<port>."""
    d = f"127.0.0.1:{port}"
    return [
        ("backslash", f"http://127.0.0.1:{port}\\@allowed.example/../x"),
        ("backslash-allowed-ip", f"http://127.0.0.1:{port}\\@127.0.0.2:{port}/ok"),
        ("backslash-reversed", f"http://allowed.example\\@{d}/"),
        ("userinfo", f"http://allowed.example@{d}/"),
        ("userinfo-port", f"http://allowed.example:80@{d}/"),
        ("userinfo-allowed-ip", f"http://127.0.0.2:{port}@{d}/ok"),
        ("double-at", f"http://allowed.example@127.0.0.2@{d}/"),
        ("fragment", f"http://{d}#@allowed.example/"),
        ("query", f"http://{d}?@allowed.example/"),
        ("encoded-slash", f"http://allowed.example%2f@{d}/"),
        ("encoded-host", f"http://%31%32%37.0.0.1:{port}/"),
        ("encoded-at", f"http://allowed.example%40{d}/"),
        ("decimal", f"http://2130706433:{port}/"),
        ("hex", f"http://0x7f000001:{port}/"),
        ("hex-dotted", f"http://0x7f.0.0.1:{port}/"),
        ("octal", f"http://0177.0.0.1:{port}/"),
        ("short", f"http://127.1:{port}/"),
        ("trailing-dot", f"http://127.0.0.1.:{port}/"),
        ("fullwidth-dots", f"http://127\u30020\u30020\u30021:{port}/"),
        ("ipv6-mapped", f"http://[::ffff:127.0.0.1]:{port}/"),
        ("ipv6-mapped-hex", f"http://[::ffff:7f00:1]:{port}/"),
        ("ipv6-compatible", f"http://[::127.0.0.1]:{port}/"),
        ("ipv6-loopback", f"http://[::1]:{port}/"),
        ("localhost", f"http://localhost:{port}/"),
        ("localhost-mixed-case-dot", f"http://LocalHost.:{port}/"),
        ("mixed-case-scheme", f"HtTp://{d}/"),
        ("https-scheme", f"hTTpS://{d}/"),
        ("subdomain-lookalike", f"http://allowed.example.localhost:{port}/"),
        ("suffix-lookalike", f"http://evilallowed.example:{port}/"),
        ("tab-in-host", f"http://127.0.0.1\t:{port}/"),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("metadata-decimal", "http://2852039166/latest/meta-data/"),
        ("metadata-ipv6", "http://[fd00:ec2::254]/latest/meta-data/"),
    ]


def _redirect(base: str, to: str, code: int = 302) -> str:
    return f"{base}/redirect?code={code}&to={quote(to, safe='')}"


def corpus(port: int) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(tricks, controls): every direct trick, each again behind a redirect, and chains."""
    allowed = f"http://127.0.0.2:{port}"
    direct = tricks(port)
    items = list(direct)
    items += [
        (f"redirect-{name}", _redirect(allowed, url))
        for name, url in direct
        if name != "backslash-allowed-ip"  # see the control below
    ]
    d = f"127.0.0.1:{port}"
    items += [
        ("redirect-chain", _redirect(allowed, _redirect(allowed, f"http://{d}/"))),
        ("redirect-chain-backslash", _redirect(allowed, _redirect(allowed, direct[0][1]))),
        ("redirect-307", _redirect(allowed, f"http://{d}/", 307)),
        ("redirect-308", _redirect(allowed, f"http://{d}/", 308)),
        ("redirect-301", _redirect(allowed, f"http://{d}/", 301)),
        ("redirect-protocol-relative", _redirect(allowed, f"//{d}/")),
    ]
    controls = [
        ("ok-direct", f"{allowed}/ok"),
        ("ok-mixed-case", f"HTTP://127.0.0.2:{port}/ok"),
        ("ok-redirect", _redirect(allowed, f"{allowed}/ok")),
        ("ok-chain", _redirect(allowed, _redirect(allowed, f"{allowed}/ok"))),
        # a name that resolves into an allowed network is allowed (CIDR entries
        # match the address connected to)
        ("ok-decimal-name", f"http://2130706434:{port}/ok"),
        # requests re-quotes a Location's backslash (%5C): both parsers then
        # read userinfo "127.0.0.1:P%5C" and host 127.0.0.2, where it goes
        ("ok-redirect-backslash-requoted", _redirect(allowed, direct[1][1])),
    ]
    # A Location of "\\\\127.0.0.1:P/" is a relative path to requests (browsers
    # read it as "//"): it stays on the allowed host, which answers 404.
    controls.append(("stays-relative-backslash", _redirect(allowed, f"\\\\{d}/")))
    return items, controls


def _run(
    tmp_path: Path, tasks: List[Tuple[str, str]], method: str = "GET", **config: Any
) -> Dict[str, Any]:
    with FakeACServer() as ac:
        ac.add_tasks(
            [
                {
                    "taskId": name,
                    "method": method,
                    "url": url,
                    "requestHeaders": {"Authorization": "Bearer t0p"},
                }
                for name, url in tasks
            ]
        )
        cfg = make_config(
            ac.url,
            tmp_path / "spool",
            executor_pool_size=4,
            connect_timeout=3.0,
            timeout=5.0,
            **config,
        )
        with running(make_pipeline(cfg)):
            assert ac.wait_for_results(len(tasks), WAIT), sorted(ac.results)
        return {name: got[0] for name, got in ac.results.items()}


def _assert_refused(results: Dict[str, Any], names: List[str]) -> None:
    for name in names:
        got = results[name]
        assert got.via == "error", (name, got.fields)
        assert got.fields["statusCode"] == 500, name
        assert got.fields["output"].startswith("Agent Side Error: "), name
        assert not got.body, name


def _assert_allowed(results: Dict[str, Any], names: List[str], body: bytes = ALLOWED_BODY) -> None:
    for name in names:
        got = results[name]
        assert got.fields["statusCode"] == 200, (name, got.fields)
        assert got.body == body, name


def test_corpus_reaches_nothing_outside_the_allow_list(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    allowed, denied = servers
    items, controls = corpus(allowed.port)
    assert len(items) >= 60
    results = _run(
        tmp_path,
        items + controls,
        allowed_targets=("127.0.0.2", "allowed.example", "*.allowed.example"),
    )
    assert denied.accepted == 0
    _assert_refused(results, [name for name, _ in items])
    _assert_allowed(results, [name for name, _ in controls if name.startswith("ok-")])
    assert results["stays-relative-backslash"].fields["statusCode"] == 404
    assert allowed.requests_to("/%5C%5C127.0.0.1:" + str(allowed.port) + "/")
    outputs = {name: results[name].fields["output"] for name, _ in items}
    # the policy, not a network accident, refused the main tricks
    for name in ("backslash", "backslash-allowed-ip", "decimal", "ipv6-mapped", "localhost"):
        assert "allow-list" in outputs[name] or "invalid url" in outputs[name], outputs[name]
    assert outputs["metadata"].endswith(
        "target address is denied: 169.254.169.254 (169.254.169.254)"
    )
    assert "redirect to a host outside the allow-list: 127.0.0.1" in outputs["redirect-chain"]


def test_deny_list_checks_the_resolved_address_of_a_name_allowed_by_name(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    allowed, denied = servers
    port = allowed.port
    base = f"http://127.0.0.2:{port}"
    tasks = [
        ("by-name", f"http://localhost:{port}/"),
        ("by-name-redirect", _redirect(base, f"http://localhost:{port}/")),
        ("ok-direct", f"{base}/ok"),
    ]
    results = _run(
        tmp_path,
        tasks,
        allowed_targets=("localhost", "127.0.0.2"),
        denied_targets=("127.0.0.1", "::1"),
    )
    assert denied.accepted == 0
    _assert_refused(results, ["by-name", "by-name-redirect"])
    assert results["by-name"].fields["output"] == (
        "Agent Side Error: target address is denied: localhost (127.0.0.1)"
    )
    _assert_allowed(results, ["ok-direct"])


def test_deny_list_applies_without_an_allow_list(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    allowed, denied = servers
    port = allowed.port
    tasks = [
        ("decimal", f"http://2130706433:{port}/"),
        ("localhost", f"http://localhost:{port}/"),
        ("mapped", f"http://[::ffff:127.0.0.1]:{port}/"),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("metadata-hex", "http://0xa9fea9fe/latest/meta-data/"),
        ("ok-direct", f"http://127.0.0.2:{port}/ok"),
    ]
    results = _run(tmp_path, tasks, denied_targets=("127.0.0.1",))
    assert denied.accepted == 0
    _assert_refused(results, [n for n, _ in tasks if n != "ok-direct"])
    for name in ("decimal", "localhost", "mapped", "metadata-hex"):
        assert "target address is denied" in results[name].fields["output"], name
    _assert_allowed(results, ["ok-direct"])


def test_cidr_entries_match_the_address_connected_to(
    tmp_path: Path,
    servers: Tuple[RecordingServer, CountingListener],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names resolve at connect time; only allowed addresses are connected to."""
    allowed, denied = servers
    port = allowed.port
    real = socket.getaddrinfo
    answers = {
        "inside.test": ["127.0.0.2"],
        "outside.test": ["127.0.0.1"],
        "mixed.test": ["127.0.0.1", "127.0.0.2"],  # the denied address first
    }
    asked: List[str] = []

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.rstrip(".") in answers:
            asked.append(name)
            return [info for ip in answers[name.rstrip(".")] for info in real(ip, *args, **kwargs)]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    tasks = [
        ("inside", f"http://inside.test:{port}/ok"),
        ("outside", f"http://outside.test:{port}/ok"),
        ("mixed", f"http://mixed.test:{port}/ok"),
        ("redirect-outside", _redirect(f"http://127.0.0.2:{port}", f"http://outside.test:{port}/")),
    ]
    results = _run(tmp_path, tasks, allowed_targets=("127.0.0.2/32",))
    assert denied.accepted == 0
    _assert_allowed(results, ["inside", "mixed"])
    _assert_refused(results, ["outside", "redirect-outside"])
    assert results["outside"].fields["output"] == (
        "Agent Side Error: target host not in the allow-list: outside.test resolves to 127.0.0.1"
    )
    assert {"inside.test", "outside.test", "mixed.test"} <= set(asked)


def test_proxied_requests_check_the_target_host(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    """Through an inward proxy the target is checked, not the proxy's address."""
    allowed, denied = servers
    port = allowed.port
    proxy = RecordingServer("127.0.0.3", proxy=True)
    try:
        tasks = [
            ("denied", f"http://127.0.0.1:{port}/"),
            ("backslash", f"http://127.0.0.1:{port}\\@allowed.example/"),
            ("decimal", f"http://2130706433:{port}/"),
            ("ok", f"http://127.0.0.2:{port}/ok"),
        ]
        results = _run(
            tmp_path,
            tasks,
            allowed_targets=("127.0.0.2", "allowed.example"),
            inward_proxy_http=f"http://127.0.0.3:{proxy.port}",
        )
        seen = [path for _m, path, _h in proxy.seen]
    finally:
        proxy.close()
    assert denied.accepted == 0
    _assert_refused(results, ["denied", "backslash", "decimal"])
    _assert_allowed(results, ["ok"], body=PROXY_BODY)
    assert seen == [f"http://127.0.0.2:{port}/ok"]  # the proxy saw the allowed request only


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    allowed, denied = servers
    other = RecordingServer("127.0.0.3")
    try:
        front = f"http://127.0.0.2:{allowed.port}"
        away = f"http://127.0.0.3:{other.port}"
        headers = {
            "Authorization": "Bearer a-secret",
            "Proxy-Authorization": "Basic cHJveHk=",
            "Cookie": "sid=s3ss10n",
            "X-Api-Key": "k-123",
            "PRIVATE-TOKEN": "glpat-xyz",
            "X-Auth-Token": "t-456",
            "X-Tenant-Signature": "sig-789",  # listed with --sensitiveHeaders
            "X-Trace": "keep-me",
            "Accept": "application/json",
        }
        with FakeACServer() as ac:
            ac.add_tasks(
                [
                    {
                        "taskId": "cross",
                        "method": "GET",
                        "url": _redirect(front, f"{away}/echo"),
                        "requestHeaders": headers,
                    },
                    {
                        "taskId": "same",
                        "method": "GET",
                        "url": _redirect(front, f"{front}/echo"),
                        "requestHeaders": headers,
                    },
                    {
                        # the Checkmarx quirk still applies on a redirected token call
                        "taskId": "checkmarx",
                        "method": "POST",
                        "url": f"{front}/cxrestapi/auth/identity/connect/token",
                        "input": "grant_type=password",
                    },
                ]
            )
            cfg = make_config(
                ac.url,
                tmp_path / "spool",
                allowed_targets=("127.0.0.2", "127.0.0.3"),
                sensitive_headers=("X-Tenant-Signature",),
            )
            with running(make_pipeline(cfg)):
                assert ac.wait_for_results(3, WAIT)
            results = {name: got[0] for name, got in ac.results.items()}
        ((_m, _p, at_other),) = other.requests_to("/echo")
        at_front = [h for _m, _p, h in allowed.requests_to("/echo")]
        (token_call,) = allowed.requests_to("/cxrestapi/auth/identity/connect/token")
    finally:
        other.close()
    assert results["cross"].fields["statusCode"] == 200
    lowered = {k.lower(): v for k, v in at_other.items()}
    for name in headers:
        if name in ("X-Trace", "Accept"):
            assert lowered[name.lower()] == headers[name], name
        else:
            assert name.lower() not in lowered, (name, at_other)
    assert lowered["host"] == f"127.0.0.3:{other.port}"
    # a same-origin hop keeps them (Cookie aside: requests re-derives it on every hop)
    (same,) = at_front
    kept = {k.lower(): v for k, v in same.items()}
    for name in (
        "Authorization",
        "X-Api-Key",
        "PRIVATE-TOKEN",
        "X-Auth-Token",
        "X-Tenant-Signature",
    ):
        assert kept[name.lower()] == headers[name], name
    assert token_call[2]["Content-Type"] == "application/x-www-form-urlencoded"
    assert results["checkmarx"].fields["statusCode"] == 404  # the route is not served; it arrived
    assert denied.accepted == 0


def test_host_header_must_name_the_url_host(
    tmp_path: Path, servers: Tuple[RecordingServer, CountingListener]
) -> None:
    allowed, denied = servers
    port = allowed.port
    base = f"http://127.0.0.2:{port}"
    with FakeACServer() as ac:
        ac.add_tasks(
            [
                {"taskId": t, "method": "GET", "url": f"{base}/echo", "requestHeaders": {"Host": h}}
                for t, h in (
                    ("same", f"127.0.0.2:{port}"),
                    ("listed", "jira.allowed.example"),
                    ("other", "internal.corp"),
                    ("other-ip", f"127.0.0.1:{port}"),
                )
            ]
        )
        cfg = make_config(
            ac.url, tmp_path / "spool", allowed_targets=("127.0.0.2", "*.allowed.example")
        )
        with running(make_pipeline(cfg)):
            assert ac.wait_for_results(4, WAIT)
        results = {name: got[0] for name, got in ac.results.items()}
    assert json.loads(results["same"].body)["Host"] == f"127.0.0.2:{port}"
    assert json.loads(results["listed"].body)["Host"] == "jira.allowed.example"
    for name in ("other", "other-ip"):
        assert results[name].fields["output"] == (
            "Agent Side Error: Host header names another host than the url"
        )
    assert len(allowed.requests_to("/echo")) == 2
    assert denied.accepted == 0


def test_connections_refuse_on_their_own(
    servers: Tuple[RecordingServer, CountingListener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection classes hold without the URL check in front of them:
    a pool aimed straight at the denied address never connects, and a name
    whose DNS answer changes (rebinding) is checked on each new connection."""
    from urllib3.util import Timeout

    from acagent.targets.policy import GuardedAdapter, TargetDenied, TargetPolicy

    allowed, denied = servers
    port = allowed.port
    adapter = GuardedAdapter(TargetPolicy(("allowed.example", "127.0.0.2/32")))
    manager = adapter.poolmanager
    timeout = Timeout(connect=5, read=5)
    for host in ("127.0.0.1", "2130706433", "localhost", "::ffff:127.0.0.1"):
        pool = manager.connection_from_host(host, port, scheme="http")
        with pytest.raises(TargetDenied):
            pool.urlopen("GET", "/", retries=False, timeout=timeout)
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2", "127.0.0.1"])

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            return real(next(answers), *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    pool = manager.connection_from_host("rebind.test", port, scheme="http")
    first = pool.urlopen("GET", "/ok", retries=False, timeout=timeout)
    assert first.status == 200 and first.data == ALLOWED_BODY
    manager.clear()  # drop the pools: the next request needs a new connection, a new answer
    pool = manager.connection_from_host("rebind.test", port, scheme="http")
    with pytest.raises(TargetDenied, match=r"rebind\.test resolves to 127\.0\.0\.1"):
        pool.urlopen("GET", "/ok", retries=False, timeout=timeout)
    adapter.close()
    assert denied.accepted == 0
    assert len(allowed.requests_to("/ok")) == 1
