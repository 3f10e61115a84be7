"""Run the fast test subset against the installed acagent, not the source tree.

The subset is ``.ci/fast-tests.txt`` (the unit tests and one end-to-end
pipeline test); extra arguments are passed on to pytest. pytest runs from an
empty temporary folder with this project's pyproject.toml as its config, so
``import acagent`` finds the package installed in the running interpreter's
environment. It refuses to run if that import resolves to the source tree.

usage: python .ci/fast_tests.py [PYTEST ARGS...]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent

_WHERE = "import acagent, sys; sys.stdout.write(acagent.__file__ + ' ' + acagent.__version__)"


def fast_tests() -> List[str]:
    args = []
    for raw in (ROOT / ".ci" / "fast-tests.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            args.append(str(ROOT / line))
    return args


def absolute(arg: str) -> str:
    """A test path given relative to where we were called, made absolute
    (pytest runs elsewhere); options and other arguments pass unchanged."""
    path, sep, rest = arg.partition("::")
    if not arg.startswith("-") and Path(path).exists():
        return str(Path(path).resolve()) + sep + rest
    return arg


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="acagent-fast-") as outside:
        where = subprocess.run(
            [sys.executable, "-c", _WHERE], cwd=outside, check=True, capture_output=True, text=True
        ).stdout
        location, version = where.split()
        print(f"fast_tests: acagent {version} from {location}", flush=True)
        if Path(location).resolve().parent == ROOT / "acagent":
            print(
                "fast_tests: acagent resolves to the source tree, not an install", file=sys.stderr
            )
            return 1
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            *fast_tests(),
            *(absolute(arg) for arg in sys.argv[1:]),
        ]
        return subprocess.call(command, cwd=outside)


if __name__ == "__main__":
    sys.exit(main())
