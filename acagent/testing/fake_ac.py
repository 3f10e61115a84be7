"""``FakeACServer``: a fake ArmorCode http-teleport server with a small fake S3.

See docs/protocol.md for the wire contract it speaks and ``FakeACServer`` for its
options, fault injection and counters.
"""

from __future__ import annotations

import base64
import email.utils
import json
import random
import select
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Optional, Tuple, Union, overload
from urllib.parse import quote, unquote, urlsplit

from .httpserver import (
    _CARRY_ON,
    RecordedRequest,
    _BadRequest,
    _BodyReader,
    _boundary,
    _BufferSink,
    _DigestSink,
    _FakeBase,
    _Fault,
    _GunzipSink,
    _Handler,
    _NullSink,
    _param,
    _parse_multipart,
    _Raw,
    _Reply,
    _Server,
    _Sink,
    _StoredObject,
)

AC_PREFIX = "/api/http-teleport/"
AC_ENDPOINTS: Tuple[str, ...] = (
    "get-task",
    "put-result",
    "upload-result",
    "upload-url",
    "upload-logs",
)
"""The AC endpoint names used by ``inject``, ``count`` and ``RecordedRequest.endpoint``."""

_MAX_STALL = 60.0
_JSON_LIMIT = 256 * 1024 * 1024
_PART_LIMIT = 64 * 1024 * 1024
_CONCURRENCY_BODY = b"Too many concurrent requests"
# Task fields the keyword form of ``add_task`` sets from its named arguments.
_TASK_KEYWORD_FIELDS = frozenset(
    ("taskId", "url", "method", "requestHeaders", "input", "expiryTsMs")
)


@dataclass(frozen=True)
class ReceivedResult:
    """A task result the fake AC server accepted.

    ``via`` is ``"inline"`` (base64 ``output``), ``"empty"`` (no ``output``),
    ``"upload"`` (upload-result), ``"s3"`` (put-result with ``s3Url``),
    ``"error"`` (``output`` starts with ``Agent Side Error``) or ``"logs"``
    (upload-logs). ``body`` holds the decoded body bytes when at most
    ``keep_bodies_up_to`` long, else None; ``body_sha256``/``body_len`` are
    always set when there was a body. An ``"s3"`` result whose object was
    never PUT has ``body=None`` and ``body_len=0``.
    """

    task_id: str
    fields: Dict[str, Any]
    body: Optional[bytes]
    body_sha256: Optional[str]
    body_len: int
    via: str
    file_name: Optional[str] = None
    file_content_type: Optional[str] = None
    received: float = 0.0


