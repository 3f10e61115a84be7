"""Nothing the AC server (or a proxy on the way) sends is trusted blindly.

* Every AC reply is streamed and capped on its decoded size
  (``actransport.MAX_REPLY_BYTES``); a Content-Encoding the request did not
  accept is refused; the connection of a reply left half-read is closed.
* A get-task reply over the cap is answered as a malformed task when its
  first bytes name ``data.taskId``, else logged in one line and skipped; the
  agent's peak RSS stays within 10 MB of a small task's for a 60 MB reply and
  for a 0.5 MB gzip reply that decodes to 500 MB (a CLI subprocess, its
  kernel-reported VmHWM).
* Every numeric globalConfig value is range-checked like its flag; a bad one
  is one log line and the other keys are applied.
* A request header with a control character, or a name that is not an HTTP
  token, makes the task an error result before anything is sent.
"""

from __future__ import annotations

import gzip
import json
import logging
import signal
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests_mock
from helpers import (
    WAIT,
    AgentProcess,
    make_client,
    make_config,
    make_pipeline,
    peak_rss_kb,
    running,
)
from helpers import result_payload as result

from acagent.ac.client import ACClient, task_id_in_head
from acagent.ac.transport import MAX_REPLY_BYTES, REPLY_HEAD_BYTES, read_capped, unaccepted_codings
from acagent.config import AgentConfig
from acagent.errors import ACHTTPError, ConfigError, TaskError, UnreadReplyError
from acagent.globalconfig import INT_RANGES, value_problem
from acagent.models import header_problem
from acagent.testing import FakeACServer, FakeTarget

MB = 1024 * 1024
RSS_GROWTH_LIMIT_KB = 10 * 1024
OVER_CAP = f"reply decodes to more than {MAX_REPLY_BYTES} bytes"


def task_json(task_id: str, filler: int, *, filler_first: bool = False) -> bytes:
    """A get-task reply whose task carries ``filler`` bytes of request body."""
    head = b'{"data": {"taskId": "%s", "url": "http://tool.invalid/x", "method": "GET", ' % (
        task_id.encode()
    )
    body = b'"input": "' + b"0" * filler + b'"'
    if filler_first:
        return b'{"data": {' + body + b', "taskId": "%s"}}' % task_id.encode()
    return head + body + b"}}"


def gzip_task(task_id: Optional[str], decoded: int) -> bytes:
    """A gzip get-task reply decoding to about ``decoded`` bytes (1 MiB at a time)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    opening = b'{"data": {"taskId": "%s", ' % task_id.encode() if task_id else b'{"data": {'
    parts = [comp.compress(opening + b'"input": "')]
    block = b"0" * MB
    for _ in range(decoded // MB):
        parts.append(comp.compress(block))
    parts.append(comp.compress(b'"}}'))
    parts.append(comp.flush())
    return b"".join(parts)


def chunked(body: bytes, size: int = 8192) -> bytes:
    """``body`` in HTTP/1.1 chunked framing (the fake server adds a Content-Length,
    which a chunked reply's reader ignores)."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


# ---------------------------------------------------------------------------
# pure rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content", "refused"),
    [
        ("gzip, deflate", "", []),
        ("gzip, deflate", "gzip", []),
        ("gzip, deflate", " GZIP ", []),
        ("gzip, deflate", "x-gzip", []),
        ("gzip, deflate", "identity", []),
        ("gzip, deflate", "gzip, gzip", []),
        ("gzip, deflate", "br", ["br"]),
        ("gzip, deflate", "zstd", ["zstd"]),
        ("gzip, deflate", "gzip, br", ["br"]),
        ("gzip, deflate", "compress", ["compress"]),
        ("gzip;q=0, deflate", "gzip", ["gzip"]),
        ("gzip; q=0.000, deflate", "gzip", ["gzip"]),
        ("gzip;q=0.5", "gzip", []),
        ("", "gzip", ["gzip"]),
        ("", "identity", []),
        ("*", "zstd", []),
    ],
)
def test_unaccepted_codings(accept: str, content: str, refused: List[str]) -> None:
    assert unaccepted_codings(accept, content) == refused


