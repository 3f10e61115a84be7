"""Security: secrets never logged, target allow-list, response cap, private files, TLS."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import ssl
import stat
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from helpers import WAIT, AgentProcess, make_config, make_pipeline, running, spool_names, wait_until

from acagent import logs
from acagent.models import Result
from acagent.spool import LOCK_FILE
from acagent.testing import (
    FakeACServer,
    FakeTarget,
    closed_port_url,
    expected_body,
    expected_sha256,
)

SECRET1 = "SECRET1-b3arer-7Qz9"
SECRET2 = "SECRET2-c00kie-Lm4x"
SECRET3 = "SECRET3-ap1key-Vv2w"
SECRET4 = "SECRET4-b0dy-Pp8r"
SECRET5 = "SECRET5-acKey-Hh5t"
SECRETS = (SECRET1, SECRET2, SECRET3, SECRET4, SECRET5)


def _secret_headers(**extra: str) -> Dict[str, str]:
    headers = {
        "Authorization": f"Bearer {SECRET1}",
        "Cookie": f"session={SECRET2}",
        "X-Api-Key": SECRET3,
    }
    headers.update(extra)
    return headers


def _secret_tasks(target: FakeTarget) -> List[Dict[str, Any]]:
    """Tasks carrying every secret, through success and every error path."""
    body = f'{{"password": "{SECRET4}"}}'
    dead = closed_port_url()
    urls = {
        "ok-echo": f"{target.url}/echo",
        "refused": f"{dead}/login",
        "reset": f"{target.url}/reset/20000",
        "bad-encoding": f"{target.url}/bad-encoding/100",
        "timeout": f"{target.url}/slow-headers?latency=3",
        "redirect-denied": f"{target.url}/redirect?to=http://denied.example/x",
    }
    tasks: List[Dict[str, Any]] = [
        {
            "taskId": name,
            "method": "POST",
            "url": url,
            "requestHeaders": _secret_headers(),
            "input": body,
            "globalConfig": {"debugMode": True},
        }
        for name, url in urls.items()
    ]
    # Malformed tasks that still carry the secrets.
    tasks.append(
        {
            "taskId": "bad-method",
            "method": "STEAL",
            "url": f"{target.url}/echo",
            "requestHeaders": _secret_headers(),
            "input": body,
        }
    )
    tasks.append(
        {
            "taskId": "crlf-header",
            "method": "GET",
            "url": f"{target.url}/echo",
            "requestHeaders": _secret_headers(Cookie=f"a={SECRET2}\r\nX-Injected: 1"),
        }
    )
    # Header values requests refuses to send (it would quote the value).
    tasks.append(
        {
            "taskId": "leading-space",
            "method": "GET",
            "url": f"{target.url}/echo",
            "requestHeaders": {"Cookie": f" {SECRET2}", "X-Api-Key": f"\t{SECRET3}"},
        }
    )
    tasks.append(
        {
            "taskId": "not-latin1",
            "method": "GET",
            "url": f"{target.url}/echo",
            "requestHeaders": {"X-Api-Key": f"{SECRET3}\u20ac"},
        }
    )
    return tasks


@pytest.fixture
def root_capture() -> Iterator[io.StringIO]:
    """Everything any logger emits at DEBUG and up, unformatted by acagent."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logs.reset_logging()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_any_log_line(
    tmp_path: Path, root_capture: io.StringIO, log_format: str
) -> None:
    agent_buf = io.StringIO()
    logs.setup_logging(log_format=log_format, debug=True, stream=agent_buf)
    with FakeTarget() as target, FakeACServer(api_key=SECRET5) as ac:
        # AC error paths too: a refused, a failed and a reset upload.
        ac.inject("put-result", status=503, body=b"busy")
        ac.inject("put-result", reset=True)
        ac.inject("get-task", status=500, body=b"oops")
        tasks = _secret_tasks(target)
        ac.add_tasks(tasks)
        config = make_config(
            ac.url,
            tmp_path / "spool",
            api_key=SECRET5,
            debug_mode=True,
            timeout=0.5,
            allowed_targets=("127.0.0.1",),
        )
        with running(make_pipeline(config)):
            assert ac.wait_for_results(len(tasks), WAIT), sorted(ac.results)
        results = ac.results
    # The echo task really carried the secrets to the target and back ...
    (echo,) = results["ok-echo"]
    assert echo.fields["statusCode"] == 200
    assert SECRET1.encode() in (echo.body or b"") and SECRET4.encode() in (echo.body or b"")
    for name in ("refused", "reset", "bad-encoding", "timeout", "redirect-denied", "bad-method"):
        assert results[name][0].via == "error", name
    assert results["leading-space"][0].via == "error"
    # ... and none of them reached a log line, at DEBUG, on any logger.
    agent_text = agent_buf.getvalue()
    root_text = root_capture.getvalue()
    everything = agent_text + root_text
    leaked = [s for s in SECRETS if s in everything]
    assert leaked == [], [
        line for line in everything.splitlines() if any(s in line for s in leaked)
    ]
    # The capture is real: DEBUG lines and the error paths are in it.
    assert "DEBUG" in agent_text and "urllib3" in root_text
    for name in ("refused", "reset", "bad-encoding", "bad-method", "leading-space"):
        assert name in agent_text, name
    assert results["leading-space"][0].fields["output"] == (
        "Agent Side Error: invalid request header (leading whitespace or reserved characters)"
    )
    # The error results sent to the server do not repeat the header values either.
    for name in ("leading-space", "not-latin1"):
        output = results[name][0].fields["output"]
        assert SECRET2 not in output and SECRET3 not in output, output


