"""Hostile and broken input: each has a defined outcome, never a crash or a hang.

The outcome is either an ``Agent Side Error`` result (statusCode 500) or, when
there is no task id to answer, a logged skip. After each case the same running
pipeline must still process a normal task (no dead thread). The last test
feeds random task objects through ``Task.parse`` and ``Executor.execute``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from helpers import WAIT, make_config, make_pipeline, running, spool_names, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acagent.errors import TaskError
from acagent.models import ERROR_PREFIX, Result, Task, error_payload
from acagent.pipeline import Pipeline
from acagent.testing import FakeACServer, FakeTarget, closed_port_url, expected_sha256


class Agent:
    """A running pipeline with its fake AC server and target."""

    def __init__(self, ac: FakeACServer, target: FakeTarget, pipeline: Pipeline) -> None:
        self.ac = ac
        self.target = target
        self.pipeline = pipeline
        self._normal = 0

    def run_task(self, task: Dict[str, Any], timeout: float = WAIT) -> Dict[str, Any]:
        """Queue ``task`` and return the fields of its one result."""
        self.ac.add_task(task)
        task_id = task["taskId"]
        assert self.ac.wait_for(lambda: task_id in self.ac.results, timeout), task_id
        (got,) = self.ac.results[task_id]
        return got.fields

    def still_works(self) -> None:
        """A normal task still gets its correct result; every stage thread lives."""
        self._normal += 1
        n = self._normal
        task_id = f"normal-{n}"
        fields = self.run_task(
            {
                "taskId": task_id,
                "method": "GET",
                "url": f"{self.target.url}/bytes/{100 + n}?seed={n}",
            }
        )
        (got,) = self.ac.results[task_id]
        assert fields["statusCode"] == 200
        assert got.body_sha256 == expected_sha256(100 + n, n)
        assert self.pipeline.liveness() == (True, "ok")
        assert self.ac.errors == [] and self.target.errors == []


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start an agent with config changes; everything is stopped at the end."""
    stack: List[Any] = []

    def start(**changes: Any) -> Agent:
        target = FakeTarget().start()
        stack.append(target)
        ac = FakeACServer().start()
        stack.append(ac)
        changes.setdefault("executor_pool_size", 4)
        config = make_config(ac.url, tmp_path / f"spool{len(stack)}", **changes)
        pipeline = make_pipeline(config)
        ctx = running(pipeline, stop_timeout=5.0)
        ctx.__enter__()
        stack.append(ctx)
        return Agent(ac, target, pipeline)

    yield start
    for item in reversed(stack):
        if hasattr(item, "__exit__") and not isinstance(item, (FakeACServer, FakeTarget)):
            item.__exit__(None, None, None)
        else:
            item.stop()


@pytest.fixture
def agent(agent_factory: Callable[..., Agent]) -> Agent:
    return agent_factory()


def _error_text(fields: Dict[str, Any]) -> str:
    assert fields["statusCode"] == 500, fields
    assert "responseBase64" not in fields
    output = fields["output"]
    assert output.startswith(ERROR_PREFIX), output
    return str(output[len(ERROR_PREFIX) :])


# --------------------------------------------------------------------------
# get-task replies the protocol does not allow: a logged skip
# --------------------------------------------------------------------------




BAD_REPLIES: List[Tuple[int, bytes]] = [
    (200, b"this is not json"),
    (200, b"\xff\xfe\x00 binary garbage"),
    (200, b'{"data": {"taskId": "cut-off", "url": "http://'),
    (200, b"[1, 2, 3]"),
    (200, b'"just a string"'),
    (200, b'{"data": [1, 2]}'),
    (200, b'{"data": "a string"}'),
    (200, b'{"data": 42}'),
    (200, b'{"data": true}'),
    (200, b'{"data": {}}'),
    (200, b'{"data": {"url": "http://x/", "method": "GET"}}'),
    (200, b'{"data": {"taskId": "", "url": "http://x/", "method": "GET"}}'),
    (200, b'{"data": {"taskId": ["a"], "url": "http://x/", "method": "GET"}}'),
    (500, b"internal error"),
    (404, b"<html>not found</html>"),
    (302, b""),
]


