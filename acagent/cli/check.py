"""``python -m acagent check``: tell an operator whether the agent can work here.

Takes the same flags and environment as ``run`` and goes through the steps
an agent needs, printing one ``OK``/``FAIL`` line each, with a hint on how to
fix a failure (``hints.py``):

1. configuration: every value valid, every path usable (a failure exits 2,
   like ``run``);
2. resolve: the AC server's host name (or the outgoing proxy's) resolves;
3. connect: a TCP connection and TLS handshake with the AC server, through
   the configured proxy, CA bundle and ``--verify``;
4. coordination (with ``--coordinationUrl``): the Redis answers and takes
   the password, or the check says so at once, naming the flag (an agent
   without it makes no AC call);
5. authenticate: one get-task with the API key.

After the configuration, a ``NOTE`` line tells what the spool folder holds,
when it holds anything: results waiting for this server and key, results
kept for another server or key (this agent never sends them), damaged
records, quarantined results. It is read without changing anything, and is
never a failure.

Exit 0 only if every step passed. get-task may hand out a real task: the
check never drops one. The get-task is made by a one-shot ``Pipeline`` (its
Fetcher replaced through the public ``fetch_one`` hook), so a task it gets is
run and its result delivered like any other before the check ends.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import tempfile
import threading
from typing import List, Optional, Sequence, TextIO, Type
from urllib.parse import urlsplit

import requests

from .. import logs
from ..ac.client import build_session
from ..ac.permits import CoordinationUnavailable, RedisPermits, permits_for
from ..config import AgentConfig
from ..errors import ConfigError, TaskError
from ..fetcher import Fetcher
from ..hints import hint_for
from ..models import Result, Task
from ..observers import Observer
from ..pipeline import Pipeline
from ..spool import Origin, survey_spool

__all__ = ["CheckReport", "main", "run_check"]

log = logging.getLogger("acagent.check")

#: seconds the connect step waits for the server's first answer
CONNECT_READ_TIMEOUT = 30.0
_PROXY_DNS_HINT = (
    "the proxy's host name does not resolve: check --outgoingProxyHttps / --outgoingProxyHttp"
)
#: extra seconds a task the check received gets for its upload
DELIVERY_GRACE = 60.0


class CheckReport:
    """The steps' outcomes, printed as they happen."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed: List[str] = []

    def ok(self, step: str, detail: str) -> None:
        self._print(f"OK    {step}: {detail}")

    def note(self, step: str, detail: str, hint: Optional[str] = None) -> None:
        """Something the operator should know that is not a failure."""
        self._print(f"NOTE  {step}: {detail}")
        if hint:
            self._print(f"      hint: {hint}")

    def fail(self, step: str, detail: str, hint: Optional[str] = None) -> None:
        self.failed.append(step)
        self._print(f"FAIL  {step}: {detail}")
        if hint:
            self._print(f"      hint: {hint}")

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    @property
    def passed(self) -> bool:
        return not self.failed


