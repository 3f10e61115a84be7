"""The lean AC exchange (``actransport.py``) keeps requests' proxy semantics.

AC calls skip ``Session.request`` and go straight to the adapter's urllib3
pool; these tests run them through a real forwarding proxy on 127.0.0.1 and
check what the proxy and the AC server saw.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import threading
from typing import Any, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest
from helpers import make_client, result_payload

from acagent.ac.transport import ACReply
from acagent.testing import FakeACServer


class ForwardingProxy:
    """A plain HTTP forward proxy: absolute-URI requests, forwarded with http.client."""

    def __init__(self) -> None:
        self.seen: List[
            Tuple[str, Optional[str]]
        ] = []  # (request line target, Proxy-Authorization)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                proxy.seen.append((self.path, self.headers.get("Proxy-Authorization")))
                target = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")
                }
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                try:
                    path = target.path + (f"?{target.query}" if target.query else "")
                    upstream.request(self.command, path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _forward
            do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="test-forward-proxy", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


@pytest.fixture
def proxy() -> Iterator[ForwardingProxy]:
    p = ForwardingProxy()
    yield p
    p.close()


def test_ac_calls_go_through_the_configured_proxy_with_its_credentials(
    ac: FakeACServer, proxy: ForwardingProxy
) -> None:
    ac.add_task(task_id="t1", url="http://tool.test/a")
    client = make_client(ac, outgoing_proxy_http=f"http://agent:s3cret@127.0.0.1:{proxy.port}")
    try:
        task = client.get_task()
        assert task is not None and task.task_id == "t1"
        client.put_result(result_payload("t1"))
    finally:
        client.close()
    expected_auth = "Basic " + base64.b64encode(b"agent:s3cret").decode()
    targets = [target for target, _auth in proxy.seen]
    assert targets[0].startswith(f"{ac.url}/api/http-teleport/get-task?agentId=")
    assert targets[1] == f"{ac.url}/api/http-teleport/put-result"
    assert all(auth == expected_auth for _target, auth in proxy.seen)
    assert "t1" in ac.results  # the AC server got the result through the proxy


def test_proxy_environment_is_honoured_and_no_proxy_bypasses_it(
    ac: FakeACServer, proxy: ForwardingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = make_client(ac)
    try:
        assert client.get_task() is None
    finally:
        client.close()
    assert len(proxy.seen) == 1

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = make_client(ac)
    try:
        assert client.get_task() is None
    finally:
        client.close()
    assert len(proxy.seen) == 1  # direct this time


def test_reply_text_and_json() -> None:
    reply = ACReply(200, {"Content-Type": "application/json"}, b'{"data": "\xc3\xa9"}\xff')
    assert reply.text.startswith('{"data": "\u00e9"}')
    assert ACReply(200, {}, b'{"data": 1}').json() == {"data": 1}


def test_the_pool_is_looked_up_once_and_closed_with_the_client(
    ac: FakeACServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(ac)
    adapter = client.session.get_adapter(ac.url)
    lookups: List[Any] = []  # the pools handed out
    real = adapter.get_connection_with_tls_context

    def counting(request: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(real(request, *args, **kwargs))
        return lookups[-1]

    monkeypatch.setattr(adapter, "get_connection_with_tls_context", counting)
    try:
        for n in range(3):
            assert client.get_task() is None
            client.put_result(result_payload(f"r{n}"))
        assert len(lookups) == 1  # six calls, one origin: one lookup
        assert ac.connections_opened == 1
        assert sorted(ac.results) == ["r0", "r1", "r2"]
        (pool,) = lookups
        assert pool.pool is not None and pool.num_connections == 1
    finally:
        client.close()
    assert pool.pool is None  # closed by the client, not left to the garbage collector
