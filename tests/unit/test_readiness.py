"""Readiness asks the Ledger for its holds: /readyz says what holds fetching, as it is now."""

from __future__ import annotations

from pathlib import Path

from acagent.ledger import Ledger
from acagent.readiness import Readiness
from acagent.spool import ResultSpool


def test_readiness_reports_the_ledgers_holds_as_they_are(tmp_path: Path) -> None:
    ledger = Ledger(slots=2, threshold=2, spool=ResultSpool(tmp_path / "spool"))
    readiness = Readiness(60.0, holds=ledger.holds)
    readiness.on_exchange("get-task", "200", 0.01)
    assert readiness.check()[0]
    ledger.hold("spool", "no space left in the spool folder")
    ledger.hold("auth", "the AC server refused the API key")
    ready, why = readiness.check()
    assert not ready
    assert why == "no space left in the spool folder; the AC server refused the API key"
    ledger.release("spool")
    assert readiness.check() == (False, "the AC server refused the API key")
    ledger.release("auth")
    assert readiness.check()[0]


def test_without_holds_readiness_follows_the_exchanges(tmp_path: Path) -> None:
    readiness = Readiness(60.0, "the key was refused")
    readiness.on_exchange("get-task", "200", 0.01)
    assert readiness.check()[0]
    readiness.on_exchange("get-task", "401", 0.01)
    assert readiness.check() == (False, "the key was refused")
