"""A wide, sparse CSV (a W&B export of many metrics logged at different steps: most cells empty)
cost a name lookup for every cell, empty or not: 42 MB of 21,000 columns with one value a row
took 23 s to import (1.8 MB/s: ten minutes for a log of the 1 GiB bound). A row now costs
lookups for its filled cells only; what is imported and left out is the same."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stabledrl_cli.importers import _csvlog, _table, read_log
from stabledrl_cli.importers._names import skip_reason

COLUMNS = 2000
ROWS = 50


def _wide(path: Path) -> Path:
    names = ["eval_loss", *(f"m{i}" for i in range(COLUMNS - 1))]
    lines = ["step," + ",".join(names)]
    for step in range(ROWS):
        cells = [""] * COLUMNS
        cells[1 + step % (COLUMNS - 1)] = f"{step}.5"
        lines.append(f"{step}," + ",".join(cells))
    lines.append(f"{ROWS}," + "," * (COLUMNS - 1))  # a step with nothing logged
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_row_costs_lookups_for_its_filled_cells_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def counted(name: str) -> object:
        nonlocal calls
        calls += 1
        return skip_reason(name)

    monkeypatch.setattr(_table, "skip_reason", counted)
    monkeypatch.setattr(_csvlog, "skip_reason", counted, raising=False)
    _, _, table = read_log(_wide(tmp_path / "wide.csv"))
    assert calls <= COLUMNS + ROWS, calls  # was COLUMNS * ROWS
    assert table.steps == {s: {f"m{s % (COLUMNS - 1)}": s + 0.5} for s in range(ROWS)}
    assert table.not_imported == {"eval_loss": "eval"}  # a column with no value is still named
    assert table.skipped_rows == {"no metrics": 1}


def test_rows_that_may_be_a_header_cost_their_own_cells_only(tmp_path: Path) -> None:
    """A row whose step cell is not a number is looked at as a header written again: every
    name of the header was looked for among its cells, so a 250 KB log (a header of 20,000
    columns, 20,000 rows `step`) took 50 s."""
    header = "step," + ",".join(f"m{i}" for i in range(20_000))
    path = tmp_path / "rows.csv"
    path.write_text(header + "\n1,0.5\n" + "step\n" * 20_000 + "step,m7\n2,1.5\n")
    started = time.perf_counter()
    _, _, table = read_log(path)
    assert time.perf_counter() - started < 2.0
    assert table.steps == {1: {"m0": 0.5}, 2: {"m7": 1.5}}
    assert table.skipped_rows == {"bad step": 20_000}
