"""Each stage runs on a hand-made ``StageContext``, with no Pipeline at all.

The contract a subclass author relies on: a stage needs only the context's
collaborators (config, AC client, Ledger, spool, work folder, abort signal,
observers, runtime settings), owns its threads, and stops the same way as
every other stage (``stop()``, then ``join(timeout) -> bool``).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Type

import pytest
from helpers import WAIT, FastExecutor, FastFetcher, FastUploader, fast_policy, wait_until

from acagent.ac.client import ACClient
from acagent.config import AgentConfig
from acagent.globalconfig import RuntimeSettings
from acagent.ledger import Ledger
from acagent.models import Result, Task, echo_fields
from acagent.observers import Observer, Observers
from acagent.spool import ResultSpool
from acagent.stage import StageContext
from acagent.testing import FakeACServer, FakeTarget, expected_sha256
from acagent.uploader import Uploader


class Events(Observer):
    def __init__(self) -> None:
        self.seen: List[str] = []
        self._lock = threading.Lock()

    def _add(self, what: str) -> None:
        with self._lock:
            self.seen.append(what)

    def on_task_fetched(self, task: Task) -> None:
        self._add(f"fetched {task.task_id}")

    def on_task_executed(self, result: Result, seconds: float) -> None:
        self._add(f"executed {result.task_id}")

    def on_result_delivered(self, result: Result, via: str, seconds: float) -> None:
        self._add(f"delivered {result.task_id} via {via}")


@pytest.fixture
def context(tmp_path: Path, ac: FakeACServer) -> Iterator[StageContext]:
    config = AgentConfig(
        server_url=ac.url,
        api_key="stage-contract-key",
        spool_dir=str(tmp_path / "spool"),
        poll_interval=0.02,
        rate_limit_per_min=0,
        executor_pool_size=2,
    )
    abort = threading.Event()
    client = ACClient(config, retry_policy=fast_policy(), abort=abort)
    observers = Observers((Events(),))
    spool = ResultSpool(config.resolved_spool_dir())
    ledger = Ledger(slots=2, threshold=10, spool=spool, observers=observers)
    with tempfile.TemporaryDirectory() as work:
        yield StageContext(
            config=config,
            client=client,
            ledger=ledger,
            spool=spool,
            work_dir=work,
            abort=abort,
            observers=observers,
            settings=RuntimeSettings(
                verify=config.tls_verify,
                upload_to_ac=True,
                pool_size=2,
                verify_for=config.tls_verify_for,
            ),
        )
    client.close()


def _events(ctx: StageContext) -> Events:
    (events,) = list(ctx.observers)
    assert isinstance(events, Events)
    return events


def test_fetcher_alone_fills_the_ledger_up_to_its_slots(
    context: StageContext, ac: FakeACServer, target: FakeTarget
) -> None:
    ac.add_tasks(
        {"taskId": f"f{i}", "method": "GET", "url": f"{target.url}/bytes/10"} for i in range(5)
    )
    fetcher = FastFetcher(context)
    fetcher.start()
    try:
        # two slots: two tasks fetched and queued, then the fetcher waits for room
        assert wait_until(lambda: context.ledger.tasks.qsize() == 2, WAIT)
        assert context.ledger.executing == 2
        assert not ac.wait_for(lambda: ac.tasks_handed_out > 2, 0.5)
    finally:
        fetcher.stop()
        assert fetcher.join(WAIT)
    assert not fetcher.is_alive()
    assert _events(context).seen == ["fetched f0", "fetched f1"]


def test_executor_alone_runs_queued_tasks_into_the_ledger(
    context: StageContext, target: FakeTarget
) -> None:
    executor = FastExecutor(context)
    executor.start()
    try:
        for i in range(2):
            assert context.ledger.reserve(timeout=1.0)
            task = Task.parse(
                {"taskId": f"e{i}", "method": "GET", "url": f"{target.url}/bytes/1000?seed={i}"}
            )
            context.ledger.fetched(task)
        assert wait_until(lambda: len(context.ledger.results) == 2, WAIT)
    finally:
        executor.stop()
        assert executor.join(WAIT)
    assert sorted(_events(context).seen) == [
        "executed e0",
        "executed e1",
        "fetched e0",
        "fetched e1",
    ]
    assert context.spool.size() == 2  # spooled before queued
    for _ in range(2):
        delivery = context.ledger.take_result(timeout=1.0)
        assert delivery is not None and delivery.result.status_code == 200
        assert delivery.result.body_size == 1000


def _queue_result(context: StageContext, task_id: str, body_path: str, size: int) -> None:
    """Hand the Ledger a result with its body in a file, as an executor would."""
    assert context.ledger.reserve(timeout=1.0)
    context.ledger.finished(
        Result(
            fields={"taskId": task_id, "method": "GET", "url": "http://x/"},
            status_code=200,
            body_path=body_path,
            body_size=size,
        )
    )


def _deliver_one(
    context: StageContext, ac: FakeACServer, uploader_class: Type[Uploader] = FastUploader
) -> None:
    """Run an Uploader alone until the one result the Ledger holds is delivered."""
    uploader = uploader_class(context)
    uploader.start()
    try:
        assert ac.wait_for_results(1, WAIT)
        assert wait_until(lambda: context.ledger.outstanding() == 0, WAIT)
    finally:
        uploader.stop()
        assert uploader.join(WAIT)


def test_uploader_alone_delivers_what_the_ledger_holds(
    context: StageContext, ac: FakeACServer, tmp_path: Path
) -> None:
    body = tmp_path / "body"
    body.write_bytes(b"hello")
    _queue_result(context, "u1", str(body), 5)
    _deliver_one(context, ac)
    (got,) = ac.results["u1"]
    assert got.via == "inline" and got.body == b"hello"
    assert _events(context).seen == ["delivered u1 via inline"]


def test_a_body_that_cannot_be_compressed_is_uploaded_raw(
    context: StageContext, ac: FakeACServer, tmp_path: Path
) -> None:
    """upload-result with the body as it is (``responseZipped`` false) when its
    gzip cannot be written (a full work folder, say)."""

    class NoRoomToCompress(FastUploader):
        def compress(self, source: str, target: str) -> None:
            raise OSError(28, "No space left on device")

    data = bytes(range(256)) * 2_400  # 614,400 bytes: above the inline limit
    body = tmp_path / "big.body"
    body.write_bytes(data)
    _queue_result(context, "raw", str(body), len(data))
    _deliver_one(context, ac, NoRoomToCompress)
    (got,) = ac.results["raw"]
    assert got.via == "upload" and got.fields["responseZipped"] is False
    assert got.body == data
    assert list(Path(context.work_dir).iterdir()) == []  # no work file left behind


@pytest.mark.parametrize("size", [5, 5_000_000], ids=["inline", "upload-result"])
def test_a_body_gone_from_the_spool_is_answered_as_lost(
    context: StageContext, ac: FakeACServer, tmp_path: Path, size: int
) -> None:
    """Inline or not, a missing body file reaches the server as an error result, once."""
    _queue_result(context, "gone", str(tmp_path / "no-such-body"), size)
    _deliver_one(context, ac)
    (got,) = ac.results["gone"]
    assert got.via == "error"
    assert got.fields["output"] == "Agent Side Error: result body lost from the spool"


def test_the_three_stages_on_one_context_make_a_pipeline(
    context: StageContext, ac: FakeACServer, target: FakeTarget
) -> None:
    ac.add_tasks(
        {"taskId": f"p{i}", "method": "GET", "url": f"{target.url}/bytes/{100 + i}?seed={i}"}
        for i in range(6)
    )
    stages = [FastUploader(context), FastExecutor(context), FastFetcher(context)]
    for stage in stages:
        stage.start()
    try:
        assert ac.wait_for_results(6, WAIT)
    finally:
        for stage in reversed(stages):
            stage.stop()
        for stage in stages:
            assert stage.join(WAIT)
    for i in range(6):
        (got,) = ac.results[f"p{i}"]
        assert got.body_sha256 == expected_sha256(100 + i, i)
    assert ac.max_inflight <= 2


@pytest.mark.parametrize("bug", ["raises", "unrecordable-result"])
def test_a_buggy_executor_subclass_still_answers_every_task_once(
    context: StageContext,
    ac: FakeACServer,
    target: FakeTarget,
    caplog: pytest.LogCaptureFixture,
    bug: str,
) -> None:
    """``execute`` must not raise and must return a result the spool can record;
    a subclass that breaks either rule costs its task an error result, never
    the task itself or its executor slot."""

    class Buggy(FastExecutor):
        def execute(self, task: Task, *, key: str) -> Result:
            if bug == "raises":
                raise RuntimeError("subclass bug")
            return Result(
                fields=echo_fields(task.raw),
                status_code=200,
                response_headers={"X-Odd": object()},  # type: ignore[dict-item]
                key=key,
            )

    ac.add_tasks(
        {"taskId": f"b{i}", "method": "GET", "url": f"{target.url}/bytes/10"} for i in range(3)
    )
    stages = [FastUploader(context), Buggy(context), FastFetcher(context)]
    for stage in stages:
        stage.start()
    try:
        assert ac.wait_for_results(3, WAIT)
        assert wait_until(lambda: context.ledger.outstanding() == 0, WAIT)
    finally:
        for stage in reversed(stages):
            stage.stop()
        for stage in stages:
            assert stage.join(WAIT)
    expected = {
        "raises": "Agent Side Error: RuntimeError: subclass bug",
        "unrecordable-result": "Agent Side Error: the agent could not record this result (TypeError)",
    }[bug]
    for i in range(3):
        (got,) = ac.results[f"b{i}"]
        assert got.via == "error" and got.fields["output"] == expected
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3 and all(r.name in ("acagent.executor", "acagent.ledger") for r in errors)
    assert context.spool.size() == 0


def test_an_unexpected_error_in_a_task_run_is_logged_not_lost_in_its_future(
    context: StageContext,
    target: FakeTarget,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures: List[str] = []

    class Failures(Observer):
        def on_stage_failure(self, stage: str, exc: BaseException) -> None:
            failures.append(f"{stage}: {exc}")

    context.observers.add(Failures())

    def broken(result: Result) -> None:
        raise RuntimeError("ledger bug")

    monkeypatch.setattr(context.ledger, "finished", broken)
    executor = FastExecutor(context)
    executor.start()
    try:
        assert context.ledger.reserve(timeout=1.0)
        context.ledger.fetched(Task.parse({"taskId": "x1", "method": "GET", "url": target.url}))
        assert wait_until(lambda: failures == ["executor: ledger bug"], WAIT), failures
    finally:
        executor.stop()
        assert executor.join(WAIT)
    logged = [r for r in caplog.records if r.name == "acagent.executor" and r.levelname == "ERROR"]
    assert len(logged) == 1 and logged[0].exc_info is not None


def test_a_failing_observer_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Observer):
        def on_hold(self, reason_key: str, message: object) -> None:
            raise RuntimeError("observer bug")

    heard: List[str] = []

    class Listening(Observer):
        def on_hold(self, reason_key: str, message: object) -> None:
            heard.append(reason_key)

    observers = Observers((Broken(), Listening()))
    observers.emit("on_hold", "spool", "full")  # must not raise
    assert heard == ["spool"]
    failures = [r for r in caplog.records if r.name == "acagent.observers"]
    assert len(failures) == 1 and "Broken" in failures[0].getMessage()
    assert failures[0].exc_info is not None
