"""ACClient: the one way to talk to the AC server.

One keep-alive ``requests.Session`` (pool sized to the permit count) and a
``Permits`` object (``permits.py``): by default a
``threading.BoundedSemaphore(ac_max_concurrent)`` in this process, with
``--coordinationUrl`` leases in Redis shared by every agent on the API key
(then the rate limit is one shared bucket too). A permit is held for the
whole of every AC call, from sending the request until the reply is read, so
the number of requests open to the server never exceeds the permit count,
whatever the number of threads using the client. Between retry attempts the
permit is released, so a call waiting out a 429 does not block the others.

Each AC request is sent by ``ACTransport`` (``transport.py``) straight to
the session adapter's connection pool: requests' proxies and TLS, without
the per-call session work (about a quarter of an AC call's CPU).

The S3 PUT goes to a presigned URL, not to the AC server: it uses its own
session, carries no ``Authorization`` header and takes no permit.

The API key of a config with ``api_key_file`` can change while the agent
runs (``reload_api_key``): every AC request reads the ``Authorization``
header from one attribute, replaced whole, so a request carries the old key
or the new one, never a mix, and the next request after a reload carries the
new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlencode, urlsplit

import requests
import urllib3.util.connection
from requests.adapters import HTTPAdapter

from .._version import __version__
from ..config import AgentConfig, read_secret_file
from ..connage import ConnectionAges
from ..envsession import EnvCachedSession
from ..errors import (
    ACConnectionError,
    ACHTTPError,
    ACRateLimitError,
    AgentError,
    AgentStopping,
    BadReplyError,
    ConfigError,
    TaskError,
    UnreadReplyError,
    UploadURLRefused,
)
from ..globalconfig import RuntimeSettings
from ..logs import scrub_text
from ..logthrottle import LogThrottle
from ..models import Task
from ..targets.policy import GuardedAdapter, TargetDenied, UploadPolicy, unambiguous_host
from .abandon import ConnectionTracker, FetchStop, TrackingAdapter
from .adaptive import Signal, is_retrying_overload
from .multipart import MultipartBody
from .permits import Permits, RedisPermits, permits_for
from .ratelimit import FETCH, UPLOAD, RateLimits
from .retry import RetryPolicy, run_with_retries, server_wait
from .transport import NETWORK_ERRORS, ACReply, ACTransport, is_stale_reset

log = logging.getLogger("acagent.client")

API_PREFIX = "/api/http-teleport/"

#: the HTTP method of each AC endpoint (``s3`` is the presigned PUT)
ENDPOINT_METHODS = {
    "get-task": "GET",
    "upload-url": "GET",
    "put-result": "POST",
    "upload-result": "POST",
    "upload-logs": "POST",
    "s3": "PUT",
}


def endpoint_method(endpoint: str) -> str:
    return ENDPOINT_METHODS.get(endpoint, "POST")


#: called after every exchange: (endpoint, status or "error", seconds)
ExchangeHook = Callable[[str, str, float], None]

#: what a failed S3 PUT (sent with requests) raises
_S3_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def make_agent_id() -> str:
    """``<unix seconds>_<6 hex>``, once per process start, like today's agent."""
    return f"{int(time.time())}_{uuid.uuid4().hex[:6]}"


def force_ipv4() -> None:
    """Resolve hostnames to IPv4 only, process-wide (``--ipv4Fallback``)."""
    urllib3.util.connection.allowed_gai_family = lambda: socket.AF_INET


