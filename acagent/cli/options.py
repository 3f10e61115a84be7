"""Flags and environment -> ``AgentConfig``: the options of ``run``, ``check`` and ``demo``.

Every flag and environment name of today's agent is accepted with the same
meaning, so ``python -m acagent`` replaces ``python worker.py`` as is. Every
flag can also be set as ``ACAGENT_<FLAG_IN_UPPER_SNAKE>`` in the environment
(derived from the flag's name by ``env_name_for``); precedence is flag, then
``ACAGENT_*``, then the old environment name, then the default. A bad value
(or a path that cannot work) exits 2 with one line naming the flag.

For callers: ``read_settings(argv, command=...)`` (the config, where the key
came from, the warnings to log), ``config_from_args``, ``build_parser``,
``startup_line``; the usage and description texts of each subcommand.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Dict, List, NamedTuple, NoReturn, Optional, Sequence, Tuple

from .._version import __version__
from ..config import AC_SERVER_CONCURRENT_LIMIT, AgentConfig, secret_file_exposed
from ..errors import ConfigError
from ..targets.policy import DEFAULT_DENIED, NO_DEFAULTS, HostList, parse_entries

_TRUE = ("yes", "true", "t", "1", "y", "on")
_FALSE = ("no", "false", "f", "0", "n", "off")


def str2bool(value: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _int(low: int, high: Optional[int] = None) -> Any:
    def parse(value: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
        return number

    return parse


def _seconds(value: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds, got {value!r}")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def _seconds_or_zero(value: str) -> float:
    if str(value).strip() in ("0", "0.0"):
        return 0.0
    return _seconds(value)


def _allow_list(value: str) -> List[str]:
    try:
        allow = HostList(part for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return list(allow.describe())


def _host_entries(value: str) -> List[str]:
    try:
        return parse_entries(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _header_names(value: str) -> List[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    bad = [n for n in names if not all(c.isalnum() or c in "-_." for c in n)]
    if bad:
        raise argparse.ArgumentTypeError(f"not a header name: {bad[0]!r}")
    return names


#: flag types whose values are comma-separated lists (kept as tuples)
_LIST_TYPES = (_allow_list, _host_entries, _header_names)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the flag, not argparse's usage block.
        self.exit(2, f"{self.prog}: error: {message}\n")


#: (flag, AgentConfig field, type, environment names, help)
_OPTIONS: List[tuple[str, str, Any, tuple[str, ...], str]] = [
    ("--serverUrl", "server_url", str, ("server_url",), "AC server base URL (required)"),
    (
        "--apiKey",
        "api_key",
        str,
        ("api_key",),
        "AC API key (this or --apiKeyFile is required); never logged",
    ),
    (
        "--apiKeyFile",
        "api_key_file",
        str,
        (),
        "file holding the AC API key, instead of --apiKey: re-read while the server refuses"
        " the key and on SIGHUP, so a rotated key needs no restart",
    ),
    ("--envName", "env_name", str, (), "environment name sent with get-task and upload-logs"),
    (
        "--index",
        "index",
        str,
        (),
        "suffix of the log and metrics file names: letters, digits, _ and - (default _prod)",
    ),
    (
        "--executorPoolSize",
        "executor_pool_size",
        _int(1, 2000),
        ("EXECUTOR_POOL_SIZE",),
        "threads running target requests (default 10)",
    ),
    ("--poolSize", "pool_size", _int(1, 2000), (), "old name of --executorPoolSize"),
    (
        "--prefetch",
        "prefetch",
        _int(0, 10000),
        (),
        "tasks fetched beyond the free executor threads, so a thread never waits a get-task"
        " round trip; 0 = fetch only for a free thread (default 1)",
    ),
    (
        "--responseQueueThreshold",
        "response_queue_threshold",
        _int(1),
        (),
        "fetching pauses while this many results wait for upload (default 80)",
    ),
    (
        "--acMaxConcurrent",
        "ac_max_concurrent",
        _int(1, 64),
        (),
        "most requests open to the AC server at once (default 2)",
    ),
    (
        "--rateLimitPerMin",
        "rate_limit_per_min",
        _int(0),
        (),
        "AC requests per minute per operation class (fetch, upload); 0 = off (default 250)",
    ),
    (
        "--coordinationUrl",
        "coordination_url",
        str,
        (),
        "redis:// or rediss:// URL: share the AC budget with every agent on the key; "
        "password in the URL or ACAGENT_COORDINATION_PASSWORD; needs acagent[redis] (default off)",
    ),
    (
        "--coordinationPasswordFile",
        "coordination_password_file",
        str,
        (),
        "file holding the Redis password, instead of ACAGENT_COORDINATION_PASSWORD",
    ),
    (
        "--coordinationLease",
        "coordination_lease",
        _seconds,
        (),
        "seconds a shared AC permit outlives a dead agent (default 10)",
    ),
    (
        "--coordinationKeepCalls",
        "coordination_keep_calls",
        _int(0, 1000),
        (),
        "more AC calls in a row this agent makes on a shared permit before it goes back "
        "to the queue; 0 = off (default 8)",
    ),
    (
        "--timeout",
        "timeout",
        _seconds,
        ("timeout",),
        "target read timeout in s, capped by the task's expiry (default 30)",
    ),
    (
        "--connectTimeout",
        "connect_timeout",
        _seconds,
        (),
        "target connect timeout in s (default 15)",
    ),
    (
        "--readTimeoutSeconds",
        "read_timeout_seconds",
        _seconds,
        (),
        "AC read timeout in s, long polls included (default 100)",
    ),
    (
        "--uploadTimeout",
        "upload_timeout",
        _seconds,
        (),
        "read timeout of upload-result, upload-logs and S3 in s (default 300)",
    ),
    (
        "--acConnectionMaxAge",
        "ac_connection_max_age",
        _seconds_or_zero,
        (),
        "replace an AC or S3 connection older than this many s before its next request;"
        " 0 = never (default 900)",
    ),
    (
        "--shutdownTimeout",
        "shutdown_timeout",
        _seconds_or_zero,
        (),
        "on SIGTERM: seconds to finish running tasks and upload (default 30)",
    ),
    (
        "--shutdownPollReserve",
        "shutdown_poll_reserve",
        _seconds_or_zero,
        (),
        "on SIGTERM: an open long poll is cut this many s before the shutdown deadline,"
        " the time kept to run what it brings (default 10)",
    ),
    (
        "--pollInterval",
        "poll_interval",
        _seconds_or_zero,
        (),
        "seconds to wait after an empty get-task, +-0.2 s jitter (default 1)",
    ),
    (
        "--verify",
        "verify",
        str2bool,
        ("verify",),
        "verify TLS certificates; false logs a warning (default true)",
    ),
    (
        "--caBundle",
        "ca_bundle",
        str,
        (),
        "CA bundle file or folder for TLS verification (default REQUESTS_CA_BUNDLE or"
        " CURL_CA_BUNDLE when set, else certifi's bundle)",
    ),
    ("--debugMode", "debug_mode", str2bool, (), "DEBUG logging (default false)"),
    ("--logFormat", "log_format", str, (), "text, or json: one object per line (default text)"),
    (
        "--enableStdoutLogging",
        "enable_stdout_logging",
        str2bool,
        (),
        "log to stdout (default true)",
    ),
    (
        "--enableFileLogging",
        "enable_file_logging",
        str2bool,
        (),
        "also write <state>/log/app_log<index>.log, 0600 (default true)",
    ),
    (
        "--logDir",
        "log_dir",
        str,
        (),
        "folder of app_log<index>.log and metrics/ (default <state>/log)",
    ),
    (
        "--metricsFile",
        "enable_metrics_file",
        str2bool,
        (),
        "write the JSON-lines metrics file of today's agent (default true)",
    ),
    (
        "--metricsRetentionDays",
        "metrics_retention_days",
        _int(0, 3650),
        ("metricsRetentionDays",),
        "days of metrics files kept (default 7)",
    ),
    (
        "--uploadToAc",
        "upload_to_ac",
        str2bool,
        (),
        "bodies over 512,000 bytes go to upload-result (true) or to S3 (false) (default true)",
    ),
    ("--inwardProxyHttps", "inward_proxy_https", str, (), "HTTPS proxy for target requests"),
    ("--inwardProxyHttp", "inward_proxy_http", str, (), "HTTP proxy for target requests"),
    ("--outgoingProxyHttps", "outgoing_proxy_https", str, (), "HTTPS proxy for AC and S3 calls"),
    ("--outgoingProxyHttp", "outgoing_proxy_http", str, (), "HTTP proxy for AC and S3 calls"),
    ("--ipv4Fallback", "ipv4_fallback", str2bool, (), "resolve names to IPv4 only (default false)"),
    (
        "--spoolDir",
        "spool_dir",
        str,
        (),
        "durable result spool; <state> is $XDG_STATE_HOME/acagent, else"
        " ~/.local/state/acagent, as root /var/lib/acagent (default <state>/spool<index>)",
    ),
    (
        "--allowedTargets",
        "allowed_targets",
        _allow_list,
        (),
        "comma-separated hosts, *.wildcards and CIDRs tasks may reach (default all)",
    ),
    (
        "--deniedTargets",
        "denied_targets",
        _host_entries,
        (),
        "hosts, *.wildcards and CIDRs tasks may never reach, added to the cloud metadata "
        f"and link-local addresses {', '.join(DEFAULT_DENIED)}; the entry {NO_DEFAULTS} "
        "drops those (default none)",
    ),
    (
        "--allowedUploadHosts",
        "allowed_upload_hosts",
        _host_entries,
        (),
        "loopback/link-local/private hosts or CIDRs an S3 upload URL may point to (default none)",
    ),
    (
        "--sensitiveHeaders",
        "sensitive_headers",
        _header_names,
        (),
        "extra header names stripped when a target redirects to another origin (default none)",
    ),
    (
        "--maxResponseBytes",
        "max_response_bytes",
        _int(0),
        (),
        "cut off (as an error) a body larger than this many bytes; 0 = no cap (default 0)",
    ),
    (
        "--healthAddr",
        "health_addr",
        str,
        (),
        "host:port serving /healthz, /readyz, /metrics; :PORT binds 127.0.0.1 only (default off)",
    ),
    (
        "--readyWindow",
        "ready_window",
        _seconds,
        (),
        "/readyz fails after this many s without a good AC exchange (default 300)",
    ),
    (
        "--statusInterval",
        "status_interval",
        _seconds,
        (),
        "seconds between status lines, also logged on SIGUSR1 (default 60)",
    ),
]

ENV_PREFIX = "ACAGENT_"


def env_name_for(flag: str) -> str:
    """``--executorPoolSize`` -> ``ACAGENT_EXECUTOR_POOL_SIZE`` (every flag has one)."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", flag.lstrip("-"))
    return ENV_PREFIX + words.replace("-", "_").upper()


