"""S3 upload URLs cannot make the agent a proxy into the customer network.

A compromised AC server hands out the ``putUrl``. It must be https (or the
AC server's own scheme), never point to a loopback, private or link-local
address unless the operator listed it (``--allowedUploadHosts``), redirects
are not followed, and the storage host's reply never reaches the result.
Counted at real servers on 127.0.0.2/127.0.0.3 (the fake AC server is on
127.0.0.1, whose host is accepted as an upload host).
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
from helpers import WAIT, make_client, make_config, make_pipeline, running

from acagent.errors import BadReplyError
from acagent.testing import FakeACServer, FakeTarget, ReceivedResult, expected_sha256

REPLY_TEXT = b"INTERNAL-ADMIN-PANEL: user=root token=abc123"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: StorageServer

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(65536, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            self.server.add_bytes(len(chunk))
        self.send_response(self.server.status)
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(REPLY_TEXT)))
        self.end_headers()
        self.wfile.write(REPLY_TEXT)


class StorageServer(ThreadingHTTPServer):
    """An HTTP server that counts accepted connections and body bytes, and
    answers every PUT with ``status`` and a body that must never be quoted."""

    daemon_threads = True

    def __init__(
        self, host: str, status: int = 200, headers: Optional[Dict[str, str]] = None
    ) -> None:
        super().__init__((host, 0), _Handler)
        self.status = status
        self.headers = dict(headers or {})
        self._lock = threading.Lock()
        self.accepted = 0
        self.body_bytes = 0
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"storage-{host}"
        )
        self._thread.start()

    def get_request(self) -> Tuple[socket.socket, Any]:
        request = super().get_request()
        with self._lock:
            self.accepted += 1
        return request

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self.body_bytes += count

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.fixture
def internal() -> Iterator[StorageServer]:
    server = StorageServer("127.0.0.2")
    try:
        yield server
    finally:
        server.close()


def _upload_url_reply(put_url: str) -> bytes:
    return json.dumps({"data": {"putUrl": put_url, "getUrl": put_url + "?get=1"}}).encode()


def _s3_result(tmp_path: Path, put_url: str, **config: Any) -> ReceivedResult:
    """Run one task whose 600 KB body should go to S3 at ``put_url``; its result.

    A URL the policy refuses, or one that keeps failing, is never retried
    into an error result: the same result goes through upload-result instead.
    """
    with FakeTarget() as target, FakeACServer() as ac:
        ac.inject("upload-url", status=200, body=_upload_url_reply(put_url), times=10)
        ac.add_task({"taskId": "big", "method": "GET", "url": f"{target.url}/bytes/600000"})
        cfg = make_config(ac.url, tmp_path / "spool", upload_to_ac=False, **config)
        with running(make_pipeline(cfg)):
            assert ac.wait_for_results(1, WAIT)
        (got,) = ac.results["big"]
    assert got.via == "upload"  # delivered through the AC server, byte-exact
    assert got.body_sha256 == expected_sha256(600000, 0)
    return got


@pytest.mark.parametrize(
    "form",
    ["http://127.0.0.2:{port}/bucket/key?X-Amz-Signature=s1g", "http://2130706434:{port}/b/k"],
    ids=["ip-literal", "name-resolving-to-loopback"],
)
def test_put_url_to_an_internal_address_sends_nothing(
    tmp_path: Path, internal: StorageServer, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    got = _s3_result(tmp_path, form.format(port=internal.port))
    assert internal.accepted == 0 and internal.body_bytes == 0
    assert "INTERNAL" not in str(got.fields)
    logged = caplog.text
    assert "upload url refused" in logged and "internal address" in logged
    assert "s1g" not in logged and "INTERNAL" not in logged


def test_storage_reply_is_never_quoted_and_redirects_not_followed(
    tmp_path: Path, internal: StorageServer, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = StorageServer("127.0.0.3", status=403)
    redirecting = StorageServer(
        "127.0.0.3", status=307, headers={"Location": f"http://127.0.0.2:{internal.port}/x"}
    )
    try:
        _s3_result(
            tmp_path / "a",
            f"http://127.0.0.3:{refusing.port}/b/k",
            allowed_upload_hosts=("127.0.0.3",),
        )
        assert refusing.body_bytes >= 600000  # the listed host got the upload attempts
        assert "HTTP 403: upload refused by the storage service" in caplog.text
        _s3_result(
            tmp_path / "b",
            f"http://127.0.0.3:{redirecting.port}/b/k",
            allowed_upload_hosts=("127.0.0.0/30",),
        )
        assert "HTTP 307: redirect not followed" in caplog.text
    finally:
        refusing.close()
        redirecting.close()
    assert internal.accepted == 0
    assert "INTERNAL" not in caplog.text  # the storage hosts' reply bodies never show


def test_put_url_checks_at_the_client(
    tmp_path: Path, ac: FakeACServer, internal: StorageServer
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"x" * 1000)
    client = make_client(ac)
    try:
        for url, reason in [
            (f"ftp://127.0.0.2:{internal.port}/k", "scheme must be"),
            (f"gopher://127.0.0.2:{internal.port}/k", "scheme must be"),
            (f"http://127.0.0.1:1\\@127.0.0.2:{internal.port}/k", "invalid url"),
            (f"http://[::ffff:127.0.0.2]:{internal.port}/k", "internal address"),
            (f"http://2130706434:{internal.port}/k", "internal address"),
            ("http://169.254.169.254/latest/", "denied"),
            ("http://10.1.2.3/k", "internal address"),
            ("http://[fd00:ec2::254]/k", "denied"),
        ]:
            with pytest.raises(BadReplyError) as info:
                client.put_s3(url, str(body))
            assert reason in str(info.value), (url, str(info.value))
            assert "INTERNAL" not in str(info.value)
        # the AC server's own host is an accepted upload host
        put_url, _get = client.get_upload_url("file.bin")
        client.put_s3(put_url, str(body))
    finally:
        client.close()
    assert internal.accepted == 0 and internal.body_bytes == 0


def test_https_required_unless_the_ac_server_uses_http(tmp_path: Path) -> None:
    from acagent.ac.client import ACClient
    from acagent.config import AgentConfig

    body = tmp_path / "body"
    body.write_bytes(b"x")
    client = ACClient(AgentConfig(server_url="https://ac.example", api_key="k"))
    try:
        with pytest.raises(BadReplyError, match="scheme must be https, got 'http'"):
            client.put_s3("http://s3.amazonaws.com/b/k", str(body))
    finally:
        client.close()


def test_put_url_through_an_outgoing_proxy(
    tmp_path: Path, ac: FakeACServer, internal: StorageServer
) -> None:
    """Through a proxy the URL's host is checked; a public name the agent
    cannot resolve itself is left to the proxy."""
    body = tmp_path / "body"
    body.write_bytes(b"y" * 2048)
    proxy = StorageServer("127.0.0.3")  # answers every PUT 200, like a forwarding proxy
    client = make_client(ac, outgoing_proxy_http=f"http://127.0.0.3:{proxy.port}")
    try:
        with pytest.raises(BadReplyError, match="internal address"):
            client.put_s3(f"http://127.0.0.2:{internal.port}/b/k", str(body))
        assert proxy.accepted == 0
        client.put_s3("http://bucket.s3.unresolvable.example/b/k?X-Amz-Signature=1", str(body))
        assert proxy.body_bytes == 2048
    finally:
        client.close()
        proxy.close()
    assert internal.accepted == 0