@pytest.mark.parametrize(
    "status, body", BAD_REPLIES, ids=[f"{s}-{b[:22]!r}" for s, b in BAD_REPLIES]
)
def test_bad_get_task_reply_is_a_logged_skip(
    agent: Agent, fetcher_log: List[logging.LogRecord], status: int, body: bytes
) -> None:
    agent.ac.add_raw_reply(status, body, {"Content-Type": "application/json"})
    assert agent.ac.wait_for(lambda: agent.ac.pending_tasks() == 0, WAIT)
    agent.still_works()
    assert set(agent.ac.results) == {"normal-1"}  # no result was invented
    assert [r for r in fetcher_log if r.levelno >= logging.WARNING], "the skip was not logged"


# --------------------------------------------------------------------------
# malformed tasks with a usable id: an error result naming the problem
# --------------------------------------------------------------------------

GOOD = {"method": "GET", "url": "http://127.0.0.1:9/unused"}

MALFORMED: List[Tuple[str, Dict[str, Any], str]] = [
    ("no-url", {"method": "GET"}, "task has no url"),
    ("url-number", {"method": "GET", "url": 12345}, "task has no url"),
    ("no-method", {"url": "http://127.0.0.1:9/"}, "task has no method"),
    ("method-list", {**GOOD, "method": ["GET"]}, "task has no method"),
    ("unknown-method", {**GOOD, "method": "FETCH"}, "unknown method 'FETCH'"),
    ("ftp-url", {**GOOD, "url": "ftp://127.0.0.1/file"}, "url scheme must be http or https"),
    ("file-url", {**GOOD, "url": "file:///etc/passwd"}, "url scheme must be http or https"),
    ("no-scheme", {**GOOD, "url": "127.0.0.1:8080/x"}, "url scheme must be"),
    ("bad-ipv6", {**GOOD, "url": "http://[::1/x"}, "malformed url"),
    ("bad-port", {**GOOD, "url": "http://127.0.0.1:99999/x"}, "malformed url"),
    ("no-host", {**GOOD, "url": "http:///x"}, "url has no host"),
    ("space-in-url", {**GOOD, "url": "http://127.0.0.1/a b"}, "whitespace"),
    ("header-object", {**GOOD, "requestHeaders": {"X-A": {"n": 1}}}, "must be a string"),
    ("header-list", {**GOOD, "requestHeaders": {"X-A": ["v"]}}, "must be a string"),
    ("header-bool", {**GOOD, "requestHeaders": {"X-A": True}}, "must be a string"),
    ("headers-not-object", {**GOOD, "requestHeaders": ["X-A: v"]}, "must be an object"),
    ("header-crlf", {**GOOD, "requestHeaders": {"X-A": "v\r\nX-Injected: 1"}}, "line break"),
    ("input-number", {**GOOD, "input": 12}, "input must be a string"),
    ("input-object", {**GOOD, "input": {"a": 1}}, "input must be a string"),
    ("expiry-text", {**GOOD, "expiryTsMs": "tomorrow"}, "expiryTsMs must be a number"),
    ("expiry-bool", {**GOOD, "expiryTsMs": True}, "expiryTsMs must be a number"),
]


@pytest.mark.parametrize("case, task, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_task_gets_an_error_result(
    agent: Agent, case: str, task: Dict[str, Any], reason: str
) -> None:
    fields = agent.run_task({"taskId": f"bad-{case}", "keepMe": [1, {"x": None}], **task})
    text = _error_text(fields)
    assert text.startswith("malformed task: "), text
    assert reason in text, text
    assert fields["keepMe"] == [1, {"x": None}]  # unknown fields echoed unchanged
    assert agent.target.connections_opened == 0  # nothing was sent anywhere
    agent.still_works()