def env_names_for(flag: str, legacy: Sequence[str]) -> List[str]:
    """The environment names a flag falls back to, in precedence order."""
    return [env_name_for(flag), *legacy]


FLAG_OF_FIELD: Dict[str, str] = {field: flag for flag, field, *_ in _OPTIONS}
FLAG_OF_FIELD["executor_pool_size"] = "--executorPoolSize"

#: defaults of the CLI that differ from the library's (drop-in with today's agent)
_CLI_DEFAULTS: Dict[str, Any] = {"enable_file_logging": True, "enable_metrics_file": True}


#: the usage lines of ``acagent --help``: every subcommand
USAGE = """acagent [run] [OPTIONS]
       acagent check [OPTIONS]
       acagent demo [--agents N] [DEMO OPTIONS]
       acagent --version"""

#: what ``acagent --help`` says before the options
RUN_DESCRIPTION = (
    "ArmorCode on-premises agent: pull tasks from the AC server, run each as an HTTP request"
    " against a tool in your network, upload the result. Subcommands: run (the default),"
    " check (test the settings and the way to the AC server, then exit; see acagent check"
    " --help), demo (the agent on a built-in fake AC server and tool; see acagent demo"
    " --help). Every flag can also be set in the environment under the names shown;"
    " precedence: flag, then ACAGENT_* variable, then old name, then default."
)

