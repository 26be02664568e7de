"""`branch`'s table at 80 columns keeps each key, value and step number whole.

`branch RUN -p 'dapo:eps_high=0.28,eps_low=0.15' -p 'stabledrl:c=3.5'` folded the policy cells
at the column's edge, inside a key or a value (`dapo:eps_low` over `=0.15`, `stabledrl:c=`
over `3.5`), and its replay risk steps inside a number (`25,26,28,2` over `9,30,31`: step 29
read as 2 and 9). A spec is now broken at its commas only, a step list at its spaces. A part
longer than the column (`ppo:agg=seq-mean-token-mean,`, 28 characters) was broken inside
(`ppo:agg=seq-mean-token-m` over `ean,`): it is broken after its name's colon, and a key=value
longer than the column widens it. The columns beside the policy kept no word whole where a
pair of 28 characters left them little room (`rep`/`lay`/`ris`/`k` at 60 columns): each word
of theirs is whole on a line, the table overflowing a terminal too narrow for that."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from stabledrl_cli.branching import BranchOutcome, BranchReport
from stabledrl_cli.cli.branch import _HEADERS, _table
from stabledrl_cli.tables import print_fitted, print_whole

SPECS = [
    "dapo:eps_low=0.15",
    "stabledrl:c=3.5",
    "two-sided:delta=4,eps_high=0.3,eps_low=0.1",
    "ppo:agg=seq-mean-token-mean,eps_high=0.28,eps_low=0.123456,rows=all",
    "ppo:agg=seq-mean-token-sum-norm,max_len=4096",
]


def _report() -> BranchReport:
    """Branches under SPECS, a step list of six numbers each."""
    branches = [
        BranchOutcome(
            policy=spec,
            run=Path(spec),
            steps=2,
            first_reward_collapse=None,
            final_reward=0.591,
            not_judged="too few",
            replay_collapsed_steps=[25, 26, 28, 29, 30, 31],
            span=(12, 13),
            replayed_in_span=2,
        )
        for spec in SPECS
    ]
    return BranchReport(
        run=Path("a"), requested_at=12, at=12, steps=2, original_first_reward_collapse=None,
        branches=branches, replayed=None,
    )  # fmt: skip


def _shown(width: int) -> list[list[str]]:
    """The table at `width` columns: each row's cells, one list of lines a column."""
    console = Console(width=width, record=True, file=io.StringIO())
    print_whole(_table(_report(), width), console)
    lines = console.export_text().splitlines()
    if width >= 80:
        assert max(len(line) for line in lines) <= width
    headers = [[cell.strip() for cell in line.split("┃")[2:-1]] for line in lines if "┃" in line]
    assert [" ".join(filter(None, words)) for words in zip(*headers, strict=True)] == list(
        _HEADERS
    ), headers
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]


def test_specs_and_step_numbers_are_never_broken_inside() -> None:
    for width in (60, 80, 120):
        rows = _shown(width)
        outcomes = " ".join(row[1] for row in rows if row[1]).split()
        assert set(outcomes) == {"not", "judged,", "reward", "0.591"}, outcomes
        specs = "".join(row[0] for row in rows)
        assert specs == "".join(SPECS), rows
        for line in (row[0] for row in rows if row[0]):  # it ends at a comma or ends a spec
            assert line.endswith((",", ":")) or any(spec.endswith(line) for spec in SPECS), line
        steps = " ".join(row[2] for row in rows if row[2])
        assert re.findall(r"\d+", steps) == ["25", "26", "28", "29", "30", "31"] * 5, steps


def test_a_table_too_wide_for_60_columns_is_a_block_a_branch() -> None:
    """At 60 columns the table overflowed the terminal: 79 wide with a 28-character pair (63
    with short specs). Each branch is now a block: its spec broken at its commas, then each
    column's `header: cell`, never wider than 60 columns. At 80 the table is as before."""
    console = Console(width=60, record=True, file=io.StringIO())
    print_fitted(_table(_report(), 60), console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 60 and not any("│" in line for line in lines)
    for spec in SPECS:
        assert any(spec.startswith(line) for line in lines), spec
    assert lines.count("  replay risk steps: 25, 26, 28, 29, 30, 31") == len(SPECS), lines
    fitted, whole = (Console(width=80, record=True, file=io.StringIO()) for _ in range(2))
    print_fitted(_table(_report(), 80), fitted)
    print_whole(_table(_report(), 80), whole)
    table = whole.export_text()
    assert fitted.export_text() == table and "│" in table


def test_a_pair_wider_than_the_line_has_its_lines_to_itself() -> None:
    """At 40 columns `replay risk steps: 25, 26, 28, 29, 30, 31` (42 characters) wraps, and
    the next pair went on its last line (`  31  replay drift steps: none`: step 31 read beside
    the drift steps). A pair wider than the line has its lines to itself, the next ones
    indented under its first."""
    console = Console(width=40, record=True, file=io.StringIO())
    print_fitted(_table(_report(), 40), console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 40
    at = lines.index("  replay risk steps: 25, 26, 28, 29,")
    assert lines[at + 1 : at + 3] == ["    30, 31", "  replay drift steps: none"], lines
