"""Kept-alive AC connections are replaced when old, between requests, never during one."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import List

import pytest
import trustme
from helpers import WAIT, make_config, make_pipeline, running, wait_until

from acagent.connage import ConnectionAges
from acagent.testing import FakeACServer, FakeTarget

RUN = 10.0
MAX_AGE = 2.0


def _feed(ac: FakeACServer, target: FakeTarget, stop: threading.Event, ids: List[str]) -> None:
    """A task every 50 ms until ``stop`` (the stimulus of a steady load)."""
    n = 0
    while not stop.wait(0.05):
        task_id = f"age-{n}"
        ac.add_task({"taskId": task_id, "method": "GET", "url": f"{target.url}/bytes/256?seed={n}"})
        ids.append(task_id)
        n += 1


@pytest.mark.timeout(60)
def test_connections_older_than_the_max_age_are_replaced_without_a_failed_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids: List[str] = []
    stop = threading.Event()
    with FakeTarget() as target, FakeACServer(max_concurrent=2) as ac:
        config = make_config(ac.url, tmp_path / "spool", ac_connection_max_age=MAX_AGE)
        pipeline = make_pipeline(config)
        feeder = threading.Thread(target=_feed, args=(ac, target, stop, ids), name="feeder")
        with caplog.at_level(logging.WARNING, logger="acagent"), running(pipeline):
            feeder.start()
            try:
                stop.wait(RUN)  # the run's length: a steady load for RUN seconds
            finally:
                stop.set()
                feeder.join(WAIT)
            assert ac.wait_for_results(len(ids), WAIT)
            retired = pipeline.client.ac_ages.retired
            resends = pipeline.client.resends
        opened = ac.connections_opened
        failed = [r for r in ac.requests if r.status == 0 or r.status >= 400]
        results = ac.results
    print(f"\n{RUN:.0f} s, max age {MAX_AGE:.0f} s: {len(ids)} tasks, {retired} retired, {opened} opened")
    # at least one replacement per MAX_AGE of the run, on each of 2 connections or fewer
    assert retired >= RUN / MAX_AGE - 2, retired
    assert opened >= retired, (opened, retired)
    assert failed == [] and resends == 0
    assert ac.max_inflight <= 2
    assert sorted(results) == sorted(ids)
    assert all(len(got) == 1 and got[0].via == "inline" for got in results.values())
    assert [r.getMessage() for r in caplog.records] == []  # not one warning


def test_no_max_age_keeps_the_connections(tmp_path: Path) -> None:
    with FakeACServer() as ac:
        pipeline = make_pipeline(make_config(ac.url, tmp_path / "spool", ac_connection_max_age=0))
        with running(pipeline):
            assert ac.wait_for_requests("get-task", 20, WAIT, completed=True)
            assert pipeline.client.ac_ages.retired == 0
        assert ac.connections_opened <= 2


def _context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.mark.timeout(60)
def test_a_replaced_server_certificate_is_picked_up_without_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = _context(ca)
    with FakeTarget() as target, FakeACServer(ssl_context=context) as ac:
        config = make_config(
            ac.url, tmp_path / "spool", ca_bundle=str(bundle), ac_connection_max_age=0.5
        )
        pipeline = make_pipeline(config)
        with caplog.at_level(logging.INFO, logger="acagent.connage"), running(pipeline):
            ac.add_task({"taskId": "before", "method": "GET", "url": f"{target.url}/bytes/64"})
            assert ac.wait_for_results(1, WAIT)
            # The server's certificate is replaced: new handshakes present it.
            ca.issue_cert("127.0.0.1").configure_cert(context)
            started = time.monotonic()
            assert wait_until(lambda: pipeline.client.ac_ages.certificate_changes >= 1, WAIT)
            picked_up = time.monotonic() - started
            ac.add_task({"taskId": "after", "method": "GET", "url": f"{target.url}/bytes/64"})
            assert ac.wait_for_results(2, WAIT)
        results = ac.results
    assert [got[0].via for got in (results["before"], results["after"])] == ["inline", "inline"]
    assert picked_up < 3.0, picked_up
    changed = [r for r in caplog.records if "new TLS certificate" in r.getMessage()]
    assert len(changed) == pipeline.client.ac_ages.certificate_changes
    assert changed[0].levelname == "INFO"


def test_checkout_closes_only_an_old_connected_connection() -> None:
    ages = ConnectionAges(10.0, "AC server")

    class Conn:
        host = "h"
        sock: object = object()
        closed = False

        def close(self) -> None:
            self.closed = True
            self.sock = None

    young, old, idle = Conn(), Conn(), Conn()
    now = time.monotonic()
    young._acagent_opened_at = now  # type: ignore[attr-defined]
    old._acagent_opened_at = now - 11  # type: ignore[attr-defined]
    idle.sock = None
    idle._acagent_opened_at = now - 11  # type: ignore[attr-defined]
    for conn in (young, old, idle):
        ages.checkout(conn)
    assert (young.closed, old.closed, idle.closed) == (False, True, False)
    assert ages.retired == 1


def test_the_upload_storage_connections_are_replaced_too(tmp_path: Path) -> None:
    with FakeTarget() as target, FakeACServer() as ac:
        config = make_config(
            ac.url, tmp_path / "spool", upload_to_ac=False, ac_connection_max_age=0.3
        )
        pipeline = make_pipeline(config)
        with running(pipeline):
            for n in range(3):
                url = f"{target.url}/bytes/600000?seed={n}"
                ac.add_task({"taskId": f"s3-{n}", "method": "GET", "url": url})
                assert ac.wait_for_results(n + 1, WAIT)
                threading.Event().wait(0.4)  # the stimulus: the connection ages past 0.3 s
            retired = pipeline.client.s3_ages.retired
        results = ac.results
    assert [results[f"s3-{n}"][0].via for n in range(3)] == ["s3", "s3", "s3"]
    assert retired >= 2, retired