#: what ``acagent check --help`` says before the options
CHECK_DESCRIPTION = (
    "Test what the agent needs, with the same flags and environment as run: the settings"
    " and paths, the AC server's name, a TCP and TLS connection (through the configured proxy"
    " and CA bundle), then one get-task with the API key. Prints one line per step and exits"
    " 0 only if every step passed. A task the get-task hands out is run and its result"
    " delivered before the report."
)

#: what ``acagent demo --help`` says before its options
DEMO_DESCRIPTION = (
    "The agent's main job on a built-in fake AC server and fake tool, in this process over"
    " HTTP on 127.0.0.1: a few hundred tasks of mixed sizes through the real pipeline, its"
    " progress, then a summary. Exits 0 only if every result arrived exactly once and matched"
    " the tool's bytes. It runs with settings a production agent would not use (no rate"
    " limit, a short poll interval) and says so at the start."
)

#: the help of ``demo --agents``
DEMO_AGENTS_HELP = (
    "run N agent processes on one API key that share one AC budget through a private"
    " redis-server, and print the AC server's highest in-flight count and its 429 replies"
    " (that run's own options: acagent demo --agents N --help)"
)

#: what ``acagent demo --agents N --help`` says before its options
DEMO_AGENTS_DESCRIPTION = (
    "Several agents share one AC budget: a fake AC server that allows 2 concurrent requests"
    " (429 above that), a fake tool and a private redis-server on 127.0.0.1 (from PATH, or"
    " the one the test extra installs), then N real agent processes on one API key with"
    " --coordinationUrl pointing at it. Prints the server's highest in-flight count, the 429"
    " replies and the throughput against the AC bound. Without a redis-server the agents run"
    " uncoordinated, to show why it is needed."
)


