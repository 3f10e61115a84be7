"""TLS verification of AC and S3 calls against an https fake server (trustme CA)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import trustme
from helpers import make_client

from acagent import __version__
from acagent.ac.backoff import Backoff
from acagent.ac.retry import RetryPolicy
from acagent.errors import ACConnectionError
from acagent.testing import FakeACServer

FAST = RetryPolicy(error_retries=1, call=Backoff(0.02, 120.0))
insecure_ok = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def result(task_id: str) -> Dict[str, Any]:
    return {"taskId": task_id, "version": __version__, "statusCode": 200, "responseHeaders": {}}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_pem(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def ac(ca: trustme.CA) -> Iterator[FakeACServer]:
    with FakeACServer(api_key="k", ssl_context=server_context(ca, "127.0.0.1")) as server:
        assert server.url.startswith("https://127.0.0.1:")
        yield server


def test_default_client_refuses_an_untrusted_certificate(ac: FakeACServer) -> None:
    ac.add_task({"taskId": "t1", "url": "http://tool/x", "method": "GET"})
    with make_client(ac, FAST) as client:
        assert client.verify is True
        with pytest.raises(ACConnectionError) as info:
            client.get_task()
        assert "SSL" in str(info.value) or "certificate" in str(info.value).lower()
        with pytest.raises(ACConnectionError):
            client.put_result(result("t1"))
    # nothing got through: no request reached a handler
    assert ac.requests == []
    assert ac.pending_tasks() == 1


def test_ca_bundle_makes_the_server_trusted(ac: FakeACServer, ca_pem: str) -> None:
    ac.add_task({"taskId": "t1", "url": "http://tool/x", "method": "GET"})
    with make_client(ac, FAST, ca_bundle=ca_pem) as client:
        assert client.verify == ca_pem
        task = client.get_task()
        assert task is not None and task.task_id == "t1"
        client.put_result(result("t1"))
    assert list(ac.results) == ["t1"]
    assert ac.errors == []


def test_ca_bundle_also_covers_the_s3_put(ac: FakeACServer, ca_pem: str, tmp_path: Path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(b"\x00\x01" * 5000)
    with make_client(ac, FAST, ca_bundle=ca_pem) as client:
        put_url, _ = client.get_upload_url("t1" + "0" * 32)
        assert put_url.startswith("https://")
        client.put_s3(put_url, str(body))
    stored = ac.s3_object("t1" + "0" * 32)
    assert stored is not None and stored[0] == b"\x00\x01" * 5000


def test_a_bundle_of_another_ca_is_refused(ac: FakeACServer, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with make_client(ac, FAST, ca_bundle=str(other)) as client:
        with pytest.raises(ACConnectionError):
            client.get_task()


def test_a_certificate_for_another_host_is_refused(ca: trustme.CA, ca_pem: str) -> None:
    context = server_context(ca, "agent.example.com")
    with FakeACServer(api_key="k", ssl_context=context) as ac:
        with make_client(ac, FAST, ca_bundle=ca_pem) as client:
            with pytest.raises(ACConnectionError):
                client.get_task()
        assert ac.requests == []


@insecure_ok
def test_verify_false_accepts_the_untrusted_server(ac: FakeACServer) -> None:
    with make_client(ac, FAST, verify=False) as client:
        assert client.verify is False
        assert client.get_task() is None
        client.put_result(result("t1"))
    assert list(ac.results) == ["t1"]


@insecure_ok
def test_set_verify_at_runtime(ac: FakeACServer, ca_pem: str) -> None:
    with make_client(ac, FAST) as client:
        with pytest.raises(ACConnectionError):
            client.get_task()
        client.set_verify(False)  # globalConfig verifyCert=false
        assert client.get_task() is None
        client.set_verify(True)
        assert client.verify is True
        with pytest.raises(ACConnectionError):
            client.get_task()
    with make_client(ac, FAST, ca_bundle=ca_pem, verify=False) as client:
        assert client.verify is False
        client.set_verify(True)  # turning verification on keeps the configured bundle
        assert client.verify == ca_pem
        assert client.get_task() is None
