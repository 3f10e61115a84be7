"""``TargetSession.request``'s fast path sends what requests' own path sends.

Each test makes requests through ``build_target_session`` against real
servers on 127.0.0.1 (and 127.0.0.2) that record the raw request head and
body, and compares the fast path with ``requests.Session.request`` called on
the same session (the path the fast one replaces). Whether a call took the
fast path is read from a counter on the session's ``prepare_request``, which
only requests' path calls.
"""

from __future__ import annotations

import base64
import socketserver
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import pytest
import requests
from helpers import WAIT

import acagent.targetsession as targetsession
from acagent.allowlist import TargetDenied, TargetPolicy
from acagent.targetsession import TargetSession, build_target_session
from acagent.testing import FakeTarget
from acagent.testing.httpserver import closed_port_url

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


class Counted:
    """Counts the calls of the session's ``prepare_request`` (requests' path only)."""

    def __init__(self, session: TargetSession) -> None:
        self.calls = 0
        real = session.prepare_request

        def counting(request: requests.Request) -> requests.PreparedRequest:
            self.calls += 1
            return real(request)

        session.prepare_request = counting  # type: ignore[method-assign]


def make_session(
    policy: Optional[TargetPolicy] = None, sensitive: Tuple[str, ...] = ()
) -> Tuple[TargetSession, Counted]:
    session = build_target_session(policy or TargetPolicy(), 4, sensitive_headers=sensitive)
    return session, Counted(session)


def executor_call(
    session: TargetSession,
    method: str,
    url: str,
    *,
    headers: Optional[Dict[str, Any]] = None,
    body: Optional[bytes] = None,
    plain: bool = False,
    proxies: Optional[Dict[str, str]] = None,
) -> requests.Response:
    """The call the executor makes; ``plain`` sends it through requests' own path."""
    kwargs: Dict[str, Any] = dict(
        headers=headers,
        data=body,
        stream=True,
        timeout=(WAIT, WAIT),
        verify=True,
        proxies=proxies if proxies is not None else {},
    )
    if plain:
        reply = requests.Session.request(session, method, url, **kwargs)
    else:
        reply = session.request(method, url, **kwargs)
    with reply:
        reply.content  # read the body, release the connection
    return reply


def both_ways(
    session: TargetSession, srv: Recorder, method: str, url: str, **kwargs: Any
) -> Tuple[Seen, Seen]:
    """The request the server got through the fast path and through requests' path."""
    srv.clear()
    executor_call(session, method, url, **kwargs)
    executor_call(session, method, url, plain=True, **kwargs)
    fast, plain = srv.seen
    return fast, plain


# ---------------------------------------------------------------------------
# the request on the wire
# ---------------------------------------------------------------------------
HEADER_CASES: List[Optional[Dict[str, Any]]] = [
    None,
    {},
    {"X-Tenant": "t1", "Content-Type": "application/json"},
    {"accept": "text/plain", "ACCEPT-ENCODING": "identity"},  # overrides, other case
    {"Accept-Encoding": None, "X-Keep": "1"},  # None removes a session header
    {"Authorization": "Bearer abc", "x-api-key": "k"},
    {"Host": "127.0.0.1"},
]


