"""An agent thread that dies is never silent, and the CLI does not hang.

A stage attribute that shadows a ``threading.Thread`` internal (as
``_handle`` does on Python 3.13) kills its thread at first use; a dead thread
must be told and must end the process. Here a stage thread is killed by an
unexpected exception in a real CLI process: the log must carry the
traceback with the thread name, and the process must exit non-zero within
a few seconds with one line naming the thread.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from acagent.stage import Stage
from acagent.testing import FakeACServer
from acagent.threadcrash import ThreadCrashHook

# The injected bug: the fetcher's thread body raises a plain RuntimeError
# outside any loop that could catch it.
INJECT = """
import sys
import acagent.fetcher as fetcher

def boom():
    raise RuntimeError("injected bug in the fetcher thread")

fetcher.Fetcher.start_threads = lambda self: self.spawn(boom, "acagent-fetcher")
from acagent.cli.main import main
main(sys.argv[1:])
"""


def test_cli_exits_non_zero_naming_the_dead_thread(tmp_path: Path) -> None:
    with FakeACServer() as ac:
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                INJECT,
                "--serverUrl",
                ac.url,
                "--apiKey",
                "thread-crash-test-key-5d1e",
                "--spoolDir",
                str(tmp_path / "spool"),
                "--enableFileLogging",
                "false",
                "--metricsFile",
                "false",
                "--enableStdoutLogging",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert took < 15, took
    # one line on stderr names the thread and the error
    last = proc.stderr.strip().splitlines()[-1]
    assert "acagent-fetcher" in last and "RuntimeError" in last, proc.stderr
    # the log (stdout) has the traceback with the thread name
    logged = proc.stdout
    assert "thread acagent-fetcher died" in logged, logged
    assert "Traceback (most recent call last)" in logged
    assert "injected bug in the fetcher thread" in logged


def test_hook_passes_foreign_threads_on_and_restores_the_previous_hook() -> None:
    seen: list[str] = []
    previous = threading.excepthook

    def outer(args: threading.ExceptHookArgs) -> None:
        seen.append(f"outer:{args.thread.name if args.thread else '?'}")

    threading.excepthook = outer
    try:
        crashes: list[str] = []
        hook = ThreadCrashHook(lambda name, exc: crashes.append(name))
        hook.install()
        for name in ("acagent-test", "someone-elses"):
            t = threading.Thread(target=lambda: 1 / 0, name=name)
            t.start()
            t.join(5)
        hook.uninstall()
        assert threading.excepthook is outer
        assert crashes == ["acagent-test"]
        assert seen == ["outer:someone-elses"]
    finally:
        threading.excepthook = previous


@pytest.mark.parametrize("name", ["_handle", "_target", "_name", "_started", "_args", "_kwargs"])
def test_no_stage_shadows_a_thread_internal(name: str) -> None:
    """Stages own threads; none defines a name that ``threading.Thread`` uses."""
    from acagent.executor import Executor
    from acagent.fetcher import Fetcher
    from acagent.uploader import Uploader

    for cls in (Stage, Fetcher, Executor, Uploader):
        assert not issubclass(cls, threading.Thread)
        assert name not in vars(cls), f"{cls.__name__} defines {name}"
