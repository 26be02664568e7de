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
from stabledrl_cli.replay.report import print_whole

SPECS = [
    "dapo:eps_low=0.15",
    "stabledrl:c=3.5",
    "two-sided:delta=4,eps_high=0.3,eps_low=0.1",
    "ppo:agg=seq-mean-token-mean,eps_high=0.28,eps_low=0.123456,rows=all",
    "ppo:agg=seq-mean-token-sum-norm,max_len=4096",
]


def _shown(width: int) -> list[list[str]]:
    """The table at `width` columns: each row's cells, one list of lines a column."""
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
    report = BranchReport(
        run=Path("a"), requested_at=12, at=12, steps=2, original_first_reward_collapse=None,
        branches=branches, replayed=None,
    )  # fmt: skip
    console = Console(width=width, record=True, file=io.StringIO())
    print_whole(_table(report, width), console)
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
