"""GlobalConfigObserver and RuntimeSettings, without servers: which globalConfig
values are applied, which are refused (and logged once), and what each one
changes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from helpers import WAIT

from acagent import AgentConfig
from acagent.ac.client import ACClient
from acagent.globalconfig import GlobalConfigObserver, RuntimeSettings, value_problem
from acagent.ledger import Ledger
from acagent.logs import LOGGER_NAME
from acagent.models import Task
from acagent.spool import ResultSpool

CA = "/etc/agent/ca.pem"


class Calls:
    def __init__(self) -> None:
        self.pool: List[int] = []
        self.rate: List[int] = []


@pytest.fixture
def settings() -> RuntimeSettings:
    config = AgentConfig(
        server_url="https://ac.example", api_key="k", ca_bundle=CA, executor_pool_size=10
    )
    return RuntimeSettings.of(config)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def observer(settings: RuntimeSettings, calls: Calls) -> GlobalConfigObserver:
    return GlobalConfigObserver(settings, on_pool_size=calls.pool.append, on_rate=calls.rate.append)


@pytest.fixture
def agent_level() -> Iterator[None]:
    """debugMode sets the agent's log level: put it back after the test."""
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    yield
    logger.setLevel(level)


def warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("debugMode", True, None),
        ("debugMode", False, None),
        ("debugMode", 1, "must be true or false"),
        ("debugMode", "true", "must be true or false"),
        ("verifyCert", None, "must be true or false"),
        ("uploadToAC", 0, "must be true or false"),
        ("poolSize", 1, None),
        ("poolSize", 2000, None),
        ("poolSize", 0, "must be a whole number from 1 to 2000"),
        ("poolSize", 2001, "must be a whole number from 1 to 2000"),
        ("poolSize", True, "must be a whole number from 1 to 2000"),
        ("poolSize", 4.0, "must be a whole number from 1 to 2000"),
        ("poolSize", "4", "must be a whole number from 1 to 2000"),
        ("rateLimitPerMin", 0, None),
        ("rateLimitPerMin", 10_000_000, None),
        ("rateLimitPerMin", -1, "must be a whole number from 0 to 10000000"),
        ("someNewKey", {"any": "thing"}, None),  # unknown keys: ignored, not refused
    ],
)
def test_value_problem_table(key: str, value: Any, problem: Optional[str]) -> None:
    assert value_problem(key, value) == problem


def test_settings_start_from_the_config(settings: RuntimeSettings) -> None:
    assert (settings.verify, settings.upload_to_ac, settings.pool_size) == (CA, True, 10)


def test_each_key_changes_its_setting(
    observer: GlobalConfigObserver, settings: RuntimeSettings, calls: Calls, agent_level: None
) -> None:
    observer.apply({"verifyCert": False, "uploadToAC": False, "poolSize": 4})
    assert (settings.verify, settings.upload_to_ac, settings.pool_size) == (False, False, 4)
    assert calls.pool == [4]
    observer.apply({"verifyCert": True})
    assert settings.verify == CA  # verification back on keeps the configured bundle
    observer.apply({"rateLimitPerMin": 250})
    assert calls.rate == [250]
    observer.apply({"debugMode": True})
    assert logging.getLogger(LOGGER_NAME).level == logging.DEBUG
    observer.apply({"debugMode": False})
    assert logging.getLogger(LOGGER_NAME).level == logging.INFO


def test_keys_left_out_keep_their_value(
    observer: GlobalConfigObserver, settings: RuntimeSettings, calls: Calls
) -> None:
    observer.apply({"poolSize": 4, "uploadToAC": False})
    observer.apply({"rateLimitPerMin": 100})  # today's agent reset the others here
    assert (settings.pool_size, settings.upload_to_ac, settings.verify) == (4, False, CA)
    assert calls.pool == [4]


def test_an_unchanged_value_is_applied_once(
    observer: GlobalConfigObserver, calls: Calls, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="acagent.globalconfig"):
        for _ in range(3):
            observer.apply({"poolSize": 4, "rateLimitPerMin": 60})
    assert calls.pool == [4] and calls.rate == [60]
    assert [r.getMessage() for r in caplog.records] == [
        "globalConfig: poolSize=4",
        "globalConfig: rateLimitPerMin=60",
    ]
    observer.apply({"poolSize": 5})
    observer.apply({"poolSize": 4})  # a change back is a change
    assert calls.pool == [4, 5, 4]