def build_parser(command: str = "run") -> argparse.ArgumentParser:
    """The parser of ``run`` (``acagent [run]``) or of ``check`` (``acagent check``)."""
    if command == "check":
        parser = _Parser(
            prog="acagent check", usage="%(prog)s [OPTIONS]", description=CHECK_DESCRIPTION
        )
    else:
        parser = _Parser(prog="acagent", usage=USAGE, description=RUN_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"acagent {__version__}")
    for flag, field, kind, envs, text in _OPTIONS:
        env_note = f" [env: {', '.join(env_names_for(flag, envs))}]"
        extra: Dict[str, Any] = {}
        if kind is str2bool:
            extra = {"nargs": "?", "const": True, "metavar": "BOOL"}
        elif kind in (_seconds, _seconds_or_zero):
            extra = {"metavar": "SECONDS"}
        elif kind is not str and kind not in _LIST_TYPES:
            extra = {"metavar": "N"}
        else:
            extra = {"metavar": field.split("_")[-1].upper()}
        parser.add_argument(
            flag, dest=field, type=kind, default=None, help=text + env_note, **extra
        )
    return parser


class Settings(NamedTuple):
    """What the command line and the environment say."""

    config: AgentConfig
    #: where the API key came from: ``flag --apiKey``, ``environment NAME``, ``file PATH``
    key_source: str
    #: WARNING lines for the log, once it is set up
    warnings: Tuple[str, ...]


def config_from_args(argv: Sequence[str], environ: Optional[Dict[str, str]] = None) -> AgentConfig:
    """Flags, then ``ACAGENT_*``, then old environment names, then defaults.

    Exits 2 with one line naming the flag on a bad value, also for a path
    setting that cannot work (``AgentConfig.check_paths``).
    """
    return read_settings(argv, environ).config