def _brief(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def _spool(config: AgentConfig, report: CheckReport) -> None:
    """A NOTE on what the spool folder holds, by whose it is (nothing if empty)."""
    folder = config.resolved_spool_dir()
    try:
        found = survey_spool(folder, Origin.of(config.base_url, config.api_key))
    except OSError as exc:
        report.note("spool", f"{folder}: cannot be read: {_brief(exc)}")
        return
    parts = []
    if found.mine or found.unmarked:
        parts.append(f"{found.mine + found.unmarked} result(s) waiting for this server and key")
    if found.aside:
        listed = "; ".join(f"{n} of {origin}" for origin, n in sorted(found.aside.items()))
        parts.append(
            f"{sum(found.aside.values())} kept for another AC server or API key, "
            f"not sent by this agent ({listed})"
        )
    if found.damaged:
        parts.append(f"{found.damaged} damaged record(s), answered with an error result at start")
    if found.quarantined:
        parts.append(f"{found.quarantined} result(s) in {folder}/quarantine")
    if parts:
        hint = (
            "an agent started on this folder with that --serverUrl and --apiKey delivers them"
            if found.aside
            else None
        )
        report.note("spool", f"{folder}: " + "; ".join(parts), hint)


def _resolve(config: AgentConfig, report: CheckReport) -> bool:
    server = urlsplit(config.server_url)
    proxies = config.outgoing_proxies or {}
    # a proxy from HTTPS_PROXY / HTTP_PROXY (minus NO_PROXY) counts too: requests uses it
    proxy = proxies.get(server.scheme) or requests.utils.get_environ_proxies(config.server_url).get(
        server.scheme
    )
    target = urlsplit(proxy) if proxy else server
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    what = f"proxy {host}" if proxy else host
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        hint = hint_for(exc) if proxy is None else _PROXY_DNS_HINT
        report.fail("resolve", f"{what}: {_brief(exc)}", hint)
        return False
    addresses = sorted({str(info[4][0]) for info in infos})
    report.ok("resolve", f"{what} -> {', '.join(addresses[:4])}")
    return True


def _connect(config: AgentConfig, report: CheckReport) -> bool:
    """An unauthenticated request to the server's base URL: TCP, proxy and TLS."""
    session = build_session(1, user_agent="acagent-check")
    try:
        reply = session.get(
            config.base_url + "/",
            timeout=(config.ac_connect_timeout, CONNECT_READ_TIMEOUT),
            verify=config.tls_verify,
            proxies=config.outgoing_proxies,
            allow_redirects=False,
        )
        reply.close()
    except requests.RequestException as exc:
        report.fail("connect", _brief(exc), hint_for(exc))
        return False
    finally:
        session.close()
    scheme = urlsplit(config.server_url).scheme
    tls = (
        "TLS verified"
        if scheme == "https" and config.verify
        else ("TLS NOT verified (--verify false)" if scheme == "https" else "plain HTTP")
    )
    via = " via proxy" if config.outgoing_proxies else ""
    # this probe sends no API key: a server that asks for one is the expected answer
    expected = " (expected: no API key sent)" if reply.status_code in (401, 403) else ""
    report.ok(
        "connect", f"{config.base_url}{via}: {tls}, HTTP answer {reply.status_code}{expected}"
    )
    return True


def _coordination(config: AgentConfig, report: CheckReport) -> bool:
    """With ``--coordinationUrl``: one PING through the agent's own permits."""
    if not config.coordination_url:
        return True
    try:
        permits = permits_for(config)
        assert isinstance(permits, RedisPermits)  # a coordination URL is given
    except (ConfigError, CoordinationUnavailable) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc)
        report.fail("coordination", f"--coordinationUrl: {message}")
        return False
    try:
        permits.store.ping()
        holders = permits.remote_holders()
    except permits.store_errors as exc:
        report.fail(
            "coordination",
            f"--coordinationUrl {permits.url} cannot be used: {_brief(exc)}",
            "the agent makes no AC call without its coordination store: start it, "
            "or fix --coordinationUrl (host, port, rediss:// for TLS)",
        )
        return False
    finally:
        permits.close()
    report.ok(
        "coordination",
        f"--coordinationUrl {permits.url} answers; {holders} of "
        f"{config.ac_max_concurrent} AC permits of this key held now",
    )
    return True


class _FirstFetch:
    """What the one get-task of the check returned."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.task: Optional[Task] = None
        self.error: Optional[BaseException] = None
        self.malformed: Optional[TaskError] = None


def _one_shot_fetcher(outcome: _FirstFetch) -> Type[Fetcher]:
    class OneShotFetcher(Fetcher):
        """Makes exactly one get-task, then idles until the pipeline stops."""

        def fetch_one(self) -> Optional[Task]:
            if outcome.done.is_set():
                self.wait(1.0)
                return None
            try:
                task = super().fetch_one()
            except TaskError as exc:
                # Let the Fetcher answer it with an error result: it is delivered.
                outcome.malformed = exc
                outcome.done.set()
                raise
            except Exception as exc:  # noqa: BLE001 - reported by the check
                outcome.error = exc
                outcome.done.set()
                return None
            outcome.task = task
            outcome.done.set()
            return task

    return OneShotFetcher


class _DeliveryWatch(Observer):
    """Hears the one result of the check: accepted by the server, or refused for good."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Optional[str] = None

    def on_result_delivered(self, result: Result, via: str, seconds: float) -> None:
        self.outcome = "refused" if result.failure == "refused" else "accepted"
        self.done.set()

    def on_result_quarantined(self, result: Result, reason: str) -> None:
        self.outcome = "refused"