def build_session(
    pool_size: int,
    *,
    user_agent: Optional[str] = None,
    session: Optional[requests.Session] = None,
    tracker: Optional[ConnectionTracker] = None,
    ages: Optional[ConnectionAges] = None,
) -> requests.Session:
    """A keep-alive session whose pool keeps ``pool_size`` connections per host.

    ``session`` (default: a new ``EnvCachedSession``) gets the pooled
    adapters; ``user_agent`` replaces requests' own when given; with
    ``tracker``, connections note which thread uses them (see ``abandon.py``),
    and with ``ages`` too, old ones are retired between requests (``connage.py``).
    """
    session = session if session is not None else EnvCachedSession()
    adapter = (
        HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        if tracker is None
        else TrackingAdapter(
            tracker, ages, pool_connections=4, pool_maxsize=pool_size, max_retries=0
        )
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if user_agent is not None:
        session.headers["User-Agent"] = user_agent
    return session


class ACClient:
    """Speaks the http-teleport protocol to the AC server (docs/protocol.md)."""

    #: after an AC request failed on the network (a reset, above all), how long
    #: its permit stays held before a re-send or another call may use it: the
    #: server may finish counting that request in flight only after the client
    #: saw its connection go, and a request at once on a new connection would
    #: be a third one at the server (seen in the soak test: 3 in flight)
    RESET_SETTLE_SECONDS = 0.05

    def __init__(
        self,
        config: AgentConfig,
        *,
        agent_id: Optional[str] = None,
        version: str = __version__,
        retry_policy: Optional[RetryPolicy] = None,
        rate_limits: Optional[RateLimits] = None,
        abort: Optional[threading.Event] = None,
        on_exchange: Optional[ExchangeHook] = None,
        permits: Optional[Permits] = None,
        settings: Optional[RuntimeSettings] = None,
    ) -> None:
        """``permits``: default from the config (Redis leases with a coordination URL,
        else in-process); one passed in is the caller's to close. ``settings``:
        where TLS verification is read (the Pipeline's, which globalConfig
        changes); default from the config."""
        self.config = config
        self.settings = settings if settings is not None else RuntimeSettings.of(config)
        self.agent_id = agent_id or make_agent_id()
        self.version = version
        self.retry_policy = retry_policy or RetryPolicy()
        self.rate_limits = rate_limits or RateLimits(config.rate_limit_per_min)
        #: set when the agent must stop at once: retry sleeps and permit waits end
        self.abort = abort or threading.Event()
        self.on_exchange = on_exchange
        self.max_concurrent = config.ac_max_concurrent
        self._owns_permits = permits is None
        if permits is None:
            permits = permits_for(config, self.retry_policy.store_reconnect)
        self.permits: Permits = permits
        if isinstance(self.permits, RedisPermits):
            # The server's rate limit is per key too: one bucket for all agents.
            shared = self.permits
            self.rate_limits.share(
                shared.store,
                shared.prefix,
                shared.store_errors,
                on_store_error=shared.report_store_error,
                on_store_ok=shared.report_store_ok,
                reconnect=self.retry_policy.store_reconnect,
            )
        self._count_lock = threading.Lock()
        #: (thread, is a get-task) of the AC call on each held lease, to cut it if it lapses
        self._lease_threads: Dict[object, Tuple[int, bool]] = {}
        self.permits.on_lapse = self._cut_lapsed
        user_agent = f"acagent/{version}"
        self._tracker = ConnectionTracker()
        #: the thread in get-task right now
        self._fetching_thread: Optional[int] = None
        #: set once no new get-task may start (``stop_fetching``), or on abort
        self.fetch_stop = FetchStop(lambda: self.abort.is_set())
        #: AC calls re-sent at once after a reset on a reused connection
        self.resends = 0
        #: AC and S3 connections older than ac_connection_max_age are replaced
        self.ac_ages = ConnectionAges(config.ac_connection_max_age, "AC server")
        self.s3_ages = ConnectionAges(config.ac_connection_max_age, "upload storage")
        self.session = build_session(
            config.ac_max_concurrent,
            user_agent=user_agent,
            tracker=self._tracker,
            ages=self.ac_ages,
        )
        #: the Authorization header of every AC request, set per request (not
        #: on the session, whose headers the transport reads once): see
        #: ``reload_api_key``
        self._authorization = f"Bearer {config.api_key}"
        self._api_key = config.api_key
        self._key_lock = threading.Lock()
        self._key_read_log = LogThrottle(60.0)
        #: how many times the key changed since the start
        self.key_version = 0
        #: the last AC reply about the key was a 401/403 (cleared by a 2xx)
        self.key_refused = False
        self._fetch_waiting = 0
        self.transport = ACTransport(
            self.session, self._url("get-task"), self.config.outgoing_proxies
        )
        #: where presigned upload URLs may point (checked on the connection made)
        self.upload_policy = UploadPolicy(
            config.allowed_upload_hosts, server_host=urlsplit(config.server_url).hostname or ""
        )
        self.s3_session = build_session(2, user_agent=user_agent)
        s3_adapter = GuardedAdapter(
            self.upload_policy, self.s3_ages, pool_connections=4, pool_maxsize=2, max_retries=0
        )
        self.s3_session.mount("http://", s3_adapter)
        self.s3_session.mount("https://", s3_adapter)
        self._closed = False

    # -- lifecycle -----------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.transport.close()
            self.session.close()
            self.s3_session.close()
            if self._owns_permits:
                self.permits.close()

    def __enter__(self) -> ACClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def inflight(self) -> int:
        """AC requests open right now (never above ``max_concurrent``): each
        holds a permit, so the permits count them."""
        return self.permits.holders

    @property
    def verify(self) -> Union[bool, str]:
        """requests' ``verify=`` for the AC server and S3 (``settings.verify``)."""
        return self.settings.verify

    def set_verify(self, verify: bool) -> None:
        """globalConfig ``verifyCert``: keep the CA bundle when turning verification on."""
        self.settings.set_verify(verify)

    def stop_fetching(self, *, from_signal: bool = False) -> None:
        """No new get-task from now on; one in flight is left to end (see ``abandon.py``).

        ``from_signal``: called from a signal handler, so no lock is taken.
        """
        if from_signal:
            self.fetch_stop.signal()
        else:
            self.fetch_stop.set()

    def abandon_fetch(self) -> bool:
        """Shut the connection of a get-task in flight (a stop's last resort).

        A task the server hands out on it from now on is lost unless the
        server notices the closed connection first: see ``abandon.py``.
        """
        self.fetch_stop.set()
        return self._tracker.shut(self._fetching_thread)

    @property
    def api_key(self) -> str:
        """The key AC requests carry now (``config.api_key`` until a reload)."""
        return self._api_key

    def reload_api_key(self) -> bool:
        """Re-read ``config.api_key_file``; True if it holds a new key, used from
        the next AC request on. False without a key file, for the same key, or
        when the file cannot be read now (logged; the current key stays)."""
        path = self.config.api_key_file
        if path is None:
            return False
        with self._key_lock:  # one reader at a time: the fetcher and a SIGHUP
            try:
                key = read_secret_file("api_key_file", path)
            except ConfigError as exc:
                if self._key_read_log.ready():  # it is tried again every second
                    log.error("cannot re-read the API key (--apiKeyFile): %s", exc.message)
                return False
            if key == self._api_key:
                return False
            self._api_key = key
            self._authorization = f"Bearer {key}"  # one reference swap: atomic
            self.key_version += 1
        log.warning("API key reloaded from %s", path)
        return True

    def _gave_up(self, endpoint: str) -> bool:
        return self.abort.is_set() or (endpoint == "get-task" and self.fetch_stop.is_set())

    # -- the permit ----------------------------------------------------
    @property
    def fetch_waiting(self) -> bool:
        """A get-task is waiting for a permit now (a borrowing upload steps aside)."""
        return self._fetch_waiting > 0

    def _cut_lapsed(self, lease: object) -> None:
        """A held lease lapsed (``permits.py``): shut the AC request made on it,
        which then fails as a network error (retried like one). A get-task's
        connection is shut for sending only: a server that notices ends the
        request, and a task it still hands out on it is read, not lost."""
        with self._count_lock:
            ident, fetch = self._lease_threads.get(lease, (None, False))
        self._tracker.shut(ident, socket.SHUT_WR if fetch else socket.SHUT_RDWR)

    @contextlib.contextmanager
    def _permit(self, op_class: str) -> Iterator[object]:
        # The wait ends on abort even while all permits are taken by slow calls
        # (a get-task's wait also ends when fetching stops).
        fetch = op_class == FETCH
        if fetch:
            with self._count_lock:
                self._fetch_waiting += 1
        try:
            lease = self.permits.acquire(self.fetch_stop if fetch else self.abort)
        finally:
            if fetch:
                with self._count_lock:
                    self._fetch_waiting -= 1
        if lease is None:
            raise AgentStopping("stopped while waiting for an AC permit")
        with self._count_lock:
            self._lease_threads[lease] = (threading.get_ident(), fetch)
        try:
            yield lease
        finally:
            with self._count_lock:
                self._lease_threads.pop(lease, None)
            self.permits.release(lease)

    # -- one exchange ----------------------------------------------------
    def _url(self, endpoint: str) -> str:
        return f"{self.config.base_url}{API_PREFIX}{endpoint}"

    def _send(
        self,
        endpoint: str,
        params: Optional[Mapping[str, str]],
        data: Any,
        headers: Mapping[str, str],
        timeout: Tuple[float, float],
    ) -> ACReply:
        """Send one AC request and read the whole reply (``transport.py``)."""
        url = self._url(endpoint)
        if params:
            url += "?" + urlencode(params)
        return self.transport.send(
            ENDPOINT_METHODS[endpoint], url, data, headers, timeout, self.verify
        )

    def _report(self, endpoint: str, status: str, started: float) -> None:
        if self.on_exchange is not None:
            try:
                self.on_exchange(endpoint, status, time.monotonic() - started)
            except Exception:  # a broken observer must not break the call
                log.exception("exchange hook failed")

    def _exchange(
        self,
        endpoint: str,
        op_class: str,
        *,
        timeout: Tuple[float, float],
        params: Optional[Mapping[str, str]] = None,
        json_body: Any = None,
        body_factory: Optional[Callable[[], MultipartBody]] = None,
    ) -> ACReply:
        """One attempt: rate token, permit, request, reply read, permit back."""
        fetch = op_class == FETCH
        if not self.rate_limits[op_class].acquire(stop=self.fetch_stop if fetch else self.abort):
            raise AgentStopping("stopped while waiting for the rate limiter")
        # per request, over the transport's copy of the session headers
        headers: Dict[str, str] = {"Authorization": self._authorization}
        data: Any = None
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        body: Optional[MultipartBody] = None
        if body_factory is not None:
            body = body_factory()
            data = body
            headers["Content-Type"] = body.content_type
        try:
            with self._permit(op_class) as lease:
                for fresh_try in (False, True):
                    started = time.monotonic()
                    if fetch and self.fetch_stop.is_set():
                        # Looked at last, right before sending: a stop that
                        # came during the waits above sends no get-task.
                        raise AgentStopping("stopping: no new get-task")
                    if not self.permits.valid(lease):
                        raise ACConnectionError(f"{endpoint}: its AC permit lapsed; not sent")
                    try:
                        reply = self._send(endpoint, params, data, headers, timeout)
                        break
                    except NETWORK_ERRORS as exc:
                        self._report(endpoint, "error", started)
                        # The server may still count this request in flight
                        # for a moment after its connection went: the permit
                        # is neither reused nor given back before that.
                        self.abort.wait(self.RESET_SETTLE_SECONDS)
                        if fresh_try or not is_stale_reset(exc) or self._gave_up(endpoint):
                            raise ACConnectionError(
                                f"{endpoint}: {type(exc).__name__}: {exc}"
                            ) from exc
                        # The server closed a kept-alive connection as we
                        # reused it: try once more, at once, on a fresh one.
                        # The request may have reached the server: counted.
                        self.resends += 1
                        self._report(endpoint, "resend", started)
                        log.debug("%s: connection reset on reuse; re-sending", endpoint)
                        if body_factory is not None:
                            assert body is not None
                            body.close()
                            body = body_factory()
                            data = body
                            headers["Content-Type"] = body.content_type
                    finally:
                        self._tracker.clear()
                self._report(endpoint, str(reply.status_code), started)
                lowered = self._observe(lease, endpoint, reply)
        finally:
            if body is not None:
                body.close()
        log.debug("%s -> %s", endpoint, reply.status_code)
        if reply.status_code in (401, 403):
            self.key_refused = True
        elif 200 <= reply.status_code < 300:
            self.key_refused = False
        return _check_status(endpoint, reply, lowered)

    def _observe(self, lease: object, endpoint: str, reply: ACReply) -> bool:
        """Tell the permits what this reply says about the server's room (the
        effective limit, ``adaptive.py``); True when it was lowered for this
        overload. A success of a call that retries an overload (the caller says
        so: ``adaptive.retrying_overload``) is pressure, not capacity."""
        status = reply.status_code
        if 200 <= status < 300:
            recovered = is_retrying_overload()
            self.permits.observe(lease, Signal.RECOVERED if recovered else Signal.CLEAN)
            return False
        if status != 429 or not _is_concurrency(reply):
            return False  # a rate limit, a 503: the waits answer them (``adaptive.py``)
        return self.permits.observe(lease, Signal.OVERLOAD, f'"{CONCURRENCY_BODY}" on {endpoint}')

    def _call(
        self,
        endpoint: str,
        op_class: str,
        *,
        policy: Optional[RetryPolicy] = None,
        **kw: Any,
    ) -> ACReply:
        """An exchange with a retry policy (every call but get-task).

        ``policy`` defaults to the client's; ``ONE_ATTEMPT`` is for callers
        that schedule their own retries.
        """

        def on_retry(exc: BaseException, wait: float) -> None:
            log.warning("%s failed (%s); retrying in %.1fs", endpoint, exc, wait)

        return run_with_retries(
            lambda: self._exchange(endpoint, op_class, **kw),
            policy or self.retry_policy,
            stop=self.abort,
            on_retry=on_retry,
        )

    def _json_timeout(self) -> Tuple[float, float]:
        return (self.config.ac_connect_timeout, self.config.read_timeout_seconds)

    def _upload_timeout(self) -> Tuple[float, float]:
        return (self.config.ac_connect_timeout, self.config.upload_timeout)

    # -- endpoints -------------------------------------------------------
    def get_task(self) -> Optional[Task]:
        """One get-task exchange, no retries (the Fetcher owns that loop).

        Returns the task, or None when the server has none. Raises
        ``BadReplyError`` for a reply the protocol does not allow, ``TaskError``
        (with ``raw`` set) for a malformed task, and ``ACError`` subclasses for
        HTTP and network failures. A reply not read whole (over the reply
        cap, see ``transport.py``) is a malformed task when its first bytes
        name the task's id, else an ``UnreadReplyError``.
        """
        params = {"agentId": self.agent_id, "agentVersion": self.version}
        if self.config.env_name:
            params["envName"] = self.config.env_name
        self._fetching_thread = threading.get_ident()
        try:
            reply = self._exchange("get-task", FETCH, timeout=self._json_timeout(), params=params)
        finally:
            self._fetching_thread = None
        if reply.status_code == 204:
            return None
        if reply.unread is not None:
            raise _unread_task(reply)
        if not reply.content.strip():
            return None
        data = _json_data(reply, "get-task")
        if data is None:
            return None
        if not isinstance(data, dict):
            raise BadReplyError(
                f"get-task: 'data' must be an object or null, got {type(data).__name__}"
            )
        try:
            return Task.parse(data, default_ttl=self.config.default_task_ttl)
        except TaskError as exc:
            exc.raw = data
            raise

    def put_result(
        self, payload: Mapping[str, Any], *, policy: Optional[RetryPolicy] = None
    ) -> None:
        """POST put-result with the result JSON."""
        self._call(
            "put-result",
            UPLOAD,
            policy=policy,
            timeout=self._json_timeout(),
            json_body=payload,
        )

    def upload_result(
        self,
        file_path: str,
        file_name: str,
        content_type: str,
        task_part: Mapping[str, Any],
        *,
        policy: Optional[RetryPolicy] = None,
    ) -> None:
        """POST upload-result: multipart ``file`` (streamed from disk) + ``task``."""
        task_json = json.dumps(task_part, separators=(",", ":")).encode()

        def body() -> MultipartBody:
            return MultipartBody(
                [
                    ("file", file_name, content_type, file_path),
                    ("task", "task.json", "application/json", task_json),
                ]
            )

        self._call(
            "upload-result",
            UPLOAD,
            policy=policy,
            timeout=self._upload_timeout(),
            body_factory=body,
        )

    def get_upload_url(
        self, file_name: str, *, policy: Optional[RetryPolicy] = None
    ) -> Tuple[str, str]:
        """GET upload-url: the presigned ``(putUrl, getUrl)`` for ``file_name``."""
        reply = self._call(
            "upload-url",
            UPLOAD,
            policy=policy,
            timeout=self._json_timeout(),
            params={"fileName": file_name},
        )
        data = _json_data(reply, "upload-url")
        if not isinstance(data, dict):
            raise BadReplyError("upload-url: 'data' must be an object")
        put_url, get_url = data.get("putUrl"), data.get("getUrl")
        if not isinstance(put_url, str) or not isinstance(get_url, str) or not put_url:
            raise BadReplyError("upload-url: reply lacks putUrl/getUrl")
        return put_url, get_url

    def check_upload_url(self, put_url: str) -> None:
        """Refuse a presigned URL that is not https (or the AC server's scheme),
        that parsers read differently, or that names an internal host.

        Raises ``BadReplyError`` (the result then gets an error result). The
        addresses are checked again on the connection actually made.
        """
        try:
            host = unambiguous_host(put_url)
            scheme = urlsplit(put_url).scheme.lower()
            allowed = {"https", urlsplit(self.config.server_url).scheme.lower()}
            if scheme not in allowed:
                raise TargetDenied(f"upload url scheme must be https, got {scheme!r}")
            self.upload_policy.check_host(host)
        except TargetDenied as exc:
            raise UploadURLRefused(f"s3: upload url refused: {exc.reason}") from None

    def put_s3(
        self,
        put_url: str,
        file_path: str,
        *,
        content_type: Optional[str] = None,
        policy: Optional[RetryPolicy] = None,
    ) -> None:
        """PUT the body to a presigned URL: own session, no permit, no auth header.

        The URL is checked first (``check_upload_url``); redirects are not
        followed; the reply body is never quoted in an error (it comes from a
        host the server chose), only its status.
        """
        self.check_upload_url(put_url)
        headers = {"Content-Type": content_type} if content_type else {}

        def attempt() -> None:
            started = time.monotonic()
            try:
                with open(file_path, "rb") as fh:
                    reply = self.s3_session.put(
                        put_url,
                        data=fh,
                        headers=headers,
                        timeout=self._upload_timeout(),
                        verify=self.verify,
                        proxies=self.config.outgoing_proxies,
                        allow_redirects=False,
                    )
            except TargetDenied as exc:
                self._report("s3", "error", started)
                raise UploadURLRefused(f"s3: upload url refused: {exc.reason}") from None
            except _S3_NETWORK_ERRORS as exc:
                self._report("s3", "error", started)
                raise ACConnectionError(
                    f"s3: {type(exc).__name__}: {scrub_text(str(exc))}"
                ) from None
            with reply:
                self._report("s3", str(reply.status_code), started)
                _check_s3_status(reply)

        run_with_retries(attempt, policy or self.retry_policy, stop=self.abort)

    def upload_logs(
        self,
        zip_path: str,
        task_part: Mapping[str, Any],
        *,
        policy: Optional[RetryPolicy] = None,
    ) -> None:
        """POST upload-logs: the zipped log folder + the task."""
        task_json = json.dumps(task_part, separators=(",", ":")).encode()
        params = {"envName": self.config.env_name} if self.config.env_name else None

        def body() -> MultipartBody:
            return MultipartBody(
                [
                    ("file", os.path.basename(zip_path), "application/zip", zip_path),
                    ("task", "task.json", "application/json", task_json),
                ]
            )

        self._call(
            "upload-logs",
            UPLOAD,
            policy=policy,
            timeout=self._upload_timeout(),
            params=params,
            body_factory=body,
        )


#: the body of the server's 429 for too many requests at once
CONCURRENCY_BODY = "Too many concurrent requests"


def _is_concurrency(reply: ACReply) -> bool:
    """A 429 for too many requests at once (not a rate limit)."""
    return bool(reply.content) and "too many concurrent" in reply.text[:500].lower()


def _check_status(endpoint: str, reply: ACReply, lowered: bool = False) -> ACReply:
    """The reply if 2xx, else the error it is (``lowered``: the effective limit
    was lowered for this 429, see ``ACClient._observe``)."""
    status = reply.status_code
    if 200 <= status < 300:
        return reply
    text = reply.text[:500] if reply.content else ""
    if status == 429:
        concurrency = _is_concurrency(reply)
        raise ACRateLimitError(
            endpoint,
            text,
            retry_after=server_wait(reply.headers),
            concurrency=concurrency,
            limit_lowered=lowered and concurrency,
        )
    raise ACHTTPError(endpoint, status, text)


def _check_s3_status(reply: requests.Response) -> None:
    """Raise for a non-2xx S3 reply, naming the status only (never the body)."""
    status = reply.status_code
    if 200 <= status < 300:
        return
    if status == 429:
        raise ACRateLimitError("s3", retry_after=server_wait(reply.headers))
    if 300 <= status < 400:
        raise ACHTTPError("s3", status, "redirect not followed")
    raise ACHTTPError("s3", status, "upload refused by the storage service")


def _json_data(reply: ACReply, endpoint: str) -> Any:
    if reply.unread is not None:
        raise UnreadReplyError(f"{endpoint}: reply {reply.unread}")
    try:
        body = reply.json()
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadReplyError(f"{endpoint}: reply is not JSON") from None
    if not isinstance(body, dict):
        raise BadReplyError(f"{endpoint}: reply must be a JSON object, got {type(body).__name__}")
    return body.get("data")


def _unread_task(reply: ACReply) -> AgentError:
    """What a get-task reply not read whole is: a malformed task if its first
    bytes name the task's id (so the task can be answered), else a bad reply."""
    error = UnreadReplyError(f"get-task: reply {reply.unread}")
    task_id = task_id_in_head(reply.content)
    if task_id is None:
        return error
    return TaskError(str(error), task_id=task_id, raw={"taskId": task_id})


#: a JSON string (whole), or a quote, bracket or brace: the tokens that give
#: a document's structure (numbers and literals are skipped over)
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|["{}\[\]]')
_KEY_END = re.compile(r"\s*:")
#: a complete id value: a whole string, or a whole number (what follows it shows it whole)
_ID_VALUE = re.compile(r'\s*("(?:[^"\\]|\\.)*"|-?\d+(?=[\s,}]))')


def task_id_in_head(head: bytes) -> Optional[str]:
    """The usable ``data.taskId`` of a get-task reply's first bytes, if they hold it whole.

    Only the member ``taskId`` of the object under the top-level ``data`` key
    counts (not one inside the task's headers or body), and only a complete
    value; the id rules are those of ``Task.parse``.
    """
    text = head.decode("utf-8", "replace")
    under: List[Optional[str]] = []  # the key each open container is under
    key: Optional[str] = None  # the last key read in the innermost container
    pos = 0
    try:
        while True:
            token = _JSON_TOKEN.search(text, pos)
            if token is None or token.group() == '"':
                return None  # the end, or a string the head cuts off
            pos = token.end()
            kind = token.group()[0]
            if kind in "{[":
                under.append(key)
                key = None
            elif kind in "}]":
                if not under:
                    return None
                under.pop()
                key = None
            else:
                colon = _KEY_END.match(text, pos)
                if colon is None:
                    continue  # a string value
                key = json.loads(token.group())
                if key == "taskId" and under == [None, "data"]:
                    value = _ID_VALUE.match(text, colon.end())
                    return None if value is None else _usable_task_id(json.loads(value[1]))
    except ValueError:  # a bad escape, an absurdly long number
        return None


def _usable_task_id(value: Any) -> Optional[str]:
    if isinstance(value, str) and "\ufffd" in value:
        return None  # bytes that are not UTF-8: not the id the server meant
    try:
        Task.parse({"taskId": value})
    except TaskError as exc:
        return exc.task_id  # set only when the id itself passed Task.parse's rules
    return None  # not reached: a task without a url never parses