def read_settings(
    argv: Sequence[str], environ: Optional[Dict[str, str]] = None, *, command: str = "run"
) -> Settings:
    """``config_from_args``, with where the key came from and the warnings to log.

    ``command`` (``run`` or ``check``) names the subcommand in ``--help``."""
    env = os.environ if environ is None else environ
    parser = build_parser(command)
    args = parser.parse_args(list(argv))
    values: Dict[str, Any] = dict(_CLI_DEFAULTS)
    on_command_line = set()
    #: field -> "flag --x" or "environment NAME", for the fields that were given
    given: Dict[str, str] = {}
    for flag, field, kind, envs, _ in _OPTIONS:
        value = getattr(args, field)
        if value is not None:
            on_command_line.add(field)
            given[field] = f"flag {flag}"
        else:
            for name in env_names_for(flag, envs):
                if env.get(name):
                    try:
                        value = kind(env[name])
                    except argparse.ArgumentTypeError as exc:
                        parser.error(f"environment {name} (for {flag}): {exc}")
                    given[field] = f"environment {name}"
                    break
        if value is not None:
            values[field] = value
    pool_size = values.pop("pool_size", None)
    # --executorPoolSize beats its old name --poolSize, and a flag beats a variable
    if pool_size is not None and (
        "executor_pool_size" not in values
        or ("pool_size" in on_command_line and "executor_pool_size" not in on_command_line)
    ):
        values["executor_pool_size"] = pool_size
    for name in ("allowed_targets", "denied_targets", "allowed_upload_hosts", "sensitive_headers"):
        if name in values:
            values[name] = tuple(values[name])
    if values.get("coordination_url"):
        from ..ac.permits import PASSWORD_ENV, CoordinationUnavailable, require_redis

        try:
            require_redis()
        except CoordinationUnavailable as exc:
            parser.error(str(exc))
        values["coordination_password"] = env.get(PASSWORD_ENV) or None
    if values.get("coordination_password") and "coordination_password_file" in values:
        parser.error(
            "argument --coordinationPasswordFile: give the Redis password once, "
            "in ACAGENT_COORDINATION_PASSWORD or in --coordinationPasswordFile, not both"
        )
    if "api_key" in values and "api_key_file" in values:
        parser.error(
            f"argument --apiKeyFile: give the API key once: --apiKey (here from "
            f"{given['api_key']}) or --apiKeyFile, not both"
        )
    if not values.get("server_url"):
        names = " or ".join(env_names_for("--serverUrl", ("server_url",)))
        parser.error(f"--serverUrl is required (or the environment variable {names})")
    if not values.get("api_key") and not values.get("api_key_file"):
        names = " or ".join(
            [*env_names_for("--apiKey", ("api_key",)), env_name_for("--apiKeyFile")]
        )
        parser.error(f"--apiKey or --apiKeyFile is required (or the environment variable {names})")
    try:
        config = AgentConfig(**values)
        config.check_paths()
    except ConfigError as exc:
        parser.error(f"argument {FLAG_OF_FIELD.get(exc.field, exc.field)}: {exc.message}")
    key_source = (
        f"file {config.api_key_file}" if config.api_key_file is not None else given["api_key"]
    )
    return Settings(config, key_source, start_warnings(config, "api_key" in on_command_line))


def start_warnings(config: AgentConfig, key_on_command_line: bool) -> Tuple[str, ...]:
    """What an operator should change, though the agent can run as it is."""
    lines = []
    if key_on_command_line:
        lines.append(
            "--apiKey on the command line is visible to every user of this machine in the "
            "process list: put the key in a file only the agent can read and pass --apiKeyFile"
        )
    for field in ("api_key_file", "coordination_password_file"):
        path = getattr(config, field)
        if path is not None and secret_file_exposed(path):
            lines.append(
                f"{FLAG_OF_FIELD[field]} {path} can be read by group or others: "
                f"chmod 600 {path} (or 400)"
            )
    if config.ac_max_concurrent > AC_SERVER_CONCURRENT_LIMIT:
        lines.append(
            f"--acMaxConcurrent {config.ac_max_concurrent} is above "
            f"{AC_SERVER_CONCURRENT_LIMIT}, the AC server's limit of concurrent requests per "
            "API key: expect 429 'Too many concurrent requests' replies"
        )
    return tuple(lines)


def startup_line(config: AgentConfig) -> str:
    """The line logged before the pipeline starts: version, server, spool, log file, changes."""
    return config.describe(baseline=_CLI_DEFAULTS)