@pytest.mark.timeout(60)
def test_cli_debug_logs_and_log_file_have_no_secrets_and_cap_applies(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    home = tmp_path / "state"  # the CLI writes <state>/acagent/log/app_log<index>.log
    home.mkdir()
    with FakeTarget() as target, FakeACServer(api_key=SECRET5) as ac:
        # a retried upload (the server's wait is 0 s, so the test stays short)
        ac.inject(
            "put-result", status=429, body=b"slow down", headers={"Retry-After": "0"}, times=2
        )
        tasks = _secret_tasks(target)
        tasks.append({"taskId": "capped", "method": "GET", "url": f"{target.url}/bytes/5001"})
        tasks.append(
            {"taskId": "at-cap", "method": "GET", "url": f"{target.url}/bytes/5000?seed=2"}
        )
        ac.add_tasks(tasks)
        with AgentProcess(
            ac.url,
            spool,
            tmp_path / "agent.log",
            [
                "--debugMode",
                "true",
                "--enableFileLogging",
                "true",
                "--maxResponseBytes",
                "5000",
                "--timeout",
                "0.5",
            ],
            env={"XDG_STATE_HOME": str(home)},
            api_key=SECRET5,
        ) as agent:
            assert ac.wait_for_results(len(tasks), WAIT), agent.output()
            agent.signal(signal.SIGTERM)
            assert agent.wait(15) == 0, agent.output()
        results = ac.results
    stdout = agent.output()
    log_files = list(home.rglob("app_log*.log"))
    assert log_files, list(home.rglob("*"))
    file_text = "".join(p.read_text() for p in log_files)
    assert "DEBUG" in stdout and "DEBUG" in file_text
    for text in (stdout, file_text):
        assert [s for s in SECRETS if s in text] == []
    for path in log_files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)
    capped = results["capped"][0].fields
    assert capped["statusCode"] == 500
    assert capped["output"] == "Agent Side Error: response larger than 5000 bytes"
    at_cap = results["at-cap"][0]
    assert at_cap.fields["statusCode"] == 200 and at_cap.body_sha256 == expected_sha256(5000, 2)


# --------------------------------------------------------------------------
# allow-list
# --------------------------------------------------------------------------


def test_allow_list_denies_before_connecting(tmp_path: Path) -> None:
    with FakeTarget() as denied, FakeACServer() as ac:
        config = make_config(ac.url, tmp_path / "spool", allowed_targets=("allowed.example",))
        ac.add_task({"taskId": "denied", "method": "GET", "url": f"{denied.url}/bytes/10"})
        with running(make_pipeline(config)):
            assert ac.wait_for_results(1, WAIT)
        (got,) = ac.results["denied"]
        assert got.fields["statusCode"] == 500
        assert got.fields["output"] == (
            "Agent Side Error: target host not in the allow-list: 127.0.0.1"
        )
        assert denied.connections_opened == 0


def test_redirect_to_a_denied_host_is_not_followed(tmp_path: Path) -> None:
    with FakeTarget() as allowed, FakeTarget() as denied, FakeACServer() as ac:
        # The same machine under two names: "localhost" is allowed, "127.0.0.1" is not.
        front = f"http://localhost:{allowed.port}"
        ac.add_tasks(
            [
                {
                    "taskId": "hop-denied",
                    "method": "GET",
                    "url": f"{front}/redirect?to=http://127.0.0.1:{denied.port}/bytes/10",
                },
                {
                    "taskId": "hop-allowed",
                    "method": "GET",
                    "url": f"{front}/redirect?to={front}/bytes/10%3Fseed%3D4",
                },
            ]
        )
        config = make_config(ac.url, tmp_path / "spool", allowed_targets=("localhost",))
        with running(make_pipeline(config)):
            assert ac.wait_for_results(2, WAIT)
        (bad,) = ac.results["hop-denied"]
        assert bad.fields["output"] == (
            "Agent Side Error: redirect to a host outside the allow-list: 127.0.0.1"
        )
        assert denied.connections_opened == 0
        (good,) = ac.results["hop-allowed"]  # a hop inside the list is followed
        assert good.fields["statusCode"] == 200 and good.body_sha256 == expected_sha256(10, 4)
        assert allowed.count("redirect") == 2 and allowed.count("bytes") == 1


