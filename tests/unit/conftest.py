"""Unit tests open no socket and start no process: this folder is the fast subset.

Each test here runs with ``socket.socket``'s connect and bind, name lookups and
``subprocess.Popen`` replaced by a call that fails the test, naming what it
tried, so a test that needs a server or a subprocess is moved to
``tests/integration/`` or ``tests/system/`` instead of slowing this folder.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        pytest.fail(
            f"a unit test called {what}: it belongs in tests/integration/ (in-process "
            "servers) or tests/system/ (subprocesses)",
            pytrace=False,
        )

    return refused


@pytest.fixture(autouse=True)
def _no_sockets_no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, _refuse(f"socket.{name}"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("socket.getaddrinfo (a name lookup)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("subprocess.Popen"))