def test_expired_task_is_not_run(agent: Agent) -> None:
    past = int(time.time() * 1000) - 1000
    url = f"{agent.target.url}/bytes/10"
    fields = agent.run_task({"taskId": "expired", "method": "GET", "url": url, "expiryTsMs": past})
    assert "expired" in _error_text(fields)
    assert agent.target.connections_opened == 0
    agent.still_works()


def test_header_values_numbers_and_nulls_are_tolerated(agent: Agent) -> None:
    task = {
        "taskId": "loose-headers",
        "method": "post",
        "url": f"{agent.target.url}/echo",
        "requestHeaders": {"X-Num": 7, "X-Float": 1.5, "X-Null": None, "X-Str": "s"},
        "input": "héllo",
    }
    fields = agent.run_task(task)
    assert fields["statusCode"] == 200
    (got,) = agent.ac.results["loose-headers"]
    echo = json.loads(got.body or b"{}")
    assert echo["method"] == "POST"
    assert echo["headers"]["X-Num"] == "7" and echo["headers"]["X-Float"] == "1.5"
    assert "X-Null" not in echo["headers"]
    assert echo["body"] == "héllo"
    agent.still_works()


@pytest.mark.parametrize(
    "value",
    ["\ud800 lone surrogate", "ok \udfff"],
    ids=["high-surrogate", "low-surrogate"],
)
def test_input_that_is_not_encodable_gets_an_error_result(agent: Agent, value: str) -> None:
    # JSON can carry a lone surrogate ("\ud800"); it has no UTF-8 form.
    fields = agent.run_task(
        {"taskId": "surrogate", "method": "POST", "url": f"{agent.target.url}/echo", "input": value}
    )
    assert "UTF-8" in _error_text(fields)  # refused by Task.parse or by the executor
    assert agent.target.connections_opened == 0
    agent.still_works()


def test_global_config_with_wrong_types_keeps_old_settings(agent: Agent) -> None:
    pipeline = agent.pipeline
    before = (
        pipeline.executor.size,
        pipeline.settings.upload_to_ac,
        pipeline.client.verify,
        pipeline.settings.verify,
        pipeline.rate_limits.per_minute,
        logging.getLogger("acagent").level,
    )
    bad_configs: List[Any] = [
        {"poolSize": "50", "debugMode": "yes", "verifyCert": 0, "uploadToAC": "false"},
        {"poolSize": 0, "rateLimitPerMin": -5},
        {"poolSize": 10**9, "rateLimitPerMin": "lots"},
        {"poolSize": True, "rateLimitPerMin": 1.5, "debugMode": None, "verifyCert": "no"},
        ["poolSize", 3],
        "debugMode=true",
        {"futureSetting": {"x": 1}},
    ]
    for n, settings_obj in enumerate(bad_configs):
        task = {
            "taskId": f"gc-{n}",
            "method": "GET",
            "url": f"{agent.target.url}/bytes/64?seed={n}",
            "globalConfig": settings_obj,
        }
        fields = agent.run_task(task)
        assert fields["statusCode"] == 200, fields  # the task itself runs
        assert fields["globalConfig"] == settings_obj  # and is echoed
    after = (
        pipeline.executor.size,
        pipeline.settings.upload_to_ac,
        pipeline.client.verify,
        pipeline.settings.verify,
        pipeline.rate_limits.per_minute,
        logging.getLogger("acagent").level,
    )
    assert after == before
    # A valid key next to invalid ones is still applied.
    fields = agent.run_task(
        {
            "taskId": "gc-valid",
            "method": "GET",
            "url": f"{agent.target.url}/bytes/8",
            "globalConfig": {"poolSize": 6, "debugMode": "maybe"},
        }
    )
    assert fields["statusCode"] == 200
    assert pipeline.executor.size == 6
    agent.still_works()


# --------------------------------------------------------------------------
# targets that misbehave
# --------------------------------------------------------------------------