def _pieces_then_fail(pieces: List[bytes]) -> Iterator[bytes]:
    yield from pieces
    raise AssertionError("read past the cap")


@pytest.mark.parametrize(
    ("pieces", "cap", "expected"),
    [
        ([], 10, (b"", False)),
        ([b"abc"], 3, (b"abc", False)),
        ([b"ab", b"c"], 3, (b"abc", False)),
        ([b"ab", b"cd"], 3, (b"abcd", True)),
        ([b"x" * REPLY_HEAD_BYTES, b"y" * 10], REPLY_HEAD_BYTES, (b"x" * REPLY_HEAD_BYTES, True)),
    ],
)
def test_read_capped(pieces: List[bytes], cap: int, expected: Tuple[bytes, bool]) -> None:
    over = expected[1]
    source = _pieces_then_fail(pieces) if over else iter(pieces)
    assert read_capped(source, cap) == expected


ID_HEADS = [
    (b'{"data": {"taskId": "t1", "input": "000', "t1"),
    (b'{"data":{"taskId":"t1"', "t1"),
    (b'{"data": {"taskId": 42, "url": "', "42"),
    (b'{"data": {"task\\u0049d": "t4", ', "t4"),
    (b'{"data": {"requestHeaders": {"taskId": "evil"}, "taskId": "real", ', "real"),
    (b'{"data": {"input": "{\\"taskId\\": \\"evil\\"}", "taskId": "t2", ', "t2"),
    (b'{"other": {"taskId": "x"}, "data": {"taskId": "t3"}}', "t3"),
    (b'{"data": {"headers": ["taskId", {"taskId": "x"}], "taskId": "t5"', "t5"),
    # not the task's own id, or not whole
    (b'{"data": {"requestHeaders": {"taskId": "evil"}, "input": "000', None),
    (b'{"data": {"input": "{\\"taskId\\": \\"evil\\"} 000', None),
    (b'{"other": {"taskId": "x"}}', None),
    (b'{"taskId": "top"}', None),
    (b'[{"data": {"taskId": "t"}}]', None),
    (b'{"data": {"taskId": "t', None),
    (b'{"data": {"taskId": 4', None),
    (b'{"data": {"taskId": "  "', None),
    (b'{"data": {"taskId": "' + b"x" * 513 + b'"', None),
    (b'{"data": {"taskId": true', None),
    (b'{"data": {"taskId": "\\x"', None),
    (b'{"data": {"taskId": "t\xff"', None),
    (b'{"data": null}', None),
    (b"", None),
    (b"<html>bad gateway</html>", None),
]


