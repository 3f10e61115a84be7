"""The docs agree with the code: the flag table, ``--help`` and ``AgentConfig`` defaults;
README stays one page; the docs' links resolve; no issue numbers or session dates."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from helpers import ROOT

from acagent.cli.options import _CLI_DEFAULTS, _OPTIONS, build_parser, env_names_for
from acagent.config import AgentConfig
from acagent.targets.policy import DEFAULT_DENIED

README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
#: what the table and --help show for a flag with no default
NO_DEFAULT = "—"


def doc_pages() -> List[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def help_default(text: str) -> str:
    """The ``(default X)`` a flag's help text ends with, or ``NO_DEFAULT``."""
    match = re.search(r"\(default ([^()]*)\)$", text)
    return match.group(1) if match else NO_DEFAULT


def shown(value: Any) -> str:
    """A default as the help and the docs write it: ``true``, ``30``, ``_prod``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def code_defaults() -> Dict[str, Any]:
    """The command line's default of each ``AgentConfig`` field."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(AgentConfig)
        if f.default is not dataclasses.MISSING
    }
    return {**defaults, **_CLI_DEFAULTS}


def table_rows() -> Dict[str, Tuple[str, str]]:
    """flag -> (environment column, default column) of docs/configuration.md."""
    rows: Dict[str, Tuple[str, str]] = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"`--\w+`", cells[0]):
            flag = cells[0].strip("`")
            assert flag not in rows, f"{flag} has two rows"
            rows[flag] = (cells[1], cells[2])
    return rows


def test_help_ends_each_default_as_the_code_has_it() -> None:
    defaults = code_defaults()
    checked = 0
    for flag, field, _kind, _envs, text in _OPTIONS:
        value = defaults.get(field)
        if value is None or value == () or value == "":
            continue  # no value default: the help names what applies instead
        assert help_default(text) == shown(value), (flag, text)
        checked += 1
    assert checked >= 25


def test_help_output_shows_every_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag, _field, _kind, _envs, help_text in _OPTIONS:
        default = help_default(help_text)
        if default != NO_DEFAULT:
            assert f"(default {default})" in text, flag


def test_configuration_table_has_every_flag_with_its_variables_and_default() -> None:
    rows = table_rows()
    flags = [flag for flag, *_ in _OPTIONS]
    assert sorted(rows) == sorted(flags)
    for flag, _field, _kind, envs, text in _OPTIONS:
        env_cell, default_cell = rows[flag]
        assert re.findall(r"`([^`]+)`", env_cell) == env_names_for(flag, envs), flag
        assert default_cell.replace("`", "") == help_default(text), flag


def test_the_default_deny_list_is_named_in_full_in_help_and_docs() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for page in (CONFIGURATION, DOCS / "security.md"):
        text = page.read_text(encoding="utf-8")
        for entry in DEFAULT_DENIED:
            assert f"`{entry}`" in text, (page.name, entry)
    for entry in DEFAULT_DENIED:
        assert entry in help_text, entry


def test_subcommands_have_their_own_usage() -> None:
    run_help = build_parser().format_help()
    assert run_help.startswith("usage: acagent [run]")
    for command in ("acagent check", "acagent demo [--agents N]"):
        assert command in run_help.split("\n\n")[0], command
    assert build_parser("check").format_help().startswith("usage: acagent check [OPTIONS]")


def test_readme_is_one_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, len(lines)


#: what a page of the project's docs never holds: the project's issue numbers,
#: session dates and times, lab notes
DIARY = [
    re.compile(r"\bissues?\s*#?\d+", re.I),
    re.compile(r"#\d+\b"),
    re.compile(r"\b(first|second|third|fourth) round\b", re.I),
    re.compile(r"\bmeasured and not kept\b", re.I),
    re.compile(r"\b\d{1,2}:\d{2}\s*(\u2013|-)\s*\d{1,2}:\d{2}\s*UTC\b"),
    re.compile(r"\bsession\s*\d+", re.I),
]


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_no_issue_numbers_or_diary_in_the_docs(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = [m.group(0) for pattern in DIARY for m in pattern.finditer(text)]
    assert not found, found


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_links_between_pages_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), (page.name, target)


def test_no_page_sends_the_reader_to_a_file_the_repository_lacks() -> None:
    for page in doc_pages():
        assert "PROTOCOL.md" not in page.read_text(encoding="utf-8"), page.name
    for path in (ROOT / "acagent").rglob("*.py"):
        assert "PROTOCOL.md" not in path.read_text(encoding="utf-8"), path


def test_docs_name_no_xfail_test_and_no_gap_the_tests_closed() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in doc_pages())
    assert "xfail" not in text
    assert "Known gap" not in text


def _help(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "acagent", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_each_subcommand_prints_its_own_plain_help() -> None:
    run_help, check_help, demo_help = _help(), _help("check"), _help("demo")
    multi_help = _help("demo", "--agents", "2")
    assert run_help.startswith("usage: acagent [run] [OPTIONS]\n       acagent check")
    assert check_help.startswith("usage: acagent check [OPTIONS]")
    assert demo_help.startswith("usage: acagent demo ")
    assert multi_help.startswith("usage: acagent demo --agents N ")
    assert "--agents N" in demo_help
    for text in (run_help, check_help, demo_help, multi_help):
        assert "``" not in text  # no reStructuredText markup