def _authenticate(config: AgentConfig, report: CheckReport) -> bool:
    spool = tempfile.mkdtemp(prefix="acagent-check-spool-")
    one_shot = config.replace(
        spool_dir=spool,
        health_addr=None,
        enable_metrics_file=False,
        enable_file_logging=False,
        executor_pool_size=1,
        prefetch=0,
    )
    outcome = _FirstFetch()
    watch = _DeliveryWatch()
    pipeline = Pipeline(one_shot, fetcher=_one_shot_fetcher(outcome), observers=[watch])
    got_task = False
    task_id: Optional[str] = None
    delivery: Optional[str] = None
    try:
        pipeline.start()
        waited = config.ac_connect_timeout + config.read_timeout_seconds + 30.0
        if not outcome.done.wait(waited):
            report.fail("authenticate", f"get-task gave no answer within {waited:.0f}s")
            return False
        left = 0.0
        if outcome.task is not None:
            got_task, task_id, left = True, outcome.task.task_id, outcome.task.seconds_left()
        elif outcome.malformed is not None and outcome.malformed.task_id is not None:
            # answered with an error result by the Fetcher: that result must arrive too
            got_task, task_id = True, outcome.malformed.task_id
        if got_task:
            watch.done.wait(max(left, 0.0) + config.upload_timeout + DELIVERY_GRACE)
            delivery = watch.outcome
    finally:
        drained = pipeline.stop()
    if outcome.error is not None:
        report.fail("authenticate", str(outcome.error), hint_for(outcome.error))
        shutil.rmtree(spool, ignore_errors=True)
        return False
    if not got_task:
        report.ok("authenticate", "get-task accepted the API key (no task waiting)")
    elif delivery == "accepted" and drained:
        report.ok(
            "authenticate",
            f"get-task accepted the API key and handed out task {task_id}; "
            "it was run and its result delivered",
        )
    elif delivery == "refused":
        report.fail(
            "authenticate",
            f"the API key works, but the AC server refused the result of task {task_id}",
        )
        shutil.rmtree(spool, ignore_errors=True)
        return False
    else:
        report.fail(
            "authenticate",
            f"the API key works, but the result of task {task_id} could not be delivered "
            f"in time; it is kept in {spool}",
        )
        return False
    shutil.rmtree(spool, ignore_errors=True)
    return True


def run_check(
    config: AgentConfig,
    out: TextIO,
    *,
    description: Optional[str] = None,
    key_source: Optional[str] = None,
    warnings: Sequence[str] = (),
) -> int:
    """Run the steps after the configuration; 0 if every one passed, else 1.

    ``key_source`` (where the API key came from) and ``warnings`` are printed
    with the configuration step."""
    report = CheckReport(out)
    source = f"; API key from {key_source}" if key_source is not None else ""
    rate = config.rate_limit_per_min
    limit = f"; rate limit {rate}/min each for get-task and uploads" if rate else "; rate limit off"
    report.ok("configuration", (description or config.describe()) + source + limit)
    for line in warnings:
        report.note("configuration", line)
    _spool(config, report)
    _ = (
        _resolve(config, report)
        and _connect(config, report)
        and _coordination(config, report)
        and _authenticate(config, report)
    )
    out.write(("all checks passed" if report.passed else "check FAILED") + "\n")
    out.flush()
    return 0 if report.passed else 1


def main(argv: Sequence[str] = ()) -> int:
    from .options import read_settings, startup_line

    settings = read_settings(argv, command="check")  # exits 2 with one line on a bad value
    config = settings.config
    logs.register_secret(config.api_key)
    # The pipeline's own lines would bury the report; --debugMode shows them on stderr.
    logs.setup_logging(
        log_format=config.log_format, debug=config.debug_mode, stdout=True, stream=sys.stderr
    )
    if not config.debug_mode:
        logging.getLogger(logs.LOGGER_NAME).setLevel(logging.CRITICAL)
    return run_check(
        config,
        sys.stdout,
        description=startup_line(config),
        key_source=settings.key_source,
        warnings=settings.warnings,
    )
