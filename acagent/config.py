"""AgentConfig: one frozen, validated settings object.

Every knob of the agent lives here with its default. The CLI (``cli/options.py``)
turns flags and environment variables into an ``AgentConfig``; library users
build one directly. ``AgentConfig.validate()`` runs at construction, so an
invalid object cannot exist: each problem raises ``ConfigError`` naming the
field (the CLI maps the field back to its flag).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
import stat
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from . import folders, logs
from ._version import __version__
from .errors import ConfigError

#: Largest body that goes inline (base64) in put-result; larger ones are uploaded.
INLINE_BODY_LIMIT = 512_000

#: Largest body kept inside its spool record (base64) instead of a body file of
#: its own. Most results are small: this saves a file, its fsync and its unlink
#: per task. Bounded so the results of a run held in memory stay small (at
#: most ``response_queue_threshold`` plus the executor slots of them wait for
#: upload, the Ledger's bound); at most INLINE_BODY_LIMIT.
RECORD_BODY_LIMIT = 16 * 1024

#: AC requests the server takes at once per API key (docs/protocol.md); above it,
#: 429 "Too many concurrent requests"
AC_SERVER_CONCURRENT_LIMIT = 2


def default_base_dir() -> str:
    """The folder of the default spool and log folders (``folders.default_base_dir``)."""
    return folders.default_base_dir()


#: what ``index`` may hold: it becomes part of file and folder names
_INDEX_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")


@dataclass(frozen=True)
class AgentConfig:
    """All settings of one agent. Field names are the snake_case of the CLI flags."""

    server_url: str
    #: the key itself; may be left empty when ``api_key_file`` is given
    api_key: str = dataclasses.field(default="", repr=False)
    #: file holding the API key, read at construction when ``api_key`` is
    #: empty, and re-read by the client while the server refuses the key
    #: (so a rotated key is used without a restart)
    api_key_file: Optional[str] = None
    env_name: str = ""
    #: suffix of the log and metrics file names (today's agent: ``_prod``)
    index: str = "_prod"

    # -- capacity and backpressure ------------------------------------------
    executor_pool_size: int = 10
    #: tasks the Fetcher may hold beyond the free executor slots
    prefetch: int = 1
    #: the Fetcher pauses while this many results wait for upload
    response_queue_threshold: int = 80
    #: requests open to the AC server at once, never more
    ac_max_concurrent: int = 2
    #: client-side budget per operation class (fetch, upload); 0 = off
    rate_limit_per_min: int = 250
    #: ``redis://`` or ``rediss://`` URL: share the AC budget (permits and rate
    #: limit) with every agent on the API key; None = in-process permits
    coordination_url: Optional[str] = dataclasses.field(default=None, repr=False)
    #: Redis password when the URL carries none (``ACAGENT_COORDINATION_PASSWORD``)
    coordination_password: Optional[str] = dataclasses.field(default=None, repr=False)
    #: file holding the Redis password, read at construction when
    #: ``coordination_password`` is None
    coordination_password_file: Optional[str] = None
    #: seconds a shared permit outlives a dead holder (renewed while held)
    coordination_lease: float = 10.0
    #: more AC calls in a row this agent makes on a shared permit before it
    #: goes back to the queue (no Redis round trip, no hand-off); 0 = off
    coordination_keep_calls: int = 8
    #: idle wait after an empty get-task, randomised by +-``poll_jitter``
    poll_interval: float = 1.0
    poll_jitter: float = 0.2

    # -- timeouts (seconds) ----------------------------------------------------
    #: target connect timeout
    connect_timeout: float = 15.0
    #: longest silence tolerated from a target while reading (capped by expiry)
    timeout: float = 30.0
    ac_connect_timeout: float = 25.0
    #: AC read timeout; get-task may be held open by the server (long poll)
    read_timeout_seconds: float = 100.0
    #: read timeout of upload-result, upload-logs and the S3 PUT
    upload_timeout: float = 300.0
    #: an AC or S3 connection older than this is replaced before its next
    #: request (a rotated certificate or a moved server is picked up); 0 = never
    ac_connection_max_age: float = 900.0
    #: default task lifetime when a task has no ``expiryTsMs``
    default_task_ttl: float = 300.0
    #: on stop: time running tasks get to finish and results to upload
    shutdown_timeout: float = 30.0
    #: on stop: a get-task the server holds open may end by itself until this
    #: long before the shutdown deadline (the time kept to run and answer what
    #: it brings); then its connection is shut
    shutdown_poll_reserve: float = 10.0

    # -- TLS and proxies ------------------------------------------------------
    #: verify TLS certificates of the AC server, S3 and targets
    verify: bool = True
    #: CA bundle file or folder used when verifying; None = certifi / REQUESTS_CA_BUNDLE
    ca_bundle: Optional[str] = None
    inward_proxy_https: Optional[str] = None
    inward_proxy_http: Optional[str] = None
    outgoing_proxy_https: Optional[str] = None
    outgoing_proxy_http: Optional[str] = None
    #: resolve hostnames to IPv4 only (networks with broken IPv6)
    ipv4_fallback: bool = False

    # -- results --------------------------------------------------------------
    #: bodies above INLINE_BODY_LIMIT go to upload-result (True) or to S3 (False)
    upload_to_ac: bool = True
    #: folder of the durable result spool; None = ``<state>/spool<index>``, where
    #: ``<state>`` is ``folders.default_base_dir()`` (per user, kept across reboots)
    spool_dir: Optional[str] = None
    #: a body larger than this is cut off and reported as an error; 0 = no cap
    max_response_bytes: int = 0
    #: target hosts allowed (names, ``*.wildcards``, CIDRs); empty = all
    allowed_targets: Tuple[str, ...] = ()
    #: target hosts denied on top of the cloud metadata addresses
    #: (``targets.policy.DEFAULT_DENIED``); the entry ``no-defaults`` drops those
    denied_targets: Tuple[str, ...] = ()
    #: hosts (names, ``*.wildcards``, CIDRs) an S3 upload URL may point to even
    #: though they are loopback, link-local or private
    allowed_upload_hosts: Tuple[str, ...] = ()
    #: header names stripped on a redirect to another origin, on top of
    #: ``targets.session.SENSITIVE_HEADERS``
    sensitive_headers: Tuple[str, ...] = ()
    #: retries of one AC upload call before the result waits in the spool

    # -- observability --------------------------------------------------------
    debug_mode: bool = False
    log_format: str = "text"
    enable_stdout_logging: bool = True
    #: also write today's rotating log file under ``<state>/log``
    enable_file_logging: bool = False
    metrics_retention_days: int = 7
    #: also write today's JSON-lines metrics file
    enable_metrics_file: bool = False
    #: ``host:port`` of the health/metrics listener; None = off
    health_addr: Optional[str] = None
    #: /readyz fails when no AC exchange succeeded for this long
    ready_window: float = 300.0
    status_interval: float = 60.0
    log_dir: Optional[str] = None

    def __post_init__(self) -> None:
        # Frozen: the values read from the files are set once, here.
        if self.api_key_file is not None and not self.api_key:
            object.__setattr__(self, "api_key", read_secret_file("api_key_file", self.api_key_file))
        if self.coordination_password_file is not None and self.coordination_password is None:
            password = read_secret_file(
                "coordination_password_file", self.coordination_password_file
            )
            object.__setattr__(self, "coordination_password", password)
        self.validate()

    # ------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for the first invalid field."""
        url = urlsplit(self.server_url or "")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError("server_url", f"must be an http(s) URL, got {self.server_url!r}")
        if not self.api_key:
            raise ConfigError("api_key", "is required")
        if not _INDEX_RE.fullmatch(self.index):
            raise ConfigError(
                "index",
                f"may hold only letters, digits, '_' and '-' (64 at most), got {self.index!r}",
            )
        for name in ("spool_dir", "log_dir"):
            if getattr(self, name) == "":
                raise ConfigError(name, "is empty: give a folder, or leave it out for the default")
        _positive_int(self, "executor_pool_size", low=1, high=2000)
        _positive_int(self, "prefetch", low=0, high=10_000)
        _positive_int(self, "response_queue_threshold", low=1, high=1_000_000)
        _positive_int(self, "ac_max_concurrent", low=1, high=64)
        _positive_int(self, "rate_limit_per_min", low=0, high=10_000_000)
        _positive_int(self, "coordination_keep_calls", low=0, high=1000)
        _positive_int(self, "max_response_bytes", low=0, high=2**62)
        _positive_int(self, "metrics_retention_days", low=0, high=3650)
        for name in (
            "connect_timeout",
            "timeout",
            "ac_connect_timeout",
            "read_timeout_seconds",
            "upload_timeout",
            "default_task_ttl",
            "status_interval",
            "ready_window",
            "coordination_lease",
        ):
            _positive_float(self, name, allow_zero=False)
        if self.coordination_lease < 0.5:
            raise ConfigError("coordination_lease", "must be >= 0.5 seconds")
        if self.coordination_url is not None:
            coord = urlsplit(self.coordination_url)
            if coord.scheme not in ("redis", "rediss") or not coord.hostname:
                raise ConfigError(
                    "coordination_url", "must be a redis:// or rediss:// URL with a host"
                )
        for name in (
            "poll_interval",
            "poll_jitter",
            "shutdown_timeout",
            "shutdown_poll_reserve",
            "ac_connection_max_age",
        ):
            _positive_float(self, name, allow_zero=True)
        if self.log_format not in ("text", "json"):
            raise ConfigError("log_format", f"must be 'text' or 'json', got {self.log_format!r}")
        if self.health_addr is not None:
            parse_host_port(self.health_addr, field_name="health_addr")
        from .targets.policy import HostList, TargetPolicy

        try:
            TargetPolicy(self.allowed_targets)
        except ValueError as exc:
            raise ConfigError("allowed_targets", f"has an invalid entry: {exc}") from None
        try:
            TargetPolicy((), self.denied_targets)
        except ValueError as exc:
            raise ConfigError("denied_targets", f"has an invalid entry: {exc}") from None
        try:
            HostList(self.allowed_upload_hosts)
        except ValueError as exc:
            raise ConfigError("allowed_upload_hosts", f"has an invalid entry: {exc}") from None
        for name in (
            "inward_proxy_https",
            "inward_proxy_http",
            "outgoing_proxy_https",
            "outgoing_proxy_http",
        ):
            value = getattr(self, name)
            if value is not None:
                _check_proxy_url(name, value)

    # ------------------------------------------------------------------
    def replace(self, **changes: Any) -> AgentConfig:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def base_url(self) -> str:
        return self.server_url.rstrip("/")

    @property
    def outgoing_proxies(self) -> Optional[Dict[str, str]]:
        return _proxies(self.outgoing_proxy_http, self.outgoing_proxy_https)

    @property
    def inward_proxies(self) -> Optional[Dict[str, str]]:
        return _proxies(self.inward_proxy_http, self.inward_proxy_https)

    @property
    def tls_verify(self) -> bool | str:
        """The value for requests' ``verify=``."""
        return self.tls_verify_for(self.verify)

    def tls_verify_for(self, enabled: bool) -> bool | str:
        """requests' ``verify=`` with verification on or off, keeping the CA bundle."""
        return (self.ca_bundle or True) if enabled else False

    @property
    def executor_slots(self) -> int:
        """Tasks the agent may hold at once before any result is queued."""
        return self.executor_pool_size + self.prefetch

    def resolved_spool_dir(self) -> str:
        return self.spool_dir or os.path.join(default_base_dir(), f"spool{self.index}")

    def resolved_log_dir(self) -> str:
        return self.log_dir or os.path.join(default_base_dir(), "log")

    def log_file(self) -> Optional[str]:
        """The log file the agent writes, or None when file logging is off."""
        if not self.enable_file_logging:
            return None
        return os.path.join(self.resolved_log_dir(), f"app_log{self.index}.log")

    # ------------------------------------------------------------------
    def check_paths(self) -> None:
        """Raise ConfigError for the first path setting that cannot work.

        Run before anything starts (the CLI does): the spool folder and, when
        files are written there, the log folder must be creatable and
        writable (they are created here, 0700, as the agent would); the CA
        bundle must be a readable file or folder of PEM certificates.
        """
        spool = self.resolved_spool_dir()
        _check_writable_dir("spool_dir", spool)
        folders.own_folder("spool_dir", os.path.join(spool, "quarantine"), create=False)
        if self.enable_file_logging or self.enable_metrics_file:
            _check_writable_dir("log_dir", self.resolved_log_dir())
        log_file = self.log_file()
        if log_file is not None and os.path.islink(log_file):
            # the file handler would refuse it too (O_NOFOLLOW), less plainly
            raise ConfigError(
                "log_dir", f"{log_file} is a symbolic link; the agent never follows one"
            )
        if self.ca_bundle is not None:
            _check_ca_bundle(self.ca_bundle)

    def describe(self, baseline: Optional[Mapping[str, Any]] = None) -> str:
        """One start-up line: version, server URL, spool, log file, non-default settings.

        ``baseline`` overrides the defaults a setting is compared with (the
        CLI's own defaults). Secrets never appear: the API key is left out,
        and the server and proxy URLs lose any user:password and query.
        """
        base = dict(baseline or {})
        parts = [
            f"acagent {__version__}",
            f"server={safe_url(self.server_url)}",
            f"spool={self.resolved_spool_dir()}",
            f"log_file={self.log_file() or 'off'}",
        ]
        changed = []
        for f in dataclasses.fields(self):
            if f.name in _NOT_DESCRIBED:
                continue
            if f.name in base:
                default = base[f.name]
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                continue
            value = getattr(self, f.name)
            if value == default:
                continue
            changed.append(f"{f.name}={_shown(value)}")
        parts.append("settings: " + (" ".join(changed) if changed else "all defaults"))
        return " ".join(parts)


