"""Every test file sits in the folder of its kind, under a name no other test file has.

``tests/unit`` (no socket, no subprocess: the fast subset), ``tests/integration``
(servers in the test's own process) and ``tests/system`` (subprocesses, Redis,
signals, disks). pytest imports test files by their bare name (no
``__init__.py``), so two files of the same name in two folders would collide.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
KINDS = ("unit", "integration", "system")
#: what may sit directly in tests/: the fixtures and helpers every kind shares
SHARED = {"conftest.py", "helpers.py", "redis_fixture.py"}


def test_no_test_file_outside_the_folders_of_its_kind() -> None:
    loose = sorted(p.name for p in TESTS.glob("*.py") if p.name not in SHARED)
    assert loose == [], (
        f"{loose}: move each into tests/unit, tests/integration or tests/system "
        "(by what it starts: nothing, in-process servers, subprocesses)"
    )
    folders = sorted(p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(KINDS)


def test_every_test_file_name_is_unique_across_the_kinds() -> None:
    names = Counter(p.name for kind in KINDS for p in (TESTS / kind).glob("test_*.py"))
    assert [name for name, n in names.items() if n > 1] == []
