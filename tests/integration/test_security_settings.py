"""Security settings: the policy flags, the spool at rest, the health listener's bind."""

from __future__ import annotations

import json
import stat
import urllib.request
from pathlib import Path

import pytest
from helpers import WAIT, make_config, make_pipeline, running, wait_until
from prometheus_client import CollectorRegistry

from acagent.cli.options import config_from_args
from acagent.config import parse_host_port
from acagent.health import HealthServer
from acagent.models import Result
from acagent.targets import policy as allowlist
from acagent.targets.policy import DEFAULT_DENIED, TargetDenied, TargetPolicy
from acagent.targets.session import build_target_session
from acagent.testing import FakeACServer, FakeTarget

BASE = ["--serverUrl", "https://ac.example", "--apiKey", "k"]
TOOL_TOKEN = "glpat-T00LS3CRET"
BODY_SECRET = "grant_type=password&password=B0DYS3CRET"


# -- flags ------------------------------------------------------------------


def test_policy_flags_parse_and_the_default_deny_list_can_be_cleared() -> None:
    cfg = config_from_args(
        [
            *BASE,
            "--deniedTargets",
            "10.9.0.0/16, *.secret.corp",
            "--allowedUploadHosts",
            "minio.corp,10.20.0.0/16",
            "--sensitiveHeaders",
            "X-Tenant-Sig,X-Other",
        ],
        {},
    )
    assert cfg.denied_targets == ("10.9.0.0/16", "*.secret.corp")
    assert cfg.allowed_upload_hosts == ("minio.corp", "10.20.0.0/16")
    assert cfg.sensitive_headers == ("X-Tenant-Sig", "X-Other")
    policy = TargetPolicy(cfg.allowed_targets, cfg.denied_targets)
    expected = {"169.254.169.254/32", "fd00:ec2::254/128", "169.254.0.0/16", "fe80::/10"}
    assert len(DEFAULT_DENIED) == 4
    assert expected | {"10.9.0.0/16", "*.secret.corp"} == set(policy.deny.describe())
    with pytest.raises(TargetDenied):
        policy.check_host("169.254.169.254")
    with pytest.raises(TargetDenied):
        policy.check_host("db.secret.corp")
    for link_local in ("fe80::1", "fe80::a9fe:a9fe", "febf::1", "::ffff:169.254.169.254"):
        with pytest.raises(TargetDenied):
            policy.check_host(link_local)
    assert policy.check_host("fec0::1") is False  # just outside fe80::/10: not denied by default
    cleared = config_from_args([*BASE, "--deniedTargets", "no-defaults"], {})
    policy = TargetPolicy(cleared.allowed_targets, cleared.denied_targets)
    assert policy.deny.describe() == ()
    assert policy.check_host("169.254.169.254") is False  # allowed; the address is checked too