TARGET_FAULTS: List[Tuple[str, str, str, Dict[str, Any]]] = [
    ("refused", "{dead}/bytes/10", "target unreachable", {}),
    ("timeout", "{target}/slow-headers?latency=3", "target timed out", {"timeout": 0.3}),
    ("reset-mid-body", "{target}/reset/200000", "response body broken", {}),
    ("wrong-length", "{target}/wrong-length/5000", "response body broken", {}),
    ("bad-encoding", "{target}/bad-encoding/5000", "invalid Content-Encoding", {}),
    (
        "forever-capped",
        "{target}/forever",
        "response larger than 2000000 bytes",
        {"max_response_bytes": 2_000_000},
    ),
    (
        "too-large",
        "{target}/bytes/5001",
        "response larger than 5000 bytes",
        {"max_response_bytes": 5000},
    ),
]


@pytest.mark.parametrize(
    "case, url, reason, changes", TARGET_FAULTS, ids=[t[0] for t in TARGET_FAULTS]
)
def test_misbehaving_target_gets_an_error_result(
    agent_factory: Callable[..., Agent], case: str, url: str, reason: str, changes: Dict[str, Any]
) -> None:
    agent = agent_factory(**changes)
    full = url.format(target=agent.target.url, dead=closed_port_url())
    started = time.monotonic()
    fields = agent.run_task({"taskId": case, "method": "GET", "url": full})
    took = time.monotonic() - started
    text = _error_text(fields)
    assert text.startswith(reason), text
    assert took < 5, took  # bounded by the timeout / cap, not by the target
    agent.still_works()


def test_endless_body_is_bounded_by_the_task_expiry(agent: Agent) -> None:
    expiry = int(time.time() * 1000) + 1500
    url = f"{agent.target.url}/forever"
    started = time.monotonic()
    fields = agent.run_task(
        {"taskId": "forever", "method": "GET", "url": url, "expiryTsMs": expiry}
    )
    took = time.monotonic() - started
    assert _error_text(fields) == "task expired while reading the response"
    assert took < 5, took
    # the record goes once the acceptance is processed; the partial body went before
    spool = agent.pipeline.spool
    assert wait_until(lambda: spool_names(spool.directory) == [], WAIT)
    agent.still_works()


def test_error_results_and_normal_results_mix_on_one_agent(agent: Agent) -> None:
    """Many broken tasks at once: the executor threads all survive."""
    dead = closed_port_url()
    tasks = []
    for i in range(24):
        kind = i % 4
        url = [
            f"{agent.target.url}/reset/50000?seed={i}",
            f"{agent.target.url}/bad-encoding/100",
            f"{dead}/x",
            f"{agent.target.url}/bytes/{i + 1}?seed={i}",
        ][kind]
        tasks.append({"taskId": f"mix-{i}", "method": "GET", "url": url})
    agent.ac.add_tasks(tasks)
    assert agent.ac.wait_for_results(24, WAIT)
    for i in range(24):
        (got,) = agent.ac.results[f"mix-{i}"]
        if i % 4 == 3:
            assert got.fields["statusCode"] == 200
            assert got.body_sha256 == expected_sha256(i + 1, i)
        else:
            assert got.via == "error"
    agent.still_works()


# --------------------------------------------------------------------------
# property: random task objects
# --------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
_methods = st.sampled_from(
    [
        "GET",
        "get",
        "Post",
        "PUT",
        "DELETE",
        "HEAD",
        "OPTIONS",
        "PATCH",
        "TRACE",
        " get ",
        "FETCH",
        "",
    ]
)
_paths = st.sampled_from(
    [
        "/bytes/0",
        "/bytes/1",
        "/bytes/700?seed=3",
        "/bytes/3000?encoding=gzip&chunked=1",
        "/bytes/20?status=503",
        "/echo",
        "/reset/4000",
        "/wrong-length/300",
        "/bad-encoding/300",
        "/slow-headers?latency=0.05",
        "/redirect?to=/bytes/5",
        "/redirect?to=http://denied.example/x",
        "/no-such-route",
        "/%zz?%%",
    ]
)
_surrogates = st.sampled_from(["\ud800", "ok \udfff", "\udc80\udc81"])
_header_values = st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), _json)


class _Offset(int):
    """Milliseconds from now; turned into an absolute ``expiryTsMs`` by the test."""


