"""``python -m acagent check`` against real fake servers on 127.0.0.1 (subprocess, real CLI)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import trustme

from acagent import hints
from acagent.testing import FakeACServer, FakeTarget

TIMEOUT = 120


def run_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env.pop("REQUESTS_CA_BUNDLE", None)
    env["TMPDIR"] = str(tmp_path)  # default log folder and spool land in the test's folder
    return subprocess.run(
        [sys.executable, "-m", "acagent", "check", "--spoolDir", str(tmp_path / "spool"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


def ok_lines(out: str) -> List[str]:
    return [line for line in out.splitlines() if line.startswith("OK ")]


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    with FakeACServer(api_key="right-key") as server:
        yield server


def test_right_key_passes_every_step(ac: FakeACServer, tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line.split()[1].rstrip(":") for line in ok_lines(proc.stdout)]
    assert steps == ["configuration", "resolve", "connect", "authenticate"]
    assert "all checks passed" in proc.stdout
    assert "right-key" not in proc.stdout + proc.stderr
    assert ac.count("get-task") == 1


def test_wrong_key_fails_with_the_key_hint(ac: FakeACServer, tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "wrong-key")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  authenticate" in proc.stdout
    assert f"hint: {hints.HINT_API_KEY}" in proc.stdout
    assert "wrong-key" not in proc.stdout + proc.stderr


def test_a_task_handed_out_to_check_is_run_and_delivered(ac: FakeACServer, tmp_path: Path) -> None:
    with FakeTarget() as target:
        ac.add_task({"taskId": "t-check", "method": "GET", "url": f"{target.url}/bytes/2048?seed=3"})
        proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "task t-check" in proc.stdout
    results = ac.results["t-check"]
    assert len(results) == 1
    assert results[0].fields["statusCode"] == 200
    assert results[0].body_len == 2048
    assert ac.pending_tasks() == 0


def test_nothing_listening_fails_at_connect_with_a_hint(tmp_path: Path) -> None:
    with FakeACServer() as server:
        url = server.url  # a port that was just free; nothing listens once closed
    proc = run_check(tmp_path, "--serverUrl", url, "--apiKey", "k", "--readTimeoutSeconds", "5")
    assert proc.returncode == 1
    assert "FAIL  connect" in proc.stdout
    assert f"hint: {hints.HINT_REFUSED}" in proc.stdout


def test_unresolvable_host_fails_at_resolve_with_the_dns_hint(tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--serverUrl", "https://no-such-host.invalid", "--apiKey", "k")
    assert proc.returncode == 1
    assert "FAIL  resolve" in proc.stdout
    assert f"hint: {hints.HINT_DNS}" in proc.stdout


def test_bad_flag_exits_2_before_any_step(tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--serverUrl", "ftp://x", "--apiKey", "k")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1


# -- TLS ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_ac(ca: trustme.CA) -> Iterator[FakeACServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with FakeACServer(api_key="k", ssl_context=context) as server:
        yield server


def test_self_signed_tls_without_ca_bundle_fails_with_the_hint(
    tls_ac: FakeACServer, tmp_path: Path
) -> None:
    proc = run_check(tmp_path, "--serverUrl", tls_ac.url, "--apiKey", "k")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  connect" in proc.stdout
    assert f"hint: {hints.HINT_CA_BUNDLE}" in proc.stdout
    assert "--caBundle" in hints.HINT_CA_BUNDLE
    assert tls_ac.count("get-task") == 0


def test_self_signed_tls_with_ca_bundle_passes(
    tls_ac: FakeACServer, ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    proc = run_check(tmp_path, "--serverUrl", tls_ac.url, "--apiKey", "k", "--caBundle", str(bundle))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TLS verified" in proc.stdout
    assert tls_ac.count("get-task") == 1


def test_unreachable_proxy_fails_at_connect_with_the_proxy_hint(
    ac: FakeACServer, tmp_path: Path
) -> None:
    with FakeACServer() as gone:
        proxy = gone.url  # nothing listens there once closed
    proc = run_check(
        tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key", "--outgoingProxyHttp", proxy
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "OK    resolve: proxy 127.0.0.1" in proc.stdout
    assert "FAIL  connect" in proc.stdout
    assert f"hint: {hints.HINT_PROXY}" in proc.stdout
    assert ac.count("get-task") == 0


def test_a_malformed_task_handed_out_to_check_is_answered(ac: FakeACServer, tmp_path: Path) -> None:
    ac.add_task({"taskId": "t-bad", "method": "GET"})  # no url: cannot run, can be answered
    proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "task t-bad" in proc.stdout
    results = ac.results["t-bad"]
    assert len(results) == 1 and results[0].via == "error"
    assert ac.count("get-task") == 1


def test_a_result_the_server_refuses_fails_the_check(ac: FakeACServer, tmp_path: Path) -> None:
    with FakeTarget() as target:
        ac.add_task({"taskId": "t-refused", "method": "GET", "url": f"{target.url}/bytes/10?seed=1"})
        # the result is refused for good (three times): it is quarantined and an
        # error result quoting the server goes in its place; the check must fail
        ac.inject("put-result", status=400, body=b'{"error": "bad result"}', times=3)
        proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  authenticate" in proc.stdout
    assert "refused the result of task t-refused" in proc.stdout
    assert ac.count("put-result", 400) == 3


@pytest.mark.parametrize(
    ("args", "shown"),
    [((), "rate limit 250/min each"), (("--rateLimitPerMin", "0"), "rate limit off")],
)
def test_check_names_the_active_rate_limit(
    ac: FakeACServer, tmp_path: Path, args: Tuple[str, ...], shown: str
) -> None:
    proc = run_check(tmp_path, "--serverUrl", ac.url, "--apiKey", "right-key", *args)
    (config_line,) = [line for line in ok_lines(proc.stdout) if "configuration" in line]
    assert shown in config_line, proc.stdout
