"""The README's table of exit codes lists every code docs/exit-codes.md defines: a script
reading the README alone met 143 (`watch`, `import` and `pack` on SIGTERM, `record` stopped
before its command) and 129 with no word on them. The reference page documents every code
the tool exits with, each in a section of its own (`## 2: usage error`) after its table."""

from __future__ import annotations

import re
from pathlib import Path

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli.cli._watch_loop import TERMINATED
from stabledrl_cli.cli._wrap import STOP_SIGNALS
from stabledrl_cli.cli.app import BROKEN_PIPE
from stabledrl_cli.errors import INTERNAL_ERROR, INTERRUPTED, StabledrlError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")


def table_codes(text: str) -> list[int]:
    return [int(code) for code in re.findall(r"^\| (\d+) \|", text, re.M)]


def error_classes(cls: type[StabledrlError]) -> list[type[StabledrlError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in error_classes(child))]


def test_the_readme_lists_every_exit_code_the_reference_defines() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Exit codes\n") :]
    section = section[: section.index("\n## ", 1)]
    assert table_codes(section) == table_codes(REFERENCE)


def test_the_reference_table_holds_every_code_the_tool_exits_with() -> None:
    codes = {0, INTERNAL_ERROR, INTERRUPTED, BROKEN_PIPE, TERMINATED}
    codes |= {error.exit_code for error in error_classes(StabledrlError)}
    codes |= {SIGNALLED + stop for stop in STOP_SIGNALS}  # record stopped before its command
    assert codes <= set(table_codes(REFERENCE)), sorted(codes - set(table_codes(REFERENCE)))


def test_each_code_of_the_reference_table_has_its_section_in_table_order() -> None:
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", REFERENCE, re.M)
    sections = re.findall(r"^## (\d+): (.+)$", REFERENCE, re.M)
    assert sections == [(code, meaning.strip()) for code, meaning in rows]