@pytest.mark.parametrize(("head", "task_id"), ID_HEADS)
def test_task_id_in_head(head: bytes, task_id: Optional[str]) -> None:
    assert task_id_in_head(head) == task_id


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("X-Token", "v", None),
        ("X-Token", "", None),
        ("X-Token", "a\tb", None),  # a tab is allowed in a field value
        ("X-Token", "caf\u00e9", None),
        ("!#$%&'*+-.^_`|~09azAZ", "v", None),
        ("X-Token", "a\x00b", "contains a control character"),
        ("X-Token", "a\x0bb", "contains a control character"),
        ("X-Token", "a\x0cb", "contains a control character"),
        ("X-Token", "\x1b[31m", "contains a control character"),
        ("X-Token", "a\x7f", "contains a control character"),
        ("X-Token", "a\r\nX-Evil: 1", "contains a line break"),
        ("X-Token", "a\rb", "contains a line break"),
        ("X-Token\n", "v", "contains a line break"),
        ("X Token", "v", "is not a valid header name"),
        ("X-Token:", "v", "is not a valid header name"),
        ("", "v", "is not a valid header name"),
        ("X\x00Token", "v", "is not a valid header name"),
        ("X-T\u00f6ken", "v", "is not a valid header name"),
        ("X-Token\t", "v", "is not a valid header name"),
    ],
)
def test_header_problem(name: str, value: str, problem: Optional[str]) -> None:
    got = header_problem(name, value)
    assert (got is None) if problem is None else (got is not None and got.startswith(problem))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("debugMode", True, None),
        ("verifyCert", False, None),
        ("uploadToAC", 1, "must be true or false"),
        ("poolSize", 1, None),
        ("poolSize", 2000, None),
        ("poolSize", 0, "must be a whole number from 1 to 2000"),
        ("poolSize", 2001, "must be a whole number from 1 to 2000"),
        ("poolSize", -3, "must be a whole number from 1 to 2000"),
        ("poolSize", True, "must be a whole number from 1 to 2000"),
        ("poolSize", 4.0, "must be a whole number from 1 to 2000"),
        ("rateLimitPerMin", 0, None),
        ("rateLimitPerMin", 10_000_000, None),
        ("rateLimitPerMin", 10**400, "must be a whole number from 0 to 10000000"),
        ("rateLimitPerMin", "5", "must be a whole number from 0 to 10000000"),
        ("rateLimitPerMin", None, "must be a whole number from 0 to 10000000"),
        ("someNewKey", object(), None),
    ],
)
def test_global_config_value_problem(key: str, value: Any, problem: Optional[str]) -> None:
    assert value_problem(key, value) == problem


@pytest.mark.parametrize(
    ("key", "field"),
    [("poolSize", "executor_pool_size"), ("rateLimitPerMin", "rate_limit_per_min")],
)
def test_global_config_ranges_are_those_of_the_flags(key: str, field: str) -> None:
    low, high = INT_RANGES[key]
    for value in (low, high):
        AgentConfig(server_url="http://ac.invalid", api_key="k", **{field: value})
    for value in (low - 1, high + 1):
        with pytest.raises(ConfigError):
            AgentConfig(server_url="http://ac.invalid", api_key="k", **{field: value})


# ---------------------------------------------------------------------------
# the client against a real server
# ---------------------------------------------------------------------------


@pytest.fixture
def ac() -> Iterator[FakeACServer]:
    # "decided": a raw reply the agent hangs up on is not served again
    with FakeACServer(handout="decided") as server:
        yield server


@pytest.fixture
def client(ac: FakeACServer) -> Iterator[ACClient]:
    with make_client(ac) as c:
        yield c


def _opened_by(ac: FakeACServer, client: ACClient, task: Dict[str, Any]) -> int:
    """Connections opened by a get-task that must bring ``task``."""
    ac.add_task(task)
    before = ac.connections_opened
    got = client.get_task()
    assert got is not None and got.task_id == task["taskId"]
    return ac.connections_opened - before