# --------------------------------------------------------------------------
# private files
# --------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spool_and_work_files_are_private(tmp_path: Path, open_umask: None) -> None:
    with FakeTarget() as target, FakeACServer() as ac:
        put = ac.stall("put-result")
        upload = ac.stall("upload-result")
        config = make_config(ac.url, tmp_path / "spool")
        pipeline = make_pipeline(config)
        with running(pipeline):
            work = Path(pipeline.work_dir)
            spool = pipeline.spool.directory
            ac.add_task({"taskId": "big", "method": "GET", "url": f"{target.url}/bytes/600000"})
            # the upload stalls after the executor compressed the body in the spool
            assert wait_until(lambda: any(spool.glob("*.body.gz")), WAIT)
            ac.add_task({"taskId": "small", "method": "GET", "url": f"{target.url}/bytes/10"})
            assert wait_until(lambda: pipeline.spool.size() == 2, WAIT)
            files = [p for p in spool.iterdir() if p.name != LOCK_FILE] + list(work.iterdir())
            kinds = sorted({p.name.split(".", 1)[1] for p in files})
            assert kinds == ["body", "body.gz", "json"], kinds
            assert _mode(spool) == 0o700 and _mode(work) == 0o700
            assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
            put.set()
            upload.set()
            assert ac.wait_for_results(2, WAIT)
            assert wait_until(lambda: spool_names(spool) == [], WAIT)
        assert ac.results["big"][0].body_sha256 == expected_sha256(600000, 0)
        assert not work.exists()  # the work folder goes with the pipeline


def test_orphans_cleaned_and_earlier_results_resent_at_start(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    os.chmod(spool, 0o755)
    orphan = spool / ("a" * 32 + ".body")
    orphan.write_bytes(b"left by a crash")
    stale = spool / ("b" * 32 + ".json.tmp")
    stale.write_text('{"half": ')
    foreign = spool / "README.txt"
    foreign.write_text("not the spool's")
    key = "c" * 32
    body = spool / f"{key}.body"
    body.write_bytes(expected_body(3000, 5))
    earlier = Result(
        fields={"taskId": "earlier", "method": "GET", "url": "http://x/"},
        status_code=200,
        response_headers={"Content-Type": "application/octet-stream"},
        body_path=str(body),
        body_size=3000,
        key=key,
    )
    (spool / f"{key}.json").write_text(json.dumps(earlier.to_record()))
    with FakeACServer() as ac:
        pipeline = make_pipeline(make_config(ac.url, spool))
        assert _mode(spool) == 0o700  # made private when opened
        with running(pipeline):
            assert ac.wait_for_results(1, WAIT)
            assert wait_until(
                lambda: spool_names(spool) == ["README.txt"], WAIT
            )
        (got,) = ac.results["earlier"]
        assert got.via == "inline" and got.body_sha256 == expected_sha256(3000, 5)
    assert not orphan.exists() and not stale.exists()
    assert foreign.read_text() == "not the spool's"


# --------------------------------------------------------------------------
# TLS to targets
# --------------------------------------------------------------------------


def test_target_tls_verified_by_default_and_ca_bundle_works(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeTarget(ssl_context=server_ctx) as target, FakeACServer() as ac:
        url = f"{target.url}/bytes/2000?seed=8"
        assert url.startswith("https://")
        ac.add_task({"taskId": "tls-default", "method": "GET", "url": url})
        with running(make_pipeline(make_config(ac.url, tmp_path / "s1"))):
            assert ac.wait_for_results(1, WAIT)
        (refused,) = ac.results["tls-default"]
        assert refused.fields["statusCode"] == 500
        assert "CERTIFICATE_VERIFY_FAILED" in refused.fields["output"], refused.fields["output"]
        assert target.count("bytes") == 0  # no request went over the unverified channel

        ac.add_task({"taskId": "tls-ca", "method": "GET", "url": url})
        config = make_config(ac.url, tmp_path / "s2", ca_bundle=str(ca_file))
        with running(make_pipeline(config)):
            assert ac.wait_for_results(2, WAIT)
        (ok,) = ac.results["tls-ca"]
        assert ok.fields["statusCode"] == 200 and ok.body_sha256 == expected_sha256(2000, 8)
