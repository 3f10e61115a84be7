"""The Redis scripts of the shared permits and rate budget, shipped as ``.lua`` files.

Each script lives beside this module as package data (``permits_*.lua``,
``ratelimit_*.lua``), so it reads, diffs and lints as Lua. ``lua(*names,
**values)`` joins the named files, in order, into the text that
``register_script`` takes; ``$NAME`` in them is replaced by ``values[NAME]``
(a constant the Python side shares, written in one place).
"""

from __future__ import annotations

from importlib import resources
from string import Template


def lua(*names: str, **values: str) -> str:
    """The text of ``<name>.lua`` for each name, joined in order, with ``values`` filled in."""
    folder = resources.files("acagent.ac")
    text = "".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)
    return Template(text).substitute(values)  # a ``$NAME`` left without a value raises
