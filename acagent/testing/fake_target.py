"""``FakeTarget``: a fake internal tool serving deterministic bodies and faults."""

from __future__ import annotations

import base64
import json
import random
import ssl
import time
from typing import Dict, List, Optional
from urllib.parse import urlsplit

from .bodies import _BLOCK, _encoded_chunks, body_chunks
from .httpserver import _BadRequest, _BodyReader, _FakeBase, _Handler, _Reply

_FOREVER_LIMIT = 120.0
_ECHO_LIMIT = 16 * 1024 * 1024


class FakeTarget(_FakeBase):
    """A fake internal tool. Routes (any method; ``latency``, ``jitter``, ``status`` apply to all):

    - ``/bytes/<size>?seed=S&encoding=identity|gzip|deflate&chunked=0|1&ctype=T``:
      the deterministic body of ``(size, seed)``, streamed; Content-Length unless chunked
      (for encoded bodies it is computed by a first compression pass).
    - ``/echo``: JSON ``{method, path, query, headers, body, body_base64, body_len}``
      (``body`` is UTF-8 decoded with ``surrogateescape``).
    - ``/reset/<size>``: headers + half the body, then RST.
    - ``/wrong-length/<size>``: declares a larger Content-Length than it sends, then closes.
    - ``/bad-encoding/<size>``: ``Content-Encoding: gzip`` over non-gzip bytes.
    - ``/forever``: chunked bytes until the client goes away (at most 120 s).
    - ``/slow-headers?latency=S``: waits, then ``ok``.
    - ``/redirect?to=URL&code=302``.
    """

    _label = "FakeTarget"

    def __init__(self, *, ssl_context: Optional[ssl.SSLContext] = None) -> None:
        super().__init__(ssl_context)
        self._rng = random.Random()

    def _start_servers(self) -> None:
        self._server = self._make_server(self._label, self._handle, count=True)
        self._server.start_loop()

    def _handle(self, h: _Handler) -> None:
        path, query = h.target()
        segments = [s for s in path.split("/") if s]
        route = segments[0] if segments else ""
        started = time.monotonic()
        self._begin(route, counted=True)
        status = 0
        reader: Optional[_BodyReader] = None
        try:
            try:
                reader = _BodyReader(h.rfile, h.headers)
                body = reader.read_all(_ECHO_LIMIT) if route == "echo" else b""
                reader.drain()
                delay = float(query.get("latency", "0") or 0)
                jitter = float(query.get("jitter", "0") or 0)
                if jitter > 0:
                    delay += self._rng.uniform(0.0, jitter)
                self._sleep(delay)
                status = self._route(h, route, segments, query, body)
            except (_BadRequest, ValueError) as exc:
                framing = isinstance(exc, _BadRequest) and exc.framing
                h.send_reply(_Reply(400, str(exc).encode(), ctype="text/plain", close=framing))
                status = 400
        finally:
            self._end(self._recorded(h, path, route, query, status, started, reader), counted=True)

    def _route(
        self,
        h: _Handler,
        route: str,
        segments: List[str],
        query: Dict[str, str],
        body: bytes,
    ) -> int:
        status = int(query.get("status", "200") or 200)
        if status < 200 or status > 999:
            raise ValueError("status must be 200..999")
        size = int(segments[1]) if len(segments) > 1 else 0
        seed = int(query.get("seed", "0") or 0)
        if size < 0:
            raise ValueError("size must be >= 0")
        if route == "bytes":
            self._send_bytes(h, status, size, seed, query)
            return status
        if route == "echo":
            info = {
                "method": h.command,
                "path": urlsplit(h.path).path,
                "query": query,
                "headers": h.header_dict(),
                "body": body.decode("utf-8", "surrogateescape"),
                "body_base64": base64.b64encode(body).decode("ascii"),
                "body_len": len(body),
            }
            h.send_reply(_Reply(status, json.dumps(info).encode()))
            return status
        if route == "reset":
            h.send_head(
                200, [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
            )
            for piece in body_chunks(size // 2, seed):
                h.wfile.write(piece)
            h.abort()
            return 0
        if route == "wrong-length":
            h.close_connection = True
            h.send_head(
                200,
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(size + max(size, 1))),
                ],
            )
            for piece in body_chunks(size, seed):
                h.wfile.write(piece)
            return 200
        if route == "bad-encoding":
            h.send_head(
                200,
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Encoding", "gzip"),
                    ("Content-Length", str(size)),
                ],
            )
            for piece in body_chunks(size, seed):
                h.wfile.write(piece)
            return 200
        if route == "forever":
            self._send_forever(h, seed)
            return 200
        if route == "slow-headers":
            h.send_reply(_Reply(status, b"ok", ctype="text/plain"))
            return status
        if route == "redirect":
            code = int(query.get("code", "302") or 302)
            to = query.get("to", "")
            if not to:
                raise ValueError("to= required")
            h.send_reply(_Reply(code, headers={"Location": to}))
            return code
        h.send_reply(_Reply(404, b"no such route", ctype="text/plain"))
        return 404

    def _send_bytes(
        self, h: _Handler, status: int, size: int, seed: int, query: Dict[str, str]
    ) -> None:
        encoding = query.get("encoding", "identity") or "identity"
        if encoding not in ("identity", "gzip", "deflate"):
            raise ValueError("encoding must be identity, gzip or deflate")
        chunked = (query.get("chunked", "0") or "0") == "1"
        headers = [("Content-Type", query.get("ctype") or "application/octet-stream")]
        if status in (204, 304):
            h.send_head(status, headers)
            return
        if encoding != "identity":
            headers.append(("Content-Encoding", encoding))
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            length = size
            if encoding != "identity":
                length = sum(len(p) for p in _encoded_chunks(size, seed, encoding))
            headers.append(("Content-Length", str(length)))
        h.send_head(status, headers)
        if h.command == "HEAD":
            return
        for piece in _encoded_chunks(size, seed, encoding):
            if chunked:
                h.wfile.write(b"".join((b"%x\r\n" % len(piece), piece, b"\r\n")))
            else:
                h.wfile.write(piece)
        if chunked:
            h.wfile.write(b"0\r\n\r\n")

    def _send_forever(self, h: _Handler, seed: int) -> None:
        h.send_head(
            200,
            [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")],
        )
        block = next(body_chunks(_BLOCK, seed))
        frame = b"".join((b"%x\r\n" % len(block), block, b"\r\n"))
        deadline = time.monotonic() + _FOREVER_LIMIT
        while time.monotonic() < deadline and not self._stop_event.is_set():
            h.wfile.write(frame)  # raises once the client has gone away
        h.wfile.write(b"0\r\n\r\n")
