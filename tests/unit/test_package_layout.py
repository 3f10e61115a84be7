"""The package's layout, read from the code's own imports (an AST walk, nothing imported).

``acagent/`` is a spine of top-level modules and three families, each a
subpackage with a boundary of its own:

* ``acagent.ac``: the AC link (client, transport, permits, rate limits, retry);
* ``acagent.targets``: the target boundary (the policy, the session, the deadline
  watch, the content encodings);
* ``acagent.cli``: the command line (``main``, ``options``, ``check``, the demos).

The rules, every import counted (top-level and inside functions alike):

1. no import circle between modules;
2. no module imports the package face ``acagent/__init__.py`` (it imports nearly
   everything, so any such import is a circle waiting; ``__version__`` comes from
   ``acagent._version``);
3. only ``acagent.cli`` and ``acagent.__main__`` import ``acagent.cli``: the
   spine and the families never know the command line;
4. ``acagent.ac`` and ``acagent.targets`` never import the running agent
   (``pipeline``, ``stage``, the three stages, ``ledger``): they serve it;
5. ``acagent.targets`` never imports ``acagent.ac``: what a task may reach does
   not depend on how the agent talks to AC;
6. the product does not import ``acagent.testing``, except the demos in
   ``acagent.cli``, which run against its fakes.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import acagent

PACKAGE = Path(acagent.__file__).resolve().parent
RUNNING_AGENT = {
    "acagent.pipeline",
    "acagent.stage",
    "acagent.fetcher",
    "acagent.executor",
    "acagent.uploader",
    "acagent.ledger",
}
DEMOS = {"acagent.cli.demo", "acagent.cli.demo_multi"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The module of ours that ``name`` (absolute) names, else None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Every module of the package that ``module`` imports, anywhere in its code."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` names the submodule; `from pkg import name`, pkg itself
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for name in names:
            target = _target(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(module: str, family: str) -> bool:
    return module == family or module.startswith(family + ".")


def test_the_walk_sees_imports_the_package_has() -> None:
    graph = import_graph()
    assert "acagent.ac.client" in graph["acagent.stage"]
    assert "acagent.cli.check" in graph["acagent.cli.main"]  # an import inside a function
    assert "acagent.cli.options" in graph["acagent.cli.check"]
    assert "acagent._version" in graph["acagent.ac.client"]  # `from .._version import`


def test_circles_are_found() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_no_module_imports_the_package_face() -> None:
    graph = import_graph()
    assert sorted(m for m, deps in graph.items() if "acagent" in deps) == []


def test_only_the_command_line_imports_the_command_line() -> None:
    graph = import_graph()
    outside = {
        m: sorted(d for d in deps if _in(d, "acagent.cli"))
        for m, deps in graph.items()
        if not _in(m, "acagent.cli") and m != "acagent.__main__"
    }
    assert {m: d for m, d in outside.items() if d} == {}


def test_the_families_never_import_the_running_agent() -> None:
    graph = import_graph()
    found = {
        m: sorted(deps & RUNNING_AGENT)
        for m, deps in graph.items()
        if _in(m, "acagent.ac") or _in(m, "acagent.targets")
    }
    assert {m: d for m, d in found.items() if d} == {}


def test_the_target_boundary_never_imports_the_ac_link() -> None:
    graph = import_graph()
    found = {
        m: sorted(d for d in deps if _in(d, "acagent.ac"))
        for m, deps in graph.items()
        if _in(m, "acagent.targets")
    }
    assert {m: d for m, d in found.items() if d} == {}


def test_the_product_does_not_import_the_test_fakes() -> None:
    graph = import_graph()
    found = {
        m: sorted(d for d in deps if _in(d, "acagent.testing"))
        for m, deps in graph.items()
        if not _in(m, "acagent.testing") and m not in DEMOS
    }
    assert {m: d for m, d in found.items() if d} == {}


def test_the_top_level_shows_the_spine_and_three_families() -> None:
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["ac", "cli", "targets", "testing"]
