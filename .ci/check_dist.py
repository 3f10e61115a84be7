"""Check what `python -m build` produced: one sdist and one wheel.

The wheel holds every tracked file of the package (its subpackages, the
``py.typed`` marker, the ``.lua`` scripts) and the LICENSE, and no tests.
The sdist holds every tracked file a distributor needs to build and test
(the package, tests, examples, deploy files, benchmarks, constraints and the
top-level docs), that is everything ``git ls-files`` lists outside
``.ci/`` and the git dot-files.

usage: python .ci/check_dist.py DIST_DIR
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import List


def fail(message: str) -> None:
    print(f"check_dist: {message}", file=sys.stderr)
    sys.exit(1)


def one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def tracked_files() -> List[str]:
    out = subprocess.run(
        ["git", "ls-files"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    return [f for f in out if not f.startswith(".ci/") and not f.startswith(".git")]


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        if metadata_name is None:
            fail("wheel has no METADATA")
        metadata = Parser().parsestr(zf.read(metadata_name).decode("utf-8"))
    # every tracked file of the package: each subpackage, py.typed, the .lua scripts
    missing = [f for f in tracked_files() if f.startswith("acagent/") and f not in names]
    if missing:
        fail(f"wheel lacks package files: {missing}")
    if not any(n.endswith("LICENSE") and ".dist-info/" in n for n in names):
        fail("wheel lacks the LICENSE in its .dist-info")
    if any(n.startswith("tests/") for n in names):
        fail("wheel carries tests/ as a top-level package")
    classifiers = metadata.get_all("Classifier") or []
    for needed in ("Typing :: Typed", "Programming Language :: Python :: 3.13"):
        if needed not in classifiers:
            fail(f"wheel METADATA lacks classifier {needed!r}")
    requires = " ".join(metadata.get_all("Requires-Dist") or [])
    if "prometheus" not in requires or "urllib3" not in requires:
        fail(f"wheel METADATA Requires-Dist is incomplete: {requires}")
    print(f"check_dist: {wheel.name}: {len(names)} files, the package's and the LICENSE")


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        members = tf.getnames()
    prefix = members[0].split("/", 1)[0] + "/"
    inside = {m[len(prefix) :] for m in members if m.startswith(prefix)}
    missing = [f for f in tracked_files() if f not in inside]
    if missing:
        fail(f"sdist lacks tracked files: {missing}")
    print(f"check_dist: {sdist.name}: {len(inside)} entries, every tracked file present")


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: check_dist.py DIST_DIR")
    dist = Path(sys.argv[1])
    check_wheel(one(dist, "*.whl"))
    check_sdist(one(dist, "*.tar.gz"))


if __name__ == "__main__":
    main()
