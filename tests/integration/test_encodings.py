"""Content encodings of target replies: decoded when the agent can, else an error naming them.

A small target in this file answers ``/enc/<coding>`` with that
``Content-Encoding``; the real Pipeline runs each task against it and the
fake AC server shows what was delivered.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
import urllib3.response

from acagent import AgentConfig, Pipeline
from acagent.targets.encodings import undecodable_encoding
from acagent.testing import FakeACServer

BODY = b"the body as the tool meant it\n" * 100
WAIT = 30.0
BR_DECODABLE = "br" in urllib3.response.HTTPResponse.CONTENT_DECODERS
ZSTD_DECODABLE = "zstd" in urllib3.response.HTTPResponse.CONTENT_DECODERS


def encode(coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(BODY)
    if coding == "deflate":
        return zlib.compress(BODY)
    if coding == "br" and BR_DECODABLE:
        import brotli  # the [brotli] extra

        return bytes(brotli.compress(BODY))
    if coding == "zstd" and ZSTD_DECODABLE:
        return zstd_compress(BODY)
    return b"\x1f\x9d still encoded, not the body"


def zstd_compress(data: bytes) -> bytes:
    """With whichever zstd module urllib3 decodes with (the [zstd] extra)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14

        return bytes(zstd.compress(data))
    except ImportError:
        pass
    try:
        from backports import zstd as backport  # type: ignore[import-not-found]

        return bytes(backport.compress(data))
    except ImportError:
        import zstandard  # type: ignore[import-not-found]  # urllib3 before 2.6

        return bytes(zstandard.ZstdCompressor().compress(data))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        coding = self.path.rsplit("/", 1)[-1]
        data = encode(coding)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def encoding_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="encoding-target", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def run_tasks(ac: FakeACServer, base: str, codings: Tuple[str, ...], spool: Path) -> None:
    for coding in codings:
        ac.add_task({"taskId": f"enc-{coding}", "method": "GET", "url": f"{base}/enc/{coding}"})
    config = AgentConfig(server_url=ac.url, api_key="k", spool_dir=str(spool), poll_interval=0.05)
    with Pipeline(config):
        assert ac.wait_for_results(len(codings), timeout=WAIT)


def outputs(ac: FakeACServer) -> Dict[str, Tuple[int, bytes, str]]:
    got = {}
    for task_id, results in ac.results.items():
        assert len(results) == 1
        r = results[0]
        body = r.body if r.body is not None else b""
        got[task_id] = (r.fields["statusCode"], body, str(r.fields.get("output", "")))
    return got


def test_gzip_and_deflate_are_decoded_others_become_an_error_naming_them(
    encoding_target: str, tmp_path: Path
) -> None:
    codings = ("gzip", "deflate", "compress", "br", "zstd")
    with FakeACServer() as ac:
        run_tasks(ac, encoding_target, codings, tmp_path / "spool")
        got = outputs(ac)
    assert got["enc-gzip"][:2] == (200, BODY)
    assert got["enc-deflate"][:2] == (200, BODY)
    status, body, output = got["enc-compress"]
    assert status == 500 and output == "Agent Side Error: unsupported Content-Encoding: compress"
    for coding, decodable, extra in (("br", BR_DECODABLE, "brotli"), ("zstd", ZSTD_DECODABLE, "zstd")):
        status, body, output = got[f"enc-{coding}"]
        if decodable:
            assert (status, body) == (200, BODY)
        else:
            assert status == 500
            assert output == (
                f"Agent Side Error: unsupported Content-Encoding: {coding} "
                f"(install acagent[{extra}] to decode it)"
            )
    # never the still-encoded bytes
    for status, body, _ in got.values():
        assert b"still encoded" not in body


def test_undecodable_encoding() -> None:
    assert undecodable_encoding("") is None
    assert undecodable_encoding("gzip") is None
    assert undecodable_encoding("GZIP, deflate") is None
    assert undecodable_encoding("identity") is None
    assert undecodable_encoding("gzip, compress") == "compress"
    assert undecodable_encoding("x-custom") == "x-custom"
    assert (undecodable_encoding("br") is None) == BR_DECODABLE
