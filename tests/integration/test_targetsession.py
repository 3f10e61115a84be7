"""``TargetSession``: redirects checked and stripped, no cookies kept,
proxies, netrc and URL credentials as requests handles them.

Each test makes the executor's call (``request_checked``) through
``build_target_session`` against real servers on 127.0.0.1 (and 127.0.0.2)
that record the raw request head and body.
"""

from __future__ import annotations

import base64
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
from helpers import WAIT

from acagent.targets.policy import TargetDenied, TargetPolicy
from acagent.targets.session import TargetSession, build_target_session
from acagent.testing import FakeTarget

PROXY_VARS = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


# ---------------------------------------------------------------------------
# a server that records raw requests
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """One request as it arrived: request line parts, headers in order, body."""

    method: str
    target: str
    headers: Tuple[Tuple[str, str], ...]
    head: bytes
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, values
        return values[0] if values else None


#: a route answers (status, headers, body)
Reply = Tuple[int, List[Tuple[str, str]], bytes]
Route = Callable[[Seen], Reply]


class _RawHandler(socketserver.StreamRequestHandler):
    timeout = WAIT  # a handler thread never outlives a forgotten client by much
    server: Recorder

    def handle(self) -> None:
        while True:
            lines: List[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    return
                if not lines and line in (b"\r\n", b"\n"):
                    continue
                lines.append(line)
                if line in (b"\r\n", b"\n"):
                    break
            method, target, _version = lines[0].decode("latin-1").split(" ", 2)
            headers = []
            for raw in lines[1:-1]:
                name, _, value = raw.decode("latin-1").partition(":")
                headers.append((name, value.strip()))
            seen = Seen(method, target, tuple(headers), b"".join(lines), b"")
            length = int(seen.header("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(method, target, tuple(headers), seen.head, body)
            reply = self.server.record(seen)
            status, reply_headers, payload = reply
            out = [f"HTTP/1.1 {status} X\r\n"]
            out += [f"{n}: {v}\r\n" for n, v in reply_headers]
            out.append(f"Content-Length: {len(payload)}\r\n\r\n")
            if method == "HEAD":
                payload = b""  # the length is announced, the body is not sent
            self.wfile.write("".join(out).encode("latin-1") + payload)
            self.wfile.flush()


class Recorder(socketserver.ThreadingTCPServer):
    """An HTTP/1.1 keep-alive server that records every request before answering.

    ``routes`` maps a path (without query) to a function of the request; the
    default answers 200 ``ok``. ``gate`` (when set) is waited for, bounded,
    before answering a path listed in ``gated``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _RawHandler)
        self.routes: Dict[str, Route] = {}
        self.gated: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._seen: List[Seen] = []
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def seen(self) -> List[Seen]:
        with self._lock:
            return list(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def record(self, seen: Seen) -> Reply:
        with self._lock:
            self._seen.append(seen)
        path = seen.target.split("?", 1)[0]
        if path.startswith("http://"):  # absolute form: a request to a proxy
            path = "/proxied"
        gate = self.gated.get(path)
        if gate is not None:
            gate.wait(WAIT)
        route = self.routes.get(path)
        if route is None:
            return 200, [("Content-Type", "text/plain")], b"ok"
        return route(seen)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (timeout tests) is not an error here

    def close(self) -> None:
        for gate in self.gated.values():
            gate.set()
        self.shutdown()
        self.server_close()
        self._thread.join(WAIT)

    def __exit__(self, *exc: object) -> None:
        self.close()


def _recorder() -> Iterator[Recorder]:
    srv = Recorder()
    try:
        yield srv
    finally:
        srv.close()


#: the target origin
server = pytest.fixture(_recorder, name="server")
#: a second origin: another port on 127.0.0.1
other = pytest.fixture(_recorder, name="other")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No proxy or CA variables, and a netrc that does not exist."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-such-netrc"))
    return monkeypatch


def make_session(
    policy: Optional[TargetPolicy] = None, sensitive: Tuple[str, ...] = ()
) -> TargetSession:
    return build_target_session(policy or TargetPolicy(), 4, sensitive_headers=sensitive)


def executor_call(
    session: TargetSession,
    method: str,
    url: str,
    *,
    headers: Optional[Dict[str, str]] = None,
    body: Optional[bytes] = None,
    proxies: Optional[Dict[str, str]] = None,
) -> requests.Response:
    """The call the executor makes, its URL checked first as the executor does."""
    reply = session.request_checked(
        method,
        url,
        session.policy.check_url(url),
        headers=headers or {},
        data=body,
        timeout=(WAIT, WAIT),
        verify=True,
        proxies=proxies or {},
    )
    with reply:
        reply.content  # read the body, release the connection
    return reply


# ---------------------------------------------------------------------------
# redirects
# ---------------------------------------------------------------------------
def _redirect_to(location: str, code: int = 302, extra: Tuple[Tuple[str, str], ...] = ()) -> Route:
    def route(seen: Seen) -> Reply:
        return code, [("Location", location), *extra], b"redirect body, never read"

    return route


def test_redirects_follow_check_and_strip(
    clean_env: pytest.MonkeyPatch,
    monkeypatch: pytest.MonkeyPatch,
    server: Recorder,
    other: Recorder,
) -> None:
    """Same origin keeps credentials, another origin strips them (configured
    names too), each hop is checked by the policy, redirect bodies are dropped."""
    policy = TargetPolicy()
    session = make_session(policy, sensitive=("X-Custom-Cred",))
    hops: List[str] = []
    real_check = policy.check_url

    def check(url: str, *, redirect: bool = False) -> str:
        if redirect:
            hops.append(url)
        return real_check(url, redirect=redirect)

    monkeypatch.setattr(policy, "check_url", check)
    server.routes["/start"] = _redirect_to("/same?x=1", 301)
    server.routes["/same"] = _redirect_to(f"{other.url}/there", 307)
    other.routes["/there"] = _redirect_to("/final", 303)
    headers = {
        "Authorization": "Bearer secret",
        "X-Api-Key": "k",
        "X-Custom-Cred": "c",
        "Cookie": "a=b",
        "X-Keep": "1",
    }
    with session:
        reply = executor_call(session, "POST", f"{server.url}/start", headers=headers, body=b"data")
    assert reply.status_code == 200 and reply.content == b"ok"
    assert [r.status_code for r in reply.history] == [301, 307, 303]
    assert all(r.content == b"" for r in reply.history)  # _drop_redirect_body on every hop
    # every hop is checked before it is requested (requests' send, following
    # each hop with allow_redirects=False, also prepares the hop after it for
    # ``Response.next``: so most are checked twice)
    assert list(dict.fromkeys(hops)) == [
        f"{server.url}/same?x=1",
        f"{other.url}/there",
        f"{other.url}/final",
    ]
    start, same = server.seen
    there, final = other.seen
    assert (start.method, start.body) == ("POST", b"data")
    assert (same.method, same.target, same.body) == ("GET", "/same?x=1", b"")  # 301: POST->GET
    assert same.header("Authorization") == "Bearer secret"  # same origin keeps it
    assert same.header("X-Custom-Cred") == "c"
    assert same.header("Cookie") is None  # requests drops Cookie on every hop
    for seen in (there, final):  # another origin: every credential is gone
        for name in ("Authorization", "X-Api-Key", "X-Custom-Cred", "Cookie"):
            assert seen.header(name) is None, name
        assert seen.header("X-Keep") == "1"


def test_redirect_to_a_denied_host_is_refused(
    clean_env: pytest.MonkeyPatch, server: Recorder
) -> None:
    session = make_session(TargetPolicy(denied=("denied.example",)))
    server.routes["/go"] = _redirect_to("http://denied.example/secret")
    with session, pytest.raises(TargetDenied):
        executor_call(session, "GET", f"{server.url}/go")
    assert [s.target for s in server.seen] == ["/go"]


def test_too_many_redirects(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    session = make_session()
    session.max_redirects = 3
    server.routes["/loop"] = _redirect_to("/loop")
    with session:
        with pytest.raises(requests.TooManyRedirects):
            executor_call(session, "GET", f"{server.url}/loop")
        assert len(server.seen) == 4


def test_redirect_through_fake_target(clean_env: pytest.MonkeyPatch) -> None:
    """acagent.testing's FakeTarget redirect route, followed."""
    with FakeTarget() as target:
        session = make_session()
        with session:
            reply = executor_call(session, "GET", f"{target.url}/redirect?to=/bytes/10&code=302")
        assert reply.status_code == 200 and len(reply.content) == 10
        assert [r.status_code for r in reply.history] == [302]


# ---------------------------------------------------------------------------
# proxies
# ---------------------------------------------------------------------------
def test_environment_proxy_is_used(
    clean_env: pytest.MonkeyPatch, server: Recorder, other: Recorder
) -> None:
    """HTTP_PROXY set before the session is made: the request reaches the
    proxy (``other``) in absolute form, not the target."""
    proxy = other
    proxy.routes["/proxied"] = lambda seen: (200, [], b"via proxy")
    clean_env.setenv("HTTP_PROXY", proxy.url)
    session = make_session()
    url = f"{server.url}/through?a=1"
    with session:
        reply = executor_call(session, "GET", url, headers={"X-A": "1"})
    assert reply.content == b"via proxy"
    assert server.seen == []
    (seen,) = proxy.seen
    assert seen.target == url and seen.header("X-A") == "1"


def test_proxies_argument_is_used(
    clean_env: pytest.MonkeyPatch, server: Recorder, other: Recorder
) -> None:
    other.routes["/proxied"] = lambda seen: (200, [], b"via proxy")
    session = make_session()
    with session:
        reply = executor_call(session, "GET", f"{server.url}/x", proxies={"http": other.url})
    assert reply.content == b"via proxy"
    assert server.seen == [] and [s.target for s in other.seen] == [f"{server.url}/x"]


def test_no_proxy_is_respected(
    clean_env: pytest.MonkeyPatch, server: Recorder, other: Recorder
) -> None:
    clean_env.setenv("HTTP_PROXY", other.url)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    session = make_session()
    with session:
        reply = executor_call(session, "GET", f"{server.url}/direct")
    assert reply.content == b"ok"
    assert other.seen == []
    assert [s.target for s in server.seen] == ["/direct"]


# ---------------------------------------------------------------------------
# netrc and credentials in the URL
# ---------------------------------------------------------------------------
def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_netrc_adds_basic_auth(
    clean_env: pytest.MonkeyPatch, server: Recorder, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    with Recorder("127.0.0.2") as elsewhere:
        session = make_session()
        with session:
            executor_call(session, "GET", f"{server.url}/a")
            executor_call(session, "GET", f"{server.url}/c", headers={"Authorization": "Bearer x"})
            executor_call(session, "GET", f"{elsewhere.url}/x")
        assert [s.header("Authorization") for s in elsewhere.seen] == [None]
    plain, override = server.seen
    assert plain.header("Authorization") == _basic("alice", "s3cret")
    # requests lets netrc win over an Authorization header of the call
    assert override.header("Authorization") == _basic("alice", "s3cret")


def test_netrc_ignored_without_trust_env(
    clean_env: pytest.MonkeyPatch, server: Recorder, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    clean_env.setenv("NETRC", str(netrc))
    session = make_session()
    session.trust_env = False
    with session:
        executor_call(session, "GET", f"{server.url}/a")
    assert server.seen[0].header("Authorization") is None


def test_credentials_in_url(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    session = make_session()
    url = server.url.replace("http://", "http://bob:p%40ss@") + "/u"
    with session:
        executor_call(session, "GET", url)
    assert server.seen[0].header("Authorization") == _basic("bob", "p@ss")


# ---------------------------------------------------------------------------
# cookies
# ---------------------------------------------------------------------------
def test_cookies_are_not_kept(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    server.routes["/login"] = lambda seen: (
        200,
        [("Set-Cookie", "sid=abc; Path=/"), ("Set-Cookie", "other=1")],
        b"welcome",
    )
    session = make_session()
    with session:
        first = executor_call(session, "GET", f"{server.url}/login")
        executor_call(session, "GET", f"{server.url}/next")
    assert first.cookies.get("sid") == "abc"  # the reply carries it ...
    assert len(session.cookies) == 0  # ... the session keeps nothing
    _login, after = server.seen
    assert after.header("Cookie") is None


def test_cookie_of_a_redirect_hop_stays_in_its_chain(
    clean_env: pytest.MonkeyPatch, server: Recorder
) -> None:
    """Within one redirect chain requests carries a cookie set by a hop to the
    next hop (its per-request jar); the session still keeps nothing."""
    server.routes["/hop"] = _redirect_to("/end", extra=(("Set-Cookie", "hop=1; Path=/"),))
    session = make_session()
    with session:
        executor_call(session, "GET", f"{server.url}/hop")
        executor_call(session, "GET", f"{server.url}/later")
    _hop, end, later = server.seen
    assert end.header("Cookie") == "hop=1"
    assert later.header("Cookie") is None
    assert len(session.cookies) == 0
