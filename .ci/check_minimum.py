"""Check that the running environment has every dependency at exactly its floor.

Reads ``constraints/minimum.txt`` (``name==version`` with an optional
``python_version`` marker), keeps the pins whose marker holds for the running
interpreter and compares each with the installed version. Exits 1 on the
first difference, so the minimum-versions CI env cannot quietly test newer
releases.

usage: python .ci/check_minimum.py
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Tuple

ROOT = Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"""^python_version\s*(<|>=)\s*['"](\d+)\.(\d+)['"]$""")


def marker_holds(marker: str) -> bool:
    if not marker:
        return True
    m = _MARKER.match(marker)
    if m is None:
        sys.exit(f"check_minimum: cannot read the marker {marker!r}")
    here: Tuple[int, int] = sys.version_info[:2]
    wanted = (int(m.group(2)), int(m.group(3)))
    return here < wanted if m.group(1) == "<" else here >= wanted


def main() -> int:
    for raw in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin, _, marker = line.partition(";")
        name, wanted = (part.strip() for part in pin.split("=="))
        if not marker_holds(marker.strip()):
            continue
        got = version(name)
        print(f"check_minimum: {name} {got}")
        if got != wanted:
            print(f"check_minimum: {name} is {got}, its floor is {wanted}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
