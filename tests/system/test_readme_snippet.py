"""The library snippet of README.md, run verbatim against the fake servers, delivers its task."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Tuple

from helpers import ROOT

from acagent.testing import FakeACServer, FakeTarget

README = ROOT / "README.md"
MARKER = "<!-- snippet: library -->"
TIMEOUT = 60


def library_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, "README.md must mark exactly one library snippet"
    after = text.split(MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert match, "the marker must be followed by a python code block"
    return match.group(1)


def test_snippet_is_complete_code() -> None:
    code = library_snippet()
    compile(code, "README.md", "exec")
    assert "spool_dir=" in code and "run_forever()" in code


def _run_snippet(code: str, ac: FakeACServer, home: Path) -> Tuple[bool, int, str, str]:
    """Run ``code`` against ``ac`` until one result arrives, then SIGTERM it.
    Returns (delivered, exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACAGENT_")}
    env.update(
        ACAGENT_SERVER_URL=ac.url,
        ACAGENT_API_KEY="readme-key",
        HOME=str(home),  # the snippet's spool folder lands under the test's folder
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        delivered = ac.wait_for_results(1, timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
    return delivered, proc.returncode, out, err


def test_snippet_runs_verbatim_and_delivers_its_task(tmp_path: Path) -> None:
    with FakeTarget() as target, FakeACServer(api_key="readme-key") as ac:
        ac.add_task(
            {"taskId": "readme-1", "method": "GET", "url": f"{target.url}/bytes/4096?seed=5"}
        )
        delivered, code, out, err = _run_snippet(library_snippet(), ac, tmp_path)
        assert delivered, "the snippet's agent did not deliver the task"
        results = ac.results["readme-1"]
    assert code == 0, err
    assert "all results delivered" in out
    # the snippet's logging set-up shows the agent's own lines
    assert " INFO acagent.pipeline: agent " in err, err
    assert len(results) == 1
    assert results[0].fields["statusCode"] == 200 and results[0].body_len == 4096
    assert results[0].via == "inline"
    assert (tmp_path / "my-service" / "acagent-spool").is_dir()


def test_snippet_with_the_host_logging_at_debug_logs_no_secret(tmp_path: Path) -> None:
    # The host's own logging (not the agent's setup_logging) at DEBUG, and a
    # server whose error text echoes the API key and a token: masked anyway.
    code = "import logging\nlogging.basicConfig(level=logging.DEBUG)\n" + library_snippet()
    with FakeTarget() as target, FakeACServer(api_key="readme-key") as ac:
        ac.inject(
            "get-task",
            status=503,
            body=b"upstream said: key readme-key rejected; token=tok-zzz9 password=pw-zzz9",
        )
        ac.add_task({"taskId": "debug-1", "method": "GET", "url": f"{target.url}/bytes/64"})
        delivered, exit_code, out, err = _run_snippet(code, ac, tmp_path)
    assert delivered, err
    assert exit_code == 0, err
    assert "DEBUG:acagent." in err  # the host's handler printed the agent's records
    assert "upstream said" in err  # the line with the server's text is there, masked
    for secret in ("readme-key", "tok-zzz9", "pw-zzz9"):
        assert secret not in err + out, secret