class FakeACServer(_FakeBase):
    """A fake ArmorCode http-teleport server (plus a small fake S3) for tests.

    Options (keyword-only):

    - ``max_concurrent``: above this many AC requests in flight, answer 429
      ``Too many concurrent requests`` (None = no limit).
    - ``api_key``: if set, AC requests without ``Authorization: Bearer <key>`` get 401.
    - ``empty_reply``: ``"null"`` (200 ``{"data": null}``) or ``"204"`` for an empty get-task.
    - ``hold_poll``: long poll; an empty get-task waits up to this long for a task.
    - ``handout``: when a task counts as handed out. ``"written"`` (default):
      once its reply was written; a reply that cannot be written puts the task
      back. ``"decided"``: once a get-task takes it from the queue, as a real
      server does, which writes its reply even after the client closed the
      connection and never hands that task out again. Stop tests use
      ``"decided"``: ``"written"`` hides a task lost on a closed long poll.
    - ``latency``: added to every AC request (it counts in flight meanwhile).
    - ``notices_close``: a request whose client closes its connection during
      ``latency`` or an injected ``delay`` ends there (no reply, no longer in
      flight), as a server reading or writing that connection would see. By
      default, as with a server that does not touch the socket meanwhile, it
      stays in flight until the wait ends.
    - ``connection_cost``: delay before the first request of each new TCP
      connection (models TCP+TLS handshakes; not counted in flight).
    - ``reset_counted_for``: seconds a request the server resets still counts
      in flight after the reset (a real server's handler may end after its
      client saw the connection go; a settable attribute too).
    - ``ssl_context``: serve https (both AC and S3 listeners).
    - ``keep_bodies_up_to``: decoded bodies up to this size are kept as bytes;
      larger ones only as sha256 + length.

    ``inflight`` counts AC requests from the parsed request line until the
    reply is written, including requests answered 429 (so a client that
    breaks the limit shows ``max_inflight > max_concurrent``). S3 requests are
    recorded (endpoint ``"s3"``) but never counted in flight or as connections.

    ``occupy(n)`` has another client on the key take ``n`` of the
    ``max_concurrent`` slots until ``release_occupied()``: from then on 429
    ``Too many concurrent requests`` comes above ``max_concurrent - n`` of
    the agents' own requests in flight (the server's limit for them dropped);
    the slots taken count neither in ``inflight`` nor ``max_inflight``.
    ``rejected_concurrent`` counts the 429s of the limit.

    ``set_down(True)`` closes the AC listener (new connections are *refused*)
    and resets every open AC connection; ``set_down(False)`` listens again on
    the same port.
    """

    _label = "FakeACServer"

    def __init__(
        self,
        *,
        max_concurrent: Optional[int] = 2,
        api_key: Optional[str] = None,
        empty_reply: str = "null",
        hold_poll: float = 0.0,
        handout: str = "written",
        latency: float = 0.0,
        connection_cost: float = 0.0,
        ssl_context: Optional[ssl.SSLContext] = None,
        keep_bodies_up_to: int = 8 * 1024 * 1024,
        reset_counted_for: float = 0.0,
        notices_close: bool = False,
    ) -> None:
        if empty_reply not in ("null", "204"):
            raise ValueError('empty_reply must be "null" or "204"')
        if handout not in ("written", "decided"):
            raise ValueError('handout must be "written" or "decided"')
        super().__init__(ssl_context)
        self.max_concurrent = max_concurrent
        self.api_key = api_key
        self.empty_reply = empty_reply
        self.hold_poll = hold_poll
        self.handout = handout
        self.latency = latency
        self.connection_cost = connection_cost
        self.keep_bodies_up_to = keep_bodies_up_to
        self.reset_counted_for = reset_counted_for
        self.notices_close = notices_close
        self._s3: Optional[_Server] = None
        self._queue: Deque[Union[Dict[str, Any], _Raw]] = deque()
        self._results: Dict[str, List[ReceivedResult]] = {}
        self._order: List[ReceivedResult] = []
        self._objects: Dict[str, _StoredObject] = {}
        self._refusals: Dict[str, Tuple[int, float]] = {}
        self._faults: Dict[str, Deque[_Fault]] = {}
        self._stalls: Dict[str, threading.Event] = {}
        self._count_429 = 0
        self._rejected_concurrent = 0
        self._occupied = 0
        self._tasks_handed_out = 0
        self._handed_out_ids: List[str] = []
        self._generated_task_ids = 0
        self._rate_p = 0.0
        self._rate_rng = random.Random(0)
        self._rate_kinds: Tuple[str, ...] = ()
        self._rate_endpoints: Tuple[str, ...] = ()
        self._rate_retry_after = 1
        self._rate_slow = 0.5

    # -- lifecycle ---------------------------------------------------------

    def _start_servers(self) -> None:
        ac = self._make_server(self._label, self._handle_ac, count=True)
        try:
            s3 = self._make_server(f"{self._label}-s3", self._handle_s3, count=False)
        except OSError:
            ac.server_close()
            raise
        self._server, self._s3 = ac, s3
        ac.start_loop()
        s3.start_loop()

    def _all_servers(self) -> List[_Server]:
        return [s for s in (self._server, self._s3) if s is not None]

    def _forget_servers(self) -> None:
        self._server = None
        self._s3 = None

    def _release_waiters(self) -> None:
        with self._cond:
            stalls = list(self._stalls.values())
        for event in stalls:
            event.set()

    @property
    def s3_url(self) -> str:
        """Base URL of the fake S3 listener."""
        if self._s3 is None:
            raise RuntimeError("FakeACServer is not started")
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._s3.port}"

    def set_down(self, down: bool) -> None:
        """While down, new AC connections are refused and open ones are reset."""
        if self._server is None:
            raise RuntimeError("FakeACServer is not started")
        self._server.set_down(down)

    # -- tasks -------------------------------------------------------------

    @overload
    def add_task(self, task: Dict[str, Any]) -> None: ...

    @overload
    def add_task(
        self,
        *,
        url: str,
        method: str = "GET",
        task_id: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        input: Optional[str] = None,
        expiry_ts_ms: Optional[int] = None,
        **extra: Any,
    ) -> str: ...

    def add_task(
        self,
        task: Optional[Dict[str, Any]] = None,
        *,
        url: Optional[str] = None,
        method: str = "GET",
        task_id: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
        input: Optional[str] = None,
        expiry_ts_ms: Optional[int] = None,
        **extra: Any,
    ) -> Optional[str]:
        """Queue a task (FIFO); a held get-task returns it at once.

        Two forms:

        - ``add_task(task)`` queues a copy of the task dict exactly as given
          (malformed ones too, to test how the agent rejects them); returns None.
        - ``add_task(url=..., method="GET", task_id=None, headers=None, input=None,
          expiry_ts_ms=None, **extra)`` builds the dict and returns its ``taskId``
          (``fake-task-<n>`` when ``task_id`` is None). ``extra`` keys are added as
          given, e.g. ``globalConfig={"poolSize": 4}`` or any field the agent must echo.

        The task dict (the ``data`` of a get-task reply, see docs/protocol.md)::

            {
                "taskId": "t1",                      # str, required
                "url": "http://tool/api",            # the target URL
                "method": "GET",                     # any case
                "requestHeaders": {"X-A": "1"},      # optional (keyword form: headers=)
                "input": "request body",             # optional str, sent as UTF-8
                "expiryTsMs": 1700000000000,         # optional epoch ms deadline
                "globalConfig": {"poolSize": 4},     # optional server-pushed settings
                ...                                  # any other field: echoed in the result
            }
        """
        if task is not None:
            keywords = (url, task_id, headers, input, expiry_ts_ms)
            if any(k is not None for k in keywords) or extra or method != "GET":
                raise TypeError("add_task takes either a task dict or keyword fields, not both")
            with self._cond:
                self._queue.append(dict(task))
                self._cond.notify_all()
            return None
        if url is None:
            raise TypeError("add_task needs a task dict or url=")
        built: Dict[str, Any] = {"url": url, "method": method}
        if headers is not None:
            built["requestHeaders"] = dict(headers)
        if input is not None:
            built["input"] = input
        if expiry_ts_ms is not None:
            built["expiryTsMs"] = expiry_ts_ms
        clash = _TASK_KEYWORD_FIELDS & set(extra)
        if clash:
            raise TypeError(f"add_task: {sorted(clash)} must be given by their keyword arguments")
        built.update(extra)
        with self._cond:
            if task_id is None:
                self._generated_task_ids += 1
                task_id = f"fake-task-{self._generated_task_ids}"
            self._queue.append({"taskId": task_id, **built})
            self._cond.notify_all()
        return task_id

    def add_tasks(self, tasks: Iterable[Dict[str, Any]]) -> None:
        with self._cond:
            for task in tasks:
                self._queue.append(dict(task))
            self._cond.notify_all()

    def add_raw_reply(
        self, status: int, body: bytes, headers: Optional[Dict[str, str]] = None
    ) -> None:
        """Queue a raw reply, served to one get-task in FIFO order with the tasks."""
        with self._cond:
            self._queue.append(_Raw(status, bytes(body), dict(headers or {})))
            self._cond.notify_all()

    def withdraw_tasks(self) -> List[Union[Dict[str, Any], _Raw]]:
        """Take back every queued item not yet handed out (to queue it again later)."""
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            return items

    def requeue(self, items: Iterable[Union[Dict[str, Any], _Raw]]) -> None:
        """Put withdrawn items back, at the end of the queue, in their order."""
        with self._cond:
            self._queue.extend(items)
            self._cond.notify_all()

    def pending_tasks(self) -> int:
        """Queued items (tasks and raw replies) not yet handed out."""
        with self._cond:
            return len(self._queue)

    @property
    def tasks_handed_out(self) -> int:
        """Tasks handed out (see ``handout``): by default, whose get-task reply
        was written to the socket.

        By default a reply that cannot be written (the connection was closed
        by ``set_down``/``stop``) puts its task back at the front of the queue
        instead; a task lost on purpose (``inject(..., process=True)``) counts.
        """
        with self._cond:
            return self._tasks_handed_out

    def handed_out_ids(self) -> List[str]:
        """The taskIds of the tasks handed out, in order (see ``tasks_handed_out``)."""
        with self._cond:
            return list(self._handed_out_ids)

    # -- results -----------------------------------------------------------

    @property
    def results(self) -> Dict[str, List[ReceivedResult]]:
        """Results by task id (a list per id, so duplicates are visible)."""
        with self._cond:
            return {k: list(v) for k, v in self._results.items()}

    def all_results(self) -> List[ReceivedResult]:
        """Results in arrival order."""
        with self._cond:
            return list(self._order)

    def clear_results(self) -> None:
        with self._cond:
            self._results.clear()
            self._order.clear()

    def wait_for_results(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` distinct task ids have a result."""
        return self.wait_for(lambda: len(self._results) >= n, timeout)

    def _record_result(self, result: ReceivedResult) -> None:
        with self._cond:
            self._results.setdefault(result.task_id, []).append(result)
            self._order.append(result)
            self._cond.notify_all()

    # -- another client on the key ------------------------------------------

    def occupy(self, n: int = 1) -> None:
        """Another client on the key holds ``n`` slots of ``max_concurrent`` from now
        on (replacing any count before), until ``release_occupied``."""
        if n < 0:
            raise ValueError("occupy needs n >= 0")
        with self._cond:
            self._occupied = n

    def release_occupied(self) -> None:
        """The other client's slots are free again: the full ``max_concurrent``."""
        self.occupy(0)

    @property
    def occupied(self) -> int:
        """Slots another client holds now (``occupy``)."""
        with self._cond:
            return self._occupied

    def _limit_now(self) -> Optional[int]:
        if self.max_concurrent is None:
            return None
        with self._cond:
            return max(0, self.max_concurrent - self._occupied)

    # -- counters ----------------------------------------------------------

    @property
    def count_429(self) -> int:
        """429 replies sent (concurrency limit and injected)."""
        with self._cond:
            return self._count_429

    @property
    def rejected_concurrent(self) -> int:
        """429 replies sent because of ``max_concurrent``."""
        with self._cond:
            return self._rejected_concurrent

    def reset_counters(self) -> None:
        with self._cond:
            super().reset_counters()
            self._count_429 = 0
            self._rejected_concurrent = 0
            self._tasks_handed_out = 0
            self._handed_out_ids = []

    def _after_record(self, record: RecordedRequest) -> None:
        if record.status == 429:
            self._count_429 += 1

    # -- faults ------------------------------------------------------------

    def inject(
        self,
        endpoint: str,
        *,
        status: Optional[int] = None,
        body: bytes = b"",
        headers: Optional[Dict[str, str]] = None,
        reset: bool = False,
        delay: float = 0.0,
        times: int = 1,
        process: bool = False,
    ) -> None:
        """Fault the next ``times`` requests to ``endpoint`` (an AC endpoint, ``"s3"``,
        or ``"*"`` for any AC endpoint). Faults queue FIFO per endpoint.

        ``status``: answer it (with ``body``/``headers``); ``reset``: read the
        request, then close with an RST and no reply; ``delay``: sleep first
        (alone: a slow but normal reply). ``process=True`` handles the request
        normally (records the result, pops the task) and then applies the
        fault to the reply: a lost-reply scenario.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        fault = _Fault(status, bytes(body), dict(headers or {}), reset, delay, process, times)
        with self._cond:
            self._faults.setdefault(endpoint, deque()).append(fault)

    def clear_faults(self) -> None:
        """Drop queued faults and disable ``fault_rate``."""
        with self._cond:
            self._faults.clear()
            self._rate_p = 0.0

    def fault_rate(
        self,
        p: float,
        seed: int,
        kinds: Iterable[str] = ("503", "429s", "429d", "reset", "slow"),
        *,
        endpoints: Iterable[str] = AC_ENDPOINTS,
        retry_after: int = 1,
        slow_delay: float = 0.5,
    ) -> None:
        """Fail each request to ``endpoints`` with probability ``p`` (seeded, independent
        draws per request). Kinds: a status code such as ``"503"``; ``"429s"`` (429 with
        ``X-Rate-Limit-Retry-After-Seconds: retry_after``); ``"429d"`` (429 with an
        HTTP-date ``Retry-After``); ``"429c"`` (429 ``Too many concurrent requests``);
        ``"reset"``; ``"slow"`` (``slow_delay`` seconds, then a normal reply).
        ``p=0`` disables it. Queued ``inject`` faults take precedence.
        """
        kinds_t = tuple(kinds)
        for kind in kinds_t:
            if kind not in ("429s", "429d", "429c", "reset", "slow") and not kind.isdigit():
                raise ValueError(f"unknown fault kind {kind!r}")
        if p > 0 and not kinds_t:
            raise ValueError("kinds must not be empty")
        with self._cond:
            self._rate_p = p
            self._rate_rng = random.Random(seed)
            self._rate_kinds = kinds_t
            self._rate_endpoints = tuple(endpoints)
            self._rate_retry_after = retry_after
            self._rate_slow = slow_delay

    def _rate_fault(self, kind: str) -> _Fault:
        if kind == "429s":
            hdrs = {"X-Rate-Limit-Retry-After-Seconds": str(self._rate_retry_after)}
            return _Fault(429, b"Rate limit exceeded", hdrs, False, 0.0, False, 1)
        if kind == "429d":
            when = email.utils.formatdate(time.time() + self._rate_retry_after, usegmt=True)
            return _Fault(429, b"Rate limit exceeded", {"Retry-After": when}, False, 0.0, False, 1)
        if kind == "429c":
            return _Fault(429, _CONCURRENCY_BODY, {}, False, 0.0, False, 1)
        if kind == "reset":
            return _Fault(None, b"", {}, True, 0.0, False, 1)
        if kind == "slow":
            return _Fault(None, b"", {}, False, self._rate_slow, False, 1)
        return _Fault(int(kind), b"Injected failure", {}, False, 0.0, False, 1)

    def _take_fault(self, endpoint: str) -> Optional[_Fault]:
        with self._cond:
            keys = (endpoint,) if endpoint == "s3" else (endpoint, "*")
            for key in keys:
                queue = self._faults.get(key)
                if queue:
                    fault = queue[0]
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        queue.popleft()
                    return fault
            if self._rate_p > 0 and endpoint in self._rate_endpoints:
                if self._rate_rng.random() < self._rate_p:
                    return self._rate_fault(self._rate_rng.choice(self._rate_kinds))
            return None

    def refuse_results(self, task_ids: Iterable[str], *, status: int, seconds: float) -> None:
        """Answer ``status`` (not recording anything) to every result upload of
        these tasks, on put-result and upload-result alike, for ``seconds`` from now.
        """
        until = time.monotonic() + seconds
        with self._cond:
            for task_id in task_ids:
                self._refusals[task_id] = (status, until)

    def _refusal(self, task_id: str) -> Optional[_Reply]:
        with self._cond:
            status, until = self._refusals.get(task_id, (0, 0.0))
        if time.monotonic() >= until:
            return None
        return _Reply(status, b"refused for this task (test)", ctype="text/plain")

    def stall(self, endpoint: str) -> threading.Event:
        """Hold requests to ``endpoint`` (in flight) until the returned event is set.

        Bounded: a stalled request waits at most 60 s; ``stop()`` releases it.
        """
        with self._cond:
            event = self._stalls.get(endpoint)
            if event is None or event.is_set():
                event = threading.Event()
                self._stalls[endpoint] = event
            return event

    def unstall(self, endpoint: str) -> None:
        with self._cond:
            event = self._stalls.pop(endpoint, None)
        if event is not None:
            event.set()

    def _wait_stall(self, endpoint: str) -> None:
        with self._cond:
            event = self._stalls.get(endpoint)
            if event is None and endpoint != "s3":
                event = self._stalls.get("*")
        if event is not None:
            event.wait(_MAX_STALL)

    # -- request handling --------------------------------------------------

    def _handle_ac(self, h: _Handler) -> None:
        if h.served == 0 and self.connection_cost > 0:
            self._sleep(self.connection_cost)
        self._handle(h, ac=True)

    def _handle_s3(self, h: _Handler) -> None:
        self._handle(h, ac=False)

    def _handle(self, h: _Handler, *, ac: bool) -> None:
        path, query = h.target()
        if ac:
            endpoint = path[len(AC_PREFIX) :] if path.startswith(AC_PREFIX) else "unknown"
            if endpoint not in AC_ENDPOINTS:
                endpoint = "unknown"
        else:
            endpoint = "s3"
        started = time.monotonic()
        rejected = self._begin(endpoint, counted=ac, limit=self._limit_now() if ac else None)
        if rejected:
            with self._cond:
                self._rejected_concurrent += 1
        status = 0
        recorded = False
        reader: Optional[_BodyReader] = None
        try:
            try:
                reader = _BodyReader(h.rfile, h.headers)
                reply = self._reply_for(h, endpoint, path, query, reader, rejected, ac)
                if reply is not None:
                    reader.drain()
            except _BadRequest as exc:
                reply = _Reply(400, str(exc).encode(), ctype="text/plain", close=exc.framing)
                if not exc.framing and reader is not None:
                    try:
                        reader.drain()
                    except _BadRequest:
                        reply.close = True
            status = reply.status if reply is not None else 0
            # Recorded before the reply is written, so a client that got its
            # reply always finds its request (and result) recorded.
            self._record(self._recorded(h, path, endpoint, query, status, started, reader))
            recorded = True
            if reply is None:
                h.abort()
                if ac:
                    self._sleep(self.reset_counted_for)  # still in flight meanwhile
            else:
                try:
                    h.send_reply(reply)
                except OSError:
                    self._undeliverable(reply.item)
                    raise
                self._delivered(reply.item)
        finally:
            if not recorded:
                self._record(self._recorded(h, path, endpoint, query, status, started, reader))
            if ac:
                self._end_inflight()

    def _hold(self, h: _Handler, seconds: float) -> bool:
        """Wait ``seconds`` (in flight); False if the client closed meanwhile
        and ``notices_close`` is on."""
        if not self.notices_close or seconds <= 0 or not hasattr(select, "POLLRDHUP"):
            self._sleep(seconds)
            return True
        poller = select.poll()
        poller.register(h.connection, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        deadline = time.monotonic() + seconds
        while not self._stop_event.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if poller.poll(min(left, 0.05) * 1000):
                return False
        return True

    def _fault_reply(self, h: _Handler, fault: _Fault, reader: _BodyReader) -> Optional[_Reply]:
        if not self._hold(h, fault.delay):
            return None
        if fault.reset:
            reader.drain()
            return None
        if fault.status is not None:
            return _Reply(fault.status, fault.body, dict(fault.headers), ctype="text/plain")
        return _CARRY_ON  # delay only: then a normal reply

    def _reply_for(
        self,
        h: _Handler,
        endpoint: str,
        path: str,
        query: Dict[str, str],
        reader: _BodyReader,
        rejected: bool,
        ac: bool,
    ) -> Optional[_Reply]:
        if rejected:
            return _Reply(429, _CONCURRENCY_BODY, ctype="text/plain")
        if ac and self.api_key is not None:
            if h.headers.get("Authorization") != f"Bearer {self.api_key}":
                return _Reply(401, b'{"error": "unauthorized"}')
        if endpoint == "unknown":
            return _Reply(404, b'{"error": "no such endpoint"}')
        self._wait_stall(endpoint)
        fault = self._take_fault(endpoint)
        if fault is not None and not fault.process:
            early = self._fault_reply(h, fault, reader)
            if early is not _CARRY_ON:
                return early
        if ac:
            if not self._hold(h, self.latency):
                return None
            reply = self._route_ac(h, endpoint, query, reader)
        else:
            reply = self._route_s3(h, path, reader)
        if fault is not None and fault.process:
            reader.drain()
            late = self._fault_reply(h, fault, reader)
            if late is not _CARRY_ON:
                self._delivered(reply.item)  # deliberately lost
                return late
        return reply

    # -- AC endpoints ------------------------------------------------------

    def _route_ac(
        self, h: _Handler, endpoint: str, query: Dict[str, str], reader: _BodyReader
    ) -> _Reply:
        expected = "POST"
        if endpoint in ("get-task", "upload-url"):
            expected = "GET"
        if h.command != expected:
            return _Reply(405, b'{"error": "method not allowed"}', {"Allow": expected})
        if endpoint == "get-task":
            return self._get_task(query)
        if endpoint == "put-result":
            return self._put_result(reader)
        if endpoint == "upload-url":
            name = query.get("fileName", "")
            if not name:
                return _Reply(400, b'{"error": "fileName required"}')
            put_url = f"{self.s3_url}/s3/{quote(name)}"
            data = {"data": {"putUrl": put_url, "getUrl": put_url + "?get=1"}}
            return _Reply(200, json.dumps(data).encode())
        return self._multipart_result(h, reader, logs=endpoint == "upload-logs")

    def _get_task(self, query: Dict[str, str]) -> _Reply:
        if not query.get("agentId"):
            return _Reply(400, b'{"error": "agentId required"}')
        deadline = time.monotonic() + self.hold_poll
        with self._cond:
            while not self._queue and not self._stop_event.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            item = self._queue.popleft() if self._queue else None
            if isinstance(item, dict) and self.handout == "decided":
                self._count_handed_out(item)
        if item is None:
            if self.empty_reply == "204":
                return _Reply(204)
            return _Reply(200, b'{"data": null}')
        if isinstance(item, _Raw):
            return _Reply(item.status, item.body, dict(item.headers), item=item)
        return _Reply(200, json.dumps({"data": item}).encode(), item=item)

    def _count_handed_out(self, item: Dict[str, Any]) -> None:
        # Under self._cond.
        self._tasks_handed_out += 1
        self._handed_out_ids.append(str(item.get("taskId")))
        self._cond.notify_all()

    def _delivered(self, item: Union[Dict[str, Any], _Raw, None]) -> None:
        # By default a task counts as handed out once its reply was written
        # (or deliberately lost); "decided" counted it when it was taken.
        if isinstance(item, dict) and self.handout == "written":
            with self._cond:
                self._count_handed_out(item)

    def _undeliverable(self, item: Union[Dict[str, Any], _Raw, None]) -> None:
        # The reply could not be written (connection gone): by default the
        # item (a task or a raw reply) goes back in front; a real server
        # ("decided") has lost it.
        if item is not None and self.handout != "decided":
            with self._cond:
                self._queue.appendleft(item)
                self._cond.notify_all()

    def _put_result(self, reader: _BodyReader) -> _Reply:
        raw = reader.read_all(_JSON_LIMIT)
        try:
            fields = json.loads(raw)
        except ValueError:
            raise _BadRequest("put-result body is not JSON") from None
        if not isinstance(fields, dict):
            raise _BadRequest("put-result body is not a JSON object")
        task_id = _task_id_of(fields)
        refusal = self._refusal(task_id)
        if refusal is not None:
            return refusal
        output = fields.get("output")
        body: Optional[_StoredObject] = None
        if isinstance(output, str) and output.startswith("Agent Side Error"):
            via = "error"
        elif fields.get("s3Url"):
            via = "s3"
            s3_path = urlsplit(str(fields["s3Url"])).path
            if s3_path.startswith("/s3/"):
                with self._cond:
                    body = self._objects.get(unquote(s3_path[4:]))
        elif output is None:
            via = "empty"
        else:
            via = "inline"
            if not isinstance(output, str):
                raise _BadRequest("output is not a string")
            if fields.get("responseBase64") is True:
                try:
                    data = base64.b64decode(output, validate=True)
                except ValueError:
                    raise _BadRequest("output is not valid base64") from None
            else:
                data = output.encode("utf-8", "surrogateescape")
            sink = _DigestSink(self.keep_bodies_up_to)
            sink.write(data)
            body = sink.result()
        self._record_result(
            ReceivedResult(
                task_id=task_id,
                fields=fields,
                body=body.body if body is not None else None,
                body_sha256=body.sha256 if body is not None else None,
                body_len=body.length if body is not None else 0,
                via=via,
                received=time.monotonic(),
            )
        )
        return _Reply(200, b'{"data": "ok"}')

    def _multipart_result(self, h: _Handler, reader: _BodyReader, *, logs: bool) -> _Reply:
        boundary = _boundary(str(h.headers.get("Content-Type", "")))
        if boundary is None:
            raise _BadRequest("expected multipart/form-data with a boundary")
        file_sink: Optional[_DigestSink] = None
        file_meta: Dict[str, Optional[str]] = {}
        task_sink: Optional[_BufferSink] = None

        def open_part(msg: Any) -> _Sink:
            nonlocal file_sink, task_sink
            name = _param(msg, "name")
            if name == "file" and file_sink is None:
                file_sink = _DigestSink(self.keep_bodies_up_to)
                filename = msg.get_filename()
                ctype = msg.get_content_type() if msg.get("Content-Type") else None
                file_meta["name"] = filename
                file_meta["type"] = ctype
                zipped = (filename or "").endswith(".zip") or ctype == "application/zip"
                if zipped and not logs:
                    return _GunzipSink(file_sink)
                return file_sink
            if name == "task" and task_sink is None:
                task_sink = _BufferSink(_PART_LIMIT)
                return task_sink
            return _NullSink()

        _parse_multipart(reader.read, boundary, open_part)
        if file_sink is None:
            raise _BadRequest("multipart part 'file' missing")
        if task_sink is None:
            raise _BadRequest("multipart part 'task' missing")
        try:
            fields = json.loads(bytes(task_sink.data))
        except ValueError:
            raise _BadRequest("part 'task' is not JSON") from None
        if not isinstance(fields, dict):
            raise _BadRequest("part 'task' is not a JSON object")
        task_id = _task_id_of(fields)
        refusal = self._refusal(task_id)
        if refusal is not None:
            return refusal
        stored = file_sink.result()
        self._record_result(
            ReceivedResult(
                task_id=task_id,
                fields=fields,
                body=stored.body,
                body_sha256=stored.sha256,
                body_len=stored.length,
                via="logs" if logs else "upload",
                file_name=file_meta.get("name"),
                file_content_type=file_meta.get("type"),
                received=time.monotonic(),
            )
        )
        return _Reply(200, b'{"data": "ok"}')

    # -- S3 ----------------------------------------------------------------

    def _route_s3(self, h: _Handler, path: str, reader: _BodyReader) -> _Reply:
        if not path.startswith("/s3/") or len(path) <= 4:
            return _Reply(404, b"no such key", ctype="text/plain")
        name = unquote(path[4:])
        if h.command == "PUT":
            sink = _DigestSink(self.keep_bodies_up_to)
            while True:
                data = reader.read()
                if not data:
                    break
                sink.write(data)
            stored = sink.result()
            with self._cond:
                self._objects[name] = stored
            return _Reply(200, headers={"ETag": f'"{stored.sha256[:32]}"'})
        if h.command in ("GET", "HEAD"):
            with self._cond:
                obj = self._objects.get(name)
            if obj is None or obj.body is None:
                return _Reply(404, b"no such key (or too large to keep)", ctype="text/plain")
            return _Reply(200, obj.body, ctype="application/octet-stream")
        return _Reply(405, b"method not allowed", ctype="text/plain")

    def s3_object(self, name: str) -> Optional[Tuple[Optional[bytes], str, int]]:
        """``(body or None, sha256, length)`` of a stored S3 object, or None."""
        with self._cond:
            obj = self._objects.get(name)
        return None if obj is None else (obj.body, obj.sha256, obj.length)


def _task_id_of(fields: Dict[str, Any]) -> str:
    task_id = fields.get("taskId")
    if not isinstance(task_id, str) or not task_id:
        raise _BadRequest("taskId missing")
    return task_id