#: fields ``describe`` leaves out: secrets, and those it shows on their own
_NOT_DESCRIBED = frozenset({"api_key", "coordination_password", "server_url", "spool_dir"})


def read_secret_file(field_name: str, path: str) -> str:
    """The secret held in ``path`` (one trailing newline dropped), masked in logs
    from now on. Raises ConfigError naming ``field_name`` when the file is
    missing, unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(field_name, f"file does not exist: {path}") from None
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(field_name, f"cannot read {path}: {reason}") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text.strip():
        raise ConfigError(field_name, f"file is empty: {path}")
    logs.register_secret(text)
    return text


def secret_file_exposed(path: str) -> bool:
    """True when others than this user may read ``path`` and this user could
    change that (a secret should be 0600 or 0400; see ``secret_mode_exposed``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    euid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    return secret_mode_exposed(st.st_mode, st.st_uid, euid)


def secret_mode_exposed(mode: int, owner: int, euid: int) -> bool:
    """The rule of ``secret_file_exposed``. Readable by others: exposed. Readable
    by the group: exposed only in a file this user owns; one owned by another
    user (root) and readable through a group is how a Kubernetes Secret volume
    with ``fsGroup`` hands a key over (0440), and no chmod can change it there."""
    if mode & stat.S_IROTH:
        return True
    return bool(mode & stat.S_IRGRP) and owner == euid


def _shown(value: Any) -> str:
    """A setting as the start-up line shows it: URLs (proxies, Redis...) lose credentials."""
    if isinstance(value, (tuple, list, frozenset, set)):
        return ",".join(_shown(v) for v in value)
    text = str(value)
    return safe_url(text) if "://" in text else text


def safe_url(url: str) -> str:
    """``url`` without user:password, query or fragment (safe to log)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else netloc + parts.path


_PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")


def _check_proxy_url(name: str, value: str) -> None:
    parts = urlsplit(value)
    problem = ""
    if parts.scheme not in _PROXY_SCHEMES:
        problem = "has no http:// or https:// scheme"
    elif not parts.hostname:
        problem = "has no host"
    else:
        try:
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            problem = "has an invalid port"
    if problem:
        shown = safe_url(value) if parts.scheme else "<not a URL>"
        raise ConfigError(name, f"must be a proxy URL like http://host:port ({problem}): {shown}")


def _check_writable_dir(name: str, path: str) -> None:
    folders.own_folder(name, path)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(name, f"folder is not writable: {path}")


def _check_ca_bundle(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError("ca_bundle", f"file or folder does not exist: {path}")
    if not os.access(path, os.R_OK):
        raise ConfigError("ca_bundle", f"is not readable: {path}")
    if os.path.isdir(path):
        return  # a c_rehash folder: certificates are looked up by hash when needed
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise ConfigError(
            "ca_bundle", f"holds no usable PEM certificate ({reason}): {path}"
        ) from None


def _proxies(http: Optional[str], https: Optional[str]) -> Optional[Dict[str, str]]:
    proxies: Dict[str, str] = {}
    if http:
        proxies["http"] = http
    if https:
        proxies["https"] = https
    return proxies or None


def _positive_int(cfg: AgentConfig, name: str, *, low: int, high: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, f"must be a whole number from {low} to {high}, got {value!r}")


def _positive_float(cfg: AgentConfig, name: str, *, allow_zero: bool) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and (not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero)):
        ok = False
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(name, f"must be a finite number {bound}, got {value!r}")


def parse_host_port(text: str, *, field_name: str = "address") -> Tuple[str, int]:
    """``"host:port"`` (or ``":port"``) to ``(host, port)``; raises ConfigError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(field_name, f"must be host:port, got {text!r}")
    # A host-less ":PORT" means this machine only; exposing the listener
    # takes an explicit address (0.0.0.0, a NIC's address).
    return (host.strip("[]") or "127.0.0.1"), int(port_text)