#: (body, headers, whether the agent leaves it half-read on the socket): a
#: reply whose last read takes it over the cap, or one of 64 KB of gzip, is
#: read off the socket to its end, and that connection is reusable
BIG_REPLIES = {
    "plain": (task_json("big-1", 6 * MB), {}, True),
    "plain-just-over": (task_json("big-1", MAX_REPLY_BYTES), {}, False),
    "gzip": (gzip_task("big-1", 64 * MB), {"Content-Encoding": "gzip"}, False),
    "gzip-chunked": (
        chunked(gzip_task("big-1", 128 * MB)),
        {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"},
        True,
    ),
}


@pytest.mark.parametrize("kind", sorted(BIG_REPLIES))
def test_get_task_over_the_cap_is_a_malformed_task_and_its_connection_is_not_reused(
    ac: FakeACServer, client: ACClient, kind: str
) -> None:
    body, headers, half_read = BIG_REPLIES[kind]
    normal = {"taskId": "n", "url": "http://tool.invalid/x", "method": "GET"}
    assert _opened_by(ac, client, normal) == 1  # the first connection
    assert _opened_by(ac, client, normal) == 0  # kept alive and reused
    ac.add_raw_reply(200, body, headers)
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.task_id == "big-1"
    assert info.value.raw == {"taskId": "big-1"}
    assert info.value.reason == f"get-task: {OVER_CAP}"
    # The next get-task brings the next task (on a half-read connection it
    # would read the rest of the body as its reply), on a new connection if
    # the last one was left half-read.
    assert _opened_by(ac, client, normal) == (1 if half_read else 0)
    assert _opened_by(ac, client, normal) == 0


def test_get_task_over_the_cap_without_its_id_first_is_an_unread_reply(
    ac: FakeACServer, client: ACClient
) -> None:
    ac.add_raw_reply(200, task_json("late", 6 * MB, filler_first=True))
    with pytest.raises(UnreadReplyError, match=f"^get-task: {OVER_CAP}$"):
        client.get_task()
    ac.add_raw_reply(200, gzip_task(None, 64 * MB), {"Content-Encoding": "gzip"})
    with pytest.raises(UnreadReplyError, match=f"^get-task: {OVER_CAP}$"):
        client.get_task()


@pytest.mark.parametrize("framing", ["plain", "gzip", "deflate", "gzip-chunked", "chunked"])
def test_replies_under_the_cap_are_decoded_and_parsed(
    ac: FakeACServer, client: ACClient, framing: str
) -> None:
    body = task_json("small", 100_000)
    headers: Dict[str, str] = {}
    if framing.startswith("gzip"):
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    elif framing == "deflate":
        body, headers = zlib.compress(body), {"Content-Encoding": "deflate"}
    if framing.endswith("chunked"):
        body, headers = chunked(body), {**headers, "Transfer-Encoding": "chunked"}
    ac.add_raw_reply(200, body, headers)
    got = client.get_task()
    assert got is not None and got.task_id == "small" and got.input == "0" * 100_000


def test_a_reply_of_exactly_the_cap_is_read_whole(ac: FakeACServer, client: ACClient) -> None:
    body = task_json("edge", 0)
    client.transport.max_reply_bytes = len(body)
    ac.add_raw_reply(200, body)
    got = client.get_task()
    assert got is not None and got.task_id == "edge"
    ac.add_raw_reply(200, body + b" ")
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.task_id == "edge"


@pytest.mark.parametrize("coding", ["compress", "gzip, compress", "sdch"])
def test_a_content_encoding_not_asked_for_is_refused(
    ac: FakeACServer, client: ACClient, coding: str
) -> None:
    ac.add_raw_reply(200, zlib.compress(task_json("t", 10)), {"Content-Encoding": coding})
    with pytest.raises(UnreadReplyError) as info:
        client.get_task()
    asked = ac.requests[-1].headers.get("Accept-Encoding", "")
    assert unaccepted_codings(asked, coding), (asked, coding)  # the client did not ask for it
    assert "which the agent did not ask for" in str(info.value)
    assert str(info.value).startswith("get-task: reply has Content-Encoding ")


def test_an_error_reply_over_the_cap_keeps_its_status(ac: FakeACServer, client: ACClient) -> None:
    ac.add_raw_reply(503, b"<html>" + b"x" * (6 * MB), {"Content-Type": "text/html"})
    with pytest.raises(ACHTTPError) as info:
        client.get_task()
    assert info.value.status == 503 and not isinstance(info.value, UnreadReplyError)
    assert info.value.body.startswith("<html>xxx") and len(info.value.body) <= 500


def test_upload_replies_are_judged_by_their_status(ac: FakeACServer, client: ACClient) -> None:
    # put-result's body is never read for meaning: a big 2xx one is still a success
    ac.inject("put-result", status=200, body=b"x" * (6 * MB), process=True)
    client.put_result(result("r1"))
    assert [r.fields["taskId"] for r in ac.all_results()] == ["r1"]
    # upload-url's is parsed: over the cap it is refused
    ac.inject("upload-url", status=200, body=b'{"data": {"putUrl": "' + b"x" * (6 * MB))
    with pytest.raises(UnreadReplyError, match=f"^upload-url: {OVER_CAP}$"):
        client.get_upload_url("f.txt")


def test_the_cap_holds_on_a_transport_that_is_not_a_urllib3_pool(client: ACClient) -> None:
    adapter = requests_mock.Adapter()  # a session adapter that is not an HTTPAdapter
    client.session.mount("http://", adapter)
    adapter.register_uri("GET", requests_mock.ANY, content=task_json("mocked", 6 * MB))
    with pytest.raises(TaskError) as info:
        client.get_task()
    assert info.value.task_id == "mocked" and info.value.reason == f"get-task: {OVER_CAP}"
    adapter.register_uri(
        "GET", requests_mock.ANY, content=b"{}", headers={"Content-Encoding": "compress"}
    )
    with pytest.raises(UnreadReplyError, match="did not ask for"):
        client.get_task()
    assert adapter.call_count == 2


# ---------------------------------------------------------------------------
# the agent: pipelines and a CLI subprocess
# ---------------------------------------------------------------------------


@pytest.fixture
def acagent_level() -> Iterator[None]:
    """Restores the ``acagent`` logger's level (globalConfig debugMode changes it)."""
    logger = logging.getLogger("acagent")
    level = logger.level
    yield
    logger.setLevel(level)


def test_an_unnamed_task_over_the_cap_is_logged_once_and_skipped(
    ac: FakeACServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="acagent")
    ac.add_raw_reply(200, task_json("late", 6 * MB, filler_first=True))
    ac.add_raw_reply(200, task_json("named", 6 * MB))
    with running(make_pipeline(make_config(ac.url, tmp_path / "spool"))):
        assert ac.wait_for_results(1, WAIT)
        assert ac.pending_tasks() == 0
    got = ac.all_results()
    assert [(r.fields["taskId"], r.via) for r in got] == [("named", "error")]
    assert got[0].fields["output"] == f"Agent Side Error: malformed task: get-task: {OVER_CAP}"
    about = [r for r in caplog.records if OVER_CAP in r.getMessage()]
    assert [(r.levelno, r.exc_info, r.getMessage().count("\n")) for r in about] == [
        (logging.WARNING, None, 0),  # the unnamed one: one line, no traceback
        (logging.WARNING, None, 0),  # "task named is malformed: ..."
    ]
    assert "late" not in caplog.text


def test_a_bad_global_config_value_is_one_line_and_the_other_keys_apply(
    ac: FakeACServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    acagent_level: None,
) -> None:
    caplog.set_level(logging.INFO, logger="acagent")
    logging.getLogger("acagent").setLevel(logging.INFO)
    settings = {"rateLimitPerMin": 10**400, "poolSize": -3, "debugMode": True}
    config = make_config(ac.url, tmp_path / "spool", executor_pool_size=3, rate_limit_per_min=0)
    with FakeTarget() as target, running(make_pipeline(config)) as agent:
        for task_id in ("g1", "g2"):
            url = f"{target.url}/bytes/10"
            ac.add_task({"taskId": task_id, "url": url, "method": "GET", "globalConfig": settings})
        assert ac.wait_for_results(2, WAIT)
        assert [ac.results[t][0].via for t in ("g1", "g2")] == ["inline", "inline"]
        assert logging.getLogger("acagent").level == logging.DEBUG  # debugMode applied
        assert agent.executor.size == 3
        assert agent.rate_limits.per_minute == 0
    ignored = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in ignored] == [(logging.WARNING, None)] * 2
    huge, negative = (r.getMessage() for r in ignored)  # once each, though two tasks had them
    assert huge.startswith("globalConfig rateLimitPerMin=1000") and len(huge) < 150, huge
    assert "..." in huge and huge.endswith("0 ignored: must be a whole number from 0 to 10000000")
    assert negative == "globalConfig poolSize=-3 ignored: must be a whole number from 1 to 2000"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_header_with_a_control_character_is_an_error_and_nothing_is_sent(
    ac: FakeACServer, tmp_path: Path
) -> None:
    bad_headers = {
        "nul": {"X-Token": "abc\x00def"},
        "vt": {"X-Token": "abc\x0b"},
        "ff": {"X-Token": "\x0cabc"},
        "del": {"X-Token": "abc\x7f"},
        "esc": {"X-Token": "\x1b[2J"},
        "space-in-name": {"X Token": "abc"},
        "colon-in-name": {"X-Token:": "abc"},
    }
    with FakeTarget() as target:
        for task_id, headers in bad_headers.items():
            ac.add_task(
                {
                    "taskId": task_id,
                    "url": f"{target.url}/echo",
                    "method": "GET",
                    "requestHeaders": headers,
                }
            )
        with running(make_pipeline(make_config(ac.url, tmp_path / "spool"))):
            assert ac.wait_for_results(len(bad_headers), WAIT)
        assert target.requests == []
    for task_id, headers in bad_headers.items():
        (got,) = ac.results[task_id]
        name = next(iter(headers))
        assert got.via == "error"
        assert got.fields["output"].startswith(
            f"Agent Side Error: malformed task: request header {name!r} "
        ), got.fields["output"]