def test_the_same_json_value_of_another_type_is_a_change(
    observer: GlobalConfigObserver, settings: RuntimeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """1 == True in Python; in JSON they are different values: the first is
    applied, the second refused, not taken for the first."""
    observer.apply({"uploadToAC": True})
    with caplog.at_level(logging.WARNING, logger="acagent.globalconfig"):
        observer.apply({"uploadToAC": 1})
    assert warnings(caplog) == ["globalConfig uploadToAC=1 ignored: must be true or false"]
    assert settings.upload_to_ac is True


def test_a_bad_value_is_logged_once_until_it_changes_and_the_rest_applied(
    observer: GlobalConfigObserver,
    settings: RuntimeSettings,
    calls: Calls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="acagent.globalconfig"):
        for _ in range(3):
            observer.apply({"poolSize": "many", "uploadToAC": False})
        observer.apply({"poolSize": 0})
        observer.apply({"poolSize": 10**400})
    assert warnings(caplog) == [
        "globalConfig poolSize='many' ignored: must be a whole number from 1 to 2000",
        "globalConfig poolSize=0 ignored: must be a whole number from 1 to 2000",
        "globalConfig poolSize=100000000000000000...0000000000000000000 ignored: "
        "must be a whole number from 1 to 2000",
    ]
    assert settings.pool_size == 10 and calls.pool == []
    assert settings.upload_to_ac is False  # the good key of the same globalConfig


def test_turning_verification_off_is_a_warning(
    observer: GlobalConfigObserver, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="acagent.globalconfig"):
        observer.apply({"verifyCert": False})
    assert warnings(caplog) == ["server turned TLS verification off (globalConfig verifyCert)"]


def test_unknown_keys_are_ignored_silently(
    observer: GlobalConfigObserver, settings: RuntimeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="acagent.globalconfig"):
        observer.apply({"someNewKey": [1, 2], "another": None})
    assert caplog.records == []
    assert (settings.verify, settings.upload_to_ac, settings.pool_size) == (CA, True, 10)


def test_the_observer_reads_the_fetched_tasks_global_config(
    observer: GlobalConfigObserver, settings: RuntimeSettings
) -> None:
    def task(**extra: Any) -> Task:
        raw: Dict[str, Any] = {"taskId": "t", "method": "GET", "url": "http://t.example/"}
        return Task.parse({**raw, **extra})

    observer.on_task_fetched(task())  # none: nothing changes
    observer.on_task_fetched(task(globalConfig={}))
    assert settings.pool_size == 10
    observer.on_task_fetched(task(globalConfig={"poolSize": 3}))
    assert settings.pool_size == 3


def test_verification_and_size_have_one_owner(settings: RuntimeSettings, tmp_path: Path) -> None:
    """The AC client reads TLS verification from the settings, and the Ledger
    its slots: globalConfig changes the settings alone, and both follow."""
    config = AgentConfig(server_url="https://ac.example", api_key="k", ca_bundle=CA)
    with ACClient(config, settings=settings) as client:
        ledger = Ledger(
            slots=lambda: settings.pool_size + 1,
            threshold=100,
            spool=ResultSpool(tmp_path / "spool"),
        )
        observer = GlobalConfigObserver(settings, on_pool_size=lambda n: ledger.slots_changed())
        assert client.verify == CA and ledger.slots == 11
        for _ in range(11):
            assert ledger.reserve(timeout=WAIT)
        waiter = threading.Thread(target=lambda: got.append(ledger.reserve(timeout=WAIT)))
        got: List[bool] = []
        waiter.start()
        observer.apply({"verifyCert": False, "poolSize": 11})
        waiter.join(WAIT / 4)  # woken by the new size, long before its timeout
        assert not waiter.is_alive() and got == [True]
        assert client.verify is False and ledger.slots == 12
        client.set_verify(True)
        assert settings.verify == CA