@st.composite
def _task_objects(draw: Any, target_url: str) -> Any:
    """A random task object: one in four is chaos, the rest mostly well-formed."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_json)  # not even an object
    wild = draw(st.integers(0, 3)) == 0

    def field(sane: Any, junk: Any) -> Any:
        """Mostly ``sane``; junk always when wild, else one time in ten."""
        if wild or draw(st.integers(0, 9)) == 0:
            return draw(st.one_of(sane, junk))
        return draw(sane)

    obj: Dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        obj["taskId"] = field(st.from_regex(r"\A[a-zA-Z0-9_-]{1,12}\Z"), _json)
    if draw(st.integers(0, 9)) > 0:
        obj["url"] = field(
            _paths.map(lambda p: target_url + p),
            st.one_of(
                st.text(max_size=30),
                st.sampled_from(["ftp://x/", "http://", "http://[::1", "https://denied.example/"]),
                _json,
            ),
        )
    if draw(st.integers(0, 9)) > 0:
        obj["method"] = field(_methods, _json)
    if draw(st.booleans()):
        obj["requestHeaders"] = field(
            st.dictionaries(
                st.from_regex(r"\AX-[A-Za-z]{1,6}\Z"), st.text(max_size=12), max_size=3
            ),
            st.one_of(st.dictionaries(st.text(max_size=10), _header_values, max_size=3), _json),
        )
    if draw(st.booleans()):
        obj["input"] = field(
            st.one_of(st.text(max_size=40), st.text(max_size=40), _surrogates), _json
        )
    if draw(st.booleans()):
        # a deadline relative to "now", fixed when the example runs (_Offset)
        obj["expiryTsMs"] = field(
            st.integers(-10_000, 60_000).map(_Offset), st.one_of(st.floats(allow_nan=True), _json)
        )
    if draw(st.booleans()):
        obj["globalConfig"] = draw(_json)
    if wild:
        obj.update(draw(st.dictionaries(st.text(max_size=8), _json, max_size=2)))
    return obj


def test_random_task_objects_parse_and_execute_without_escaping(tmp_path: Path) -> None:
    with FakeTarget() as target:
        config = make_config(
            "http://127.0.0.1:9",
            tmp_path / "spool",
            allowed_targets=("127.0.0.1",),
            timeout=2.0,
            connect_timeout=2.0,
        )
        pipeline = make_pipeline(config)  # never started: its executor is used directly
        executor = pipeline.executor
        seen = {"parsed": 0, "executed": 0, "errors": 0}

        # The same 150 examples on every run (derandomize): a failure repeats,
        # and hypothesis prints the example that failed.
        @settings(
            max_examples=150,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(_task_objects(target.url))
        def check(obj: Any) -> None:
            if isinstance(obj, dict) and isinstance(obj.get("expiryTsMs"), _Offset):
                obj["expiryTsMs"] = int(time.time() * 1000) + int(obj["expiryTsMs"])
            try:
                task = Task.parse(obj)
            except TaskError as exc:
                assert exc.reason
                return
            seen["parsed"] += 1
            key = uuid.uuid4().hex
            result = executor.execute(task, key=key)
            try:
                assert isinstance(result, Result)
                seen["executed"] += 1
                if result.is_error:
                    seen["errors"] += 1
                    payload = error_payload(result, "test")
                    assert result.status_code == 500 and payload["statusCode"] == 500
                    assert payload["output"] == ERROR_PREFIX + str(result.error)
                    assert result.error and result.body_path is None
                else:
                    assert isinstance(result.status_code, int) and result.status_code >= 100
                    assert result.key == key
                json.dumps(result.to_record())  # the spool can store it
            finally:
                pipeline.spool.discard_body(key)

        try:
            check()
        finally:
            executor.session.close()
            pipeline.client.close()
        # the strategy reached the executor often, with both outcomes
        assert seen["executed"] >= 15, seen
        assert 0 < seen["errors"] < seen["executed"], seen
        assert target.errors == []
        assert spool_names(tmp_path / "spool") == []