# -- peak RSS of the CLI ------------------------------------------------------


def agent_peak_rss(
    tmp: Path, body: bytes, headers: Dict[str, str], task_id: str
) -> Tuple[int, str]:
    """One CLI agent, one raw get-task reply: (peak RSS kB, the result's output)."""
    spool = tmp / "spool"
    spool.mkdir(parents=True)
    with FakeACServer(handout="decided") as ac:
        ac.add_raw_reply(200, body, headers)
        with AgentProcess(ac.url, spool, tmp / "agent.log") as agent:
            assert ac.wait_for_results(1, WAIT), agent.output()
            peak = peak_rss_kb(agent.pid)
            agent.signal(signal.SIGTERM)
            assert agent.wait(WAIT) == 0, agent.output()
        assert "Traceback" not in agent.output(), agent.output()
        (got,) = ac.results[task_id]
        return peak, str(got.fields.get("output"))


@pytest.fixture(scope="module")
def gzip_bomb_task() -> bytes:
    return gzip_task("bomb", 500 * MB)


def test_the_agent_stays_within_10_mb_for_a_60_mb_and_a_500_mb_gzip_task(
    tmp_path: Path, gzip_bomb_task: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(gzip_bomb_task) < 600_000
    small = json.dumps(
        {"data": {"taskId": "small", "url": "http://tool.invalid/x", "method": "BOGUS"}}
    ).encode()
    base_rss, base_output = agent_peak_rss(tmp_path / "base", small, {}, "small")
    plain_rss, plain_output = agent_peak_rss(
        tmp_path / "plain", task_json("plain", 60 * MB), {}, "plain"
    )
    bomb_rss, bomb_output = agent_peak_rss(
        tmp_path / "bomb", gzip_bomb_task, {"Content-Encoding": "gzip"}, "bomb"
    )
    with capsys.disabled():
        print(
            f"\nagent peak RSS: small task {base_rss / 1024:.1f} MB, "
            f"60 MB task {plain_rss / 1024:.1f} MB ({(plain_rss - base_rss) / 1024:+.1f}), "
            f"{len(gzip_bomb_task)} B gzip -> 500 MB task {bomb_rss / 1024:.1f} MB "
            f"({(bomb_rss - base_rss) / 1024:+.1f})"
        )
    assert base_output == "Agent Side Error: malformed task: unknown method 'BOGUS'"
    expected = f"Agent Side Error: malformed task: get-task: {OVER_CAP}"
    assert plain_output == expected and bomb_output == expected
    assert plain_rss - base_rss <= RSS_GROWTH_LIMIT_KB, (plain_rss, base_rss)
    assert bomb_rss - base_rss <= RSS_GROWTH_LIMIT_KB, (bomb_rss, base_rss)