def test_each_url_is_checked_once_per_request_and_every_refusal_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The executor checks a task's URL; the adapter checks the URL requests
    sends only when preparing changed it, or when nobody checked it before.
    Nothing is remembered from one check to the next."""
    parsed: list = []
    real = allowlist.unambiguous_host

    def counting(url: str) -> str:
        parsed.append(url)
        return real(url)

    monkeypatch.setattr(allowlist, "unambiguous_host", counting)
    policy = TargetPolicy(("127.0.0.1",))
    with FakeTarget() as target, build_target_session(policy, 2) as session:

        def executor_call(url: str) -> bytes:
            reply = session.request_checked(
                "GET",
                url,
                policy.check_url(url),
                headers={},
                data=None,
                timeout=(WAIT, WAIT),
                verify=True,
                proxies=None,
            )
            with reply:
                return reply.content

        same = f"{target.url}/bytes/3?seed=1"
        assert executor_call(same) == executor_call(same) and len(executor_call(same)) == 3
        assert parsed == [same] * 3  # once per request, never remembered
        parsed.clear()
        changed = f"{target.url}/bytes/2?x=caf\u00e9"  # requests percent-encodes it
        assert len(executor_call(changed)) == 2
        assert parsed == [changed, f"{target.url}/bytes/2?x=caf%C3%A9"]
        parsed.clear()
        with session.get(same, timeout=WAIT) as reply:  # not checked before: the adapter does
            assert reply.status_code == 200
        assert parsed == [same]
    parsed.clear()
    by_name = TargetPolicy(("tool.corp",))
    for _ in range(2):
        with pytest.raises(TargetDenied):
            by_name.check_url("https://other.corp/")
        with pytest.raises(TargetDenied):
            by_name.check_url("http://tool.corp\\@other.corp/")
    assert len(parsed) == 4


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--deniedTargets", "10.0.0.0/99"], "--deniedTargets"),
        (["--allowedUploadHosts", "::1/999"], "--allowedUploadHosts"),
        (["--sensitiveHeaders", "X-Bad Header"], "--sensitiveHeaders"),
    ],
)
def test_bad_policy_flag_exits_2_naming_it(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        config_from_args([*BASE, *argv], {})
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


# -- spool at rest ------------------------------------------------------------


def test_spool_records_keep_no_request_headers_or_input(tmp_path: Path, open_umask: None) -> None:
    with FakeTarget() as target, FakeACServer() as ac:
        hold = ac.stall("put-result")
        ac.add_task(
            {
                "taskId": "with-creds",
                "method": "POST",
                "url": f"{target.url}/echo",
                "requestHeaders": {"PRIVATE-TOKEN": TOOL_TOKEN, "Content-Type": "text/plain"},
                "input": BODY_SECRET,
                "customField": "echoed",
            }
        )
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool"))
        with running(pipeline):
            spool = pipeline.spool.directory
            assert wait_until(lambda: any(spool.glob("*.json")), WAIT)
            (record_path,) = list(spool.glob("*.json"))
            record_text = record_path.read_text()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in spool.iterdir()}
            folder_mode = stat.S_IMODE(spool.stat().st_mode)
            hold.set()
            assert ac.wait_for_results(1, WAIT)
        (got,) = ac.results["with-creds"]
    assert TOOL_TOKEN not in record_text and "B0DYS3CRET" not in record_text
    record = json.loads(record_text)
    assert "requestHeaders" not in record["fields"] and "input" not in record["fields"]
    assert (
        record["fields"]["customField"] == "echoed" and record["fields"]["taskId"] == "with-creds"
    )
    assert folder_mode == 0o700 and set(modes.values()) == {0o600}, (folder_mode, modes)
    # the live result still echoes the whole task (docs/protocol.md) and the body is intact
    assert got.fields["customField"] == "echoed"
    assert json.loads(got.body or b"{}")["headers"]["PRIVATE-TOKEN"] == TOOL_TOKEN


def test_record_round_trip_drops_only_credentials() -> None:
    result = Result(
        fields={"taskId": "t", "url": "http://x/", "requestHeaders": {"A": "b"}, "input": "i"},
        status_code=200,
        response_headers={"Content-Type": "text/plain"},
    )
    again = Result.from_record(json.loads(json.dumps(result.to_record())))
    assert again.fields == {"taskId": "t", "url": "http://x/"}
    assert again.status_code == 200 and again.response_headers == result.response_headers
    assert result.fields["requestHeaders"] == {"A": "b"}  # the live result is untouched


# -- health listener ------------------------------------------------------------


def test_host_less_health_addr_binds_loopback_only() -> None:
    assert parse_host_port(":9100") == ("127.0.0.1", 9100)
    assert parse_host_port("0.0.0.0:9100") == ("0.0.0.0", 9100)  # explicit: exposed on purpose
    server = HealthServer(
        "",
        0,
        liveness=lambda: (True, "ok"),
        readiness=lambda: (True, "ok"),
        registry=CollectorRegistry(),
    )
    with server:
        host, port = server.address
        assert host == "127.0.0.1"
        assert server._server is not None
        assert server._server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            assert reply.status == 200
