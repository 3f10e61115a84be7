"""The extension contract is written where ``help()`` shows it.

``acagent.stage``'s docstring has the five parts of ``socketserver``'s
contract; each stage's own class docstring names every tuning class variable
it defines and the methods whose overrides must call ``super()``.
"""

from __future__ import annotations

import inspect
import re
from typing import List, Type

import pytest

import acagent.stage
from acagent import Executor, Fetcher, Uploader
from acagent.stage import Stage

PARTS = (
    "For callers",
    "May be overridden",
    "For subclasses",
    "Class variables that may be overridden",
    "May be extended, do not override",
)


def tuning_variables(cls: Type[Stage]) -> List[str]:
    return [n for n, v in vars(cls).items() if n.isupper() and isinstance(v, (int, float))]


def test_the_stage_module_states_the_five_parts_in_order() -> None:
    doc = acagent.stage.__doc__ or ""
    where = [doc.find("\n" + part) for part in PARTS]  # each part opens a line
    assert -1 not in where, dict(zip(PARTS, where))
    assert where == sorted(where)


@pytest.mark.parametrize("cls", [Fetcher, Executor, Uploader])
def test_each_stage_documents_its_own_contract(cls: Type[Stage]) -> None:
    doc = cls.__dict__.get("__doc__") or ""
    assert doc and doc != Stage.__doc__
    assert tuning_variables(cls), cls  # every stage has some
    missing = [n for n in tuning_variables(cls) if f"``{n}``" not in doc]
    assert missing == []
    named = doc.split("Class variables that may be overridden:", 1)[1].split("\n\n", 1)[0]
    gone = [n for n in re.findall(r"``([A-Z][A-Z_]+)``", named) if not hasattr(cls, n)]
    assert gone == []
    assert "call ``super()``" in doc
    for method in ("``__init__``", "``start_threads``", "``on_stop``"):
        assert method in doc.split("call ``super()``", 1)[1], method


def test_the_allow_list_check_is_named_where_an_override_would_lose_it() -> None:
    doc = inspect.getdoc(Executor) or ""
    extended = doc.split("May be extended", 1)[1]
    assert "request_target" in extended and "target policy" in extended
    assert "request_target" not in doc.split("May be extended", 1)[0]