@pytest.mark.parametrize("method", ["GET", "post", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("body", [None, b"", b'{"a": 1}'])
@pytest.mark.parametrize("headers", HEADER_CASES)
def test_same_request_as_requests(
    clean_env: pytest.MonkeyPatch,
    server: Recorder,
    method: str,
    body: Optional[bytes],
    headers: Optional[Dict[str, Any]],
) -> None:
    session, counted = make_session()
    url = f"{server.url}/p%20ath/caf\u00e9?q=1&r=a%2Fb&u=\u00fc#frag"
    with session:
        fast, plain = both_ways(session, server, method, url, headers=headers, body=body)
    assert counted.calls == 1  # only the plain call went through prepare_request
    assert fast == plain
    assert fast.method == method.upper()
    assert fast.target == "/p%20ath/caf%C3%A9?q=1&r=a%2Fb&u=%C3%BC"
    assert fast.body == (body or b"")
    assert fast.header("User-Agent") is not None and "python-requests" not in str(
        fast.header("User-Agent")
    )
    given = {k.lower(): v for k, v in (headers or {}).items()}
    for name, default in (("Accept", "*/*"), ("Accept-Encoding", None), ("Connection", None)):
        expected = given.get(name.lower(), default or session.headers[name])
        if expected is None:  # removed: http.client then says it takes no encoding
            assert fast.header(name) == ("identity" if name == "Accept-Encoding" else None)
        else:
            assert fast.header(name) == expected
    for name, value in given.items():
        if value is not None and name not in ("content-length", "host"):
            assert fast.header(name) == value
    if body:
        assert fast.header("Content-Length") == str(len(body))
    elif method.upper() in ("GET", "HEAD"):
        assert fast.header("Content-Length") is None
    else:
        assert fast.header("Content-Length") == "0"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_content_length_of_the_call(
    clean_env: pytest.MonkeyPatch, server: Recorder, method: str
) -> None:
    """A Content-Length header of the call gives way to the body's length."""
    session, _ = make_session()
    with session:
        fast, plain = both_ways(
            session,
            server,
            method,
            f"{server.url}/x",
            headers={"content-length": "99"},
            body=b"12345",
        )
    assert fast == plain
    assert fast.header("Content-Length") == "5" and fast.body == b"12345"


def test_the_executor_call_takes_the_fast_path(
    clean_env: pytest.MonkeyPatch, server: Recorder
) -> None:
    session, counted = make_session()
    with session:
        for _ in range(3):
            reply = executor_call(
                session, "POST", f"{server.url}/x", headers={"A": "1"}, body=b"abc"
            )
            assert reply.status_code == 200 and reply.content == b"ok"
    assert counted.calls == 0
    assert [s.body for s in server.seen] == [b"abc"] * 3


def test_session_header_changes_are_seen(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    """Validated session headers are remembered by value: a changed one is
    sent (and checked) anew, a removed one is gone."""
    session, _ = make_session()
    with session:
        executor_call(session, "GET", f"{server.url}/1")
        session.headers["Accept"] = "text/html"
        session.headers["X-Added"] = "yes"
        executor_call(session, "GET", f"{server.url}/2")
        del session.headers["Accept-Encoding"]
        executor_call(session, "GET", f"{server.url}/3")
        session.headers["X-Added"] = "bad\r\nvalue"
        with pytest.raises(requests.exceptions.InvalidHeader):
            session.request("GET", f"{server.url}/4", stream=True)
        session.headers["X-Added"] = None  # type: ignore[assignment]
        executor_call(session, "GET", f"{server.url}/5")
    first, second, third, fifth = server.seen
    assert first.header("Accept") == "*/*" and first.header("X-Added") is None
    assert second.header("Accept") == "text/html" and second.header("X-Added") == "yes"
    assert third.header("Accept-Encoding") == "identity"  # http.client's, not gzip
    assert fifth.header("X-Added") is None  # None drops it, as merge_setting does


def test_caches_stay_bounded(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    session, _ = make_session()
    limit = targetsession._FAST_CACHE_MAX
    with session:
        for i in range(limit + 10):
            prep = session._prepare_fast("GET", f"{server.url}/n/{i}", None, None)
            assert prep is not None and prep.url == f"{server.url}/n/{i}"
    assert 0 < len(session._prepared_urls) <= limit
    assert 0 < len(session._url_auth) <= limit


def test_concurrent_calls(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    """Threads share the session (and its caches), as the executor's pool does."""
    session, counted = make_session()

    def one(i: int) -> int:
        reply = executor_call(
            session, "POST", f"{server.url}/c/{i % 7}", headers={"X-N": str(i)}, body=b"%d" % i
        )
        return reply.status_code

    with session, ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(one, i) for i in range(80)]
        assert [f.result(timeout=WAIT) for f in futures] == [200] * 80
    seen = server.seen
    assert len(seen) == 80 and counted.calls == 0
    assert sorted(s.header("X-N") for s in seen) == sorted(str(i) for i in range(80))
    assert all(s.body == str(s.header("X-N")).encode() for s in seen)


# ---------------------------------------------------------------------------
# same failures
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "headers", "error"),
    [
        ("127.0.0.1/x", None, requests.exceptions.MissingSchema),
        ("http://", None, requests.exceptions.InvalidURL),
        ("http://*.example/", None, requests.exceptions.InvalidURL),
        # requests >= 2.33 refuses the space; 2.32 quotes it and fails to
        # resolve "a%20b": either way both paths must fail alike
        (
            "http://a b/",
            None,
            (requests.exceptions.InvalidURL, requests.exceptions.ConnectionError),
        ),
        ("ftp://127.0.0.1/x", None, requests.exceptions.InvalidSchema),
        ("{server}/x", {"X-Bad": "a\r\nb"}, requests.exceptions.InvalidHeader),
        ("{server}/x", {" X-Bad": "a"}, requests.exceptions.InvalidHeader),
        ("{server}/x", {"X-Bad": 5}, requests.exceptions.InvalidHeader),
        ("{server}/x", {"X-Bad": "caf\u00e9\u20ac"}, UnicodeEncodeError),
        ("{closed}/x", None, requests.exceptions.ConnectionError),
    ],
)
def test_same_exceptions(
    clean_env: pytest.MonkeyPatch,
    server: Recorder,
    url: str,
    headers: Optional[Dict[str, Any]],
    error: Union[type, Tuple[type, ...]],
) -> None:
    url = url.format(server=server.url, closed=closed_port_url())
    session, counted = make_session()
    caught: List[Tuple[type, str]] = []
    with session:
        for plain in (False, True):
            with pytest.raises(error) as info:
                executor_call(session, "GET", url, headers=headers, plain=plain)
            caught.append((type(info.value), str(info.value)))
    if issubclass(caught[0][0], requests.exceptions.ConnectionError):
        assert caught[0][0] is caught[1][0]  # the message names a connection object
    else:
        assert caught[0] == caught[1]
    assert counted.calls == 1
    assert server.seen == []


def test_read_timeout(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    gate = threading.Event()
    server.gated["/slow"] = gate
    session, counted = make_session()
    try:
        with session:
            for plain in (False, True):
                method = requests.Session.request if plain else TargetSession.request
                with pytest.raises(requests.exceptions.ReadTimeout):
                    method(session, "GET", f"{server.url}/slow", stream=True, timeout=(WAIT, 0.2))
    finally:
        gate.set()
    assert counted.calls == 1
    assert len(server.seen) == 2


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
    session, counted = make_session(policy, sensitive=("X-Custom-Cred",))
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
    assert counted.calls == 0
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
    # the same chain through requests' path reaches the servers the same way
    server.clear()
    other.clear()
    hops.clear()
    with session:
        plain = executor_call(
            session, "POST", f"{server.url}/start", headers=headers, body=b"data", plain=True
        )
    assert [r.status_code for r in plain.history] == [301, 307, 303]
    assert server.seen == [start, same] and other.seen == [there, final]
    assert list(dict.fromkeys(hops)) == [
        f"{server.url}/same?x=1",
        f"{other.url}/there",
        f"{other.url}/final",
    ]


def test_redirect_to_a_denied_host_is_refused(
    clean_env: pytest.MonkeyPatch, server: Recorder
) -> None:
    session, counted = make_session(TargetPolicy(denied=("denied.example",)))
    server.routes["/go"] = _redirect_to("http://denied.example/secret")
    with session, pytest.raises(TargetDenied):
        executor_call(session, "GET", f"{server.url}/go")
    assert counted.calls == 0
    assert [s.target for s in server.seen] == ["/go"]


def test_too_many_redirects(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    session, _ = make_session()
    session.max_redirects = 3
    server.routes["/loop"] = _redirect_to("/loop")
    with session:
        for plain in (False, True):
            server.clear()
            with pytest.raises(requests.TooManyRedirects):
                executor_call(session, "GET", f"{server.url}/loop", plain=plain)
            assert len(server.seen) == 4


def test_redirect_through_fake_target(clean_env: pytest.MonkeyPatch) -> None:
    """acagent.testing's FakeTarget redirect route, followed by the fast path."""
    with FakeTarget() as target:
        session, counted = make_session()
        with session:
            reply = executor_call(session, "GET", f"{target.url}/redirect?to=/bytes/10&code=302")
        assert counted.calls == 0
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
    session, counted = make_session()
    url = f"{server.url}/through?a=1"
    with session:
        fast = executor_call(session, "GET", url, headers={"X-A": "1"})
        plain = executor_call(session, "GET", url, headers={"X-A": "1"}, plain=True)
    assert fast.content == plain.content == b"via proxy"
    assert counted.calls == 1
    assert server.seen == []
    first, second = proxy.seen
    assert first == second
    assert first.target == url and first.header("X-A") == "1"


def test_proxies_argument_is_used(
    clean_env: pytest.MonkeyPatch, server: Recorder, other: Recorder
) -> None:
    other.routes["/proxied"] = lambda seen: (200, [], b"via proxy")
    session, counted = make_session()
    with session:
        reply = executor_call(session, "GET", f"{server.url}/x", proxies={"http": other.url})
    assert reply.content == b"via proxy"
    assert counted.calls == 0
    assert server.seen == [] and [s.target for s in other.seen] == [f"{server.url}/x"]


def test_no_proxy_is_respected(
    clean_env: pytest.MonkeyPatch, server: Recorder, other: Recorder
) -> None:
    clean_env.setenv("HTTP_PROXY", other.url)
    clean_env.setenv("NO_PROXY", "127.0.0.1")
    session, counted = make_session()
    with session:
        fast = executor_call(session, "GET", f"{server.url}/direct")
        plain = executor_call(session, "GET", f"{server.url}/direct", plain=True)
    assert fast.content == plain.content == b"ok"
    assert counted.calls == 1
    assert other.seen == []
    assert [s.target for s in server.seen] == ["/direct", "/direct"]


# ---------------------------------------------------------------------------
# netrc and credentials in the URL
# ---------------------------------------------------------------------------
def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_netrc_adds_basic_auth(
    clean_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch, server: Recorder, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    lookups: List[str] = []
    real = targetsession.get_netrc_auth

    def counting(url: str, raise_errors: bool = False) -> Optional[Tuple[str, str]]:
        lookups.append(url)
        return real(url, raise_errors)

    monkeypatch.setattr(targetsession, "get_netrc_auth", counting)
    with Recorder("127.0.0.2") as elsewhere:
        session, counted = make_session()
        with session:
            fast, plain = both_ways(session, server, "GET", f"{server.url}/a")
            executor_call(session, "GET", f"{server.url}/b?c=d")
            override, override_plain = both_ways(
                session, server, "GET", f"{server.url}/c", headers={"Authorization": "Bearer x"}
            )
            executor_call(session, "GET", f"{elsewhere.url}/x")
            executor_call(session, "GET", f"{elsewhere.url}/y")
        assert [s.header("Authorization") for s in elsewhere.seen] == [None, None]
    assert fast == plain and override == override_plain
    assert fast.header("Authorization") == _basic("alice", "s3cret")
    assert server.seen[-1].header("Authorization") == _basic("alice", "s3cret")
    # requests lets netrc win over an Authorization header of the call, and so does the fast path
    assert override.header("Authorization") == _basic("alice", "s3cret")
    # looked up once per host by the fast path (requests' path looks up on its own)
    assert lookups == [f"{server.url}/a", f"{elsewhere.url}/x"]
    assert counted.calls == 2


def test_netrc_ignored_without_trust_env(
    clean_env: pytest.MonkeyPatch, server: Recorder, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cret\n")
    clean_env.setenv("NETRC", str(netrc))
    session, _ = make_session()
    session.trust_env = False
    with session:
        fast, plain = both_ways(session, server, "GET", f"{server.url}/a")
    assert fast == plain and fast.header("Authorization") is None


def test_credentials_in_url(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    session, _ = make_session()
    url = server.url.replace("http://", "http://bob:p%40ss@") + "/u"
    with session:
        fast, plain = both_ways(session, server, "GET", url)
    assert fast == plain
    assert fast.header("Authorization") == _basic("bob", "p@ss")


# ---------------------------------------------------------------------------
# cookies
# ---------------------------------------------------------------------------
def test_cookies_are_not_kept(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    server.routes["/login"] = lambda seen: (
        200,
        [("Set-Cookie", "sid=abc; Path=/"), ("Set-Cookie", "other=1")],
        b"welcome",
    )
    session, counted = make_session()
    with session:
        first = executor_call(session, "GET", f"{server.url}/login")
        executor_call(session, "GET", f"{server.url}/next")
        executor_call(session, "GET", f"{server.url}/next", plain=True)
    assert first.cookies.get("sid") == "abc"  # the reply carries it ...
    assert len(session.cookies) == 0  # ... the session keeps nothing
    _login, after, after_plain = server.seen
    assert after.header("Cookie") is None and after == after_plain
    assert counted.calls == 1


def test_cookie_of_a_redirect_hop_same_as_requests(
    clean_env: pytest.MonkeyPatch, server: Recorder
) -> None:
    """Within one redirect chain requests carries a cookie set by a hop to the
    next hop (its per-request jar); the fast path hands requests the same jar,
    so the chain behaves the same, and the session still keeps nothing."""
    server.routes["/hop"] = _redirect_to("/end", extra=(("Set-Cookie", "hop=1; Path=/"),))
    session, _ = make_session()
    with session:
        executor_call(session, "GET", f"{server.url}/hop")
        executor_call(session, "GET", f"{server.url}/hop", plain=True)
        executor_call(session, "GET", f"{server.url}/later")
    hop, end, hop_plain, end_plain, later = server.seen
    assert (hop, end) == (hop_plain, end_plain)
    assert later.header("Cookie") is None
    assert len(session.cookies) == 0


# ---------------------------------------------------------------------------
# what the fast path does not handle goes to requests
# ---------------------------------------------------------------------------
FALLBACKS: List[Tuple[str, Dict[str, Any]]] = [
    ("params", {"params": {"q": "1", "r": ["a", "b"]}}),
    ("cookies", {"cookies": {"c": "v"}}),
    ("auth", {"auth": ("u", "p")}),
    ("json", {"json": {"a": [1, 2]}}),
    ("files", {"files": {"f": ("name.txt", b"content")}}),
    ("str body", {"data": "text body \u00e9"}),
    ("form body", {"data": {"k": "v"}}),
    ("hooks", {"hooks": {"response": [lambda r, *a, **k: r]}}),
    ("bytes method", {"method": b"GET"}),
    ("bytes url", {"url": b"{server}/b"}),
]


@pytest.mark.parametrize(("name", "kwargs"), FALLBACKS, ids=[n for n, _ in FALLBACKS])
def test_unsupported_arguments_fall_back(
    clean_env: pytest.MonkeyPatch, server: Recorder, name: str, kwargs: Dict[str, Any]
) -> None:
    session, counted = make_session()
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "POST")
    url = kwargs.pop("url", "{server}/f")
    if isinstance(url, bytes):
        url = url.replace(b"{server}", server.url.encode())
    else:
        url = url.format(server=server.url)
    with session:
        for call in (TargetSession.request, requests.Session.request):
            reply = call(session, method, url, stream=True, timeout=(WAIT, WAIT), **kwargs)
            with reply:
                assert reply.content == b"ok"
    assert counted.calls == 2  # both went through prepare_request
    fast, plain = server.seen
    assert fast.head.split(b"boundary=")[0] == plain.head.split(b"boundary=")[0]
    if name != "files":  # a multipart boundary is random
        assert fast == plain
    if name == "params":
        assert fast.target == "/f?q=1&r=a&r=b"
    if name == "cookies":
        assert fast.header("Cookie") == "c=v"


def test_session_settings_fall_back(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    """Session params, auth or a cookie put into the jar by hand: requests' path."""
    session, counted = make_session()
    url = f"{server.url}/s"
    with session:
        session.params = {"s": "1"}
        with_params = both_ways(session, server, "GET", url)
        session.params = {}
        session.auth = ("su", "sp")
        with_auth = both_ways(session, server, "GET", url)
        session.auth = None
        session.cookies.set("handset", "1", domain="127.0.0.1")  # set_cookie skips the policy
        with_cookie = both_ways(session, server, "GET", url)
        session.cookies.clear()
        counted.calls = 0
        executor_call(session, "GET", url)
        assert counted.calls == 0  # back to the fast path
    for fast, plain in (with_params, with_auth, with_cookie):
        assert fast == plain
    assert with_params[0].target == "/s?s=1"
    assert with_auth[0].header("Authorization") == _basic("su", "sp")
    assert with_cookie[0].header("Cookie") == "handset=1"


def test_allow_redirects_false_falls_back(clean_env: pytest.MonkeyPatch, server: Recorder) -> None:
    server.routes["/moved"] = _redirect_to("/elsewhere")
    session, counted = make_session()
    with session:
        replies = [
            call(session, "GET", f"{server.url}/moved", allow_redirects=False, stream=True)
            for call in (TargetSession.request, requests.Session.request)
        ]
        for reply in replies:
            with reply:
                assert reply.status_code == 302 and reply.content == b""
                assert reply.next is not None and reply.next.url == f"{server.url}/elsewhere"
    assert counted.calls == 2
    assert [s.target for s in server.seen] == ["/moved", "/moved"]
