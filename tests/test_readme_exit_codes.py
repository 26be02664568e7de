"""The README's table of exit codes lists every code docs/exit-codes.md defines: a script
reading the README alone met 143 (`watch`, `import` and `pack` on SIGTERM, `record` stopped
before its command) and 129 with no word on them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_codes(text: str) -> list[int]:
    return [int(code) for code in re.findall(r"^\| (\d+) \|", text, re.M)]


def test_the_readme_lists_every_exit_code_the_reference_defines() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Exit codes\n") :]
    section = section[: section.index("\n## ", 1)]
    reference = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    assert table_codes(section) == table_codes(reference)
