"""`check`'s table at 80 columns: each gate's detail wraps onto the lines below its row, none
of it cut."""

from __future__ import annotations

import json

import pytest
from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LIMITS = ["--max-collapsed", "0", "--max-discard-frac", "0.1", "--max-nonfinite", "0",
          "--max-spikes", "0", "--fail-on-collapse"]  # fmt: skip


def _details(table: str) -> list[str]:
    """The detail of each row of a check table, its lines joined; a row starts with a line
    whose first cell is not empty (a policy's line in a grouped table has no detail)."""
    rows: list[list[str]] = []
    for line in table.splitlines():
        if not line.startswith("│ "):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if cells[0]:
            rows.append([])
        rows[-1].append(cells[-1])
    return [" ".join(row) for row in rows if any(row)]


@pytest.mark.parametrize(("gates", "width"), [("limits", 80), ("baseline", 100)])
def test_every_gates_detail_is_shown_whole(grpo_fixture, gates, width):
    """It was cut with an ellipsis ('28 grad-norm spike s…' at 80 columns; a baseline gate's
    under a line per policy at 100): what the JSON says of a passed gate was nowhere in the
    table."""
    args = ["check", str(grpo_fixture), "--device", "cpu", "-p", "grpo", "-p", "is"]
    baseline = str(grpo_fixture.parent / "grpo.baseline.json")
    args += LIMITS if gates == "limits" else ["-b", baseline, "--max-spikes", "0"]
    shown = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert shown.exit_code == 1, shown.output
    assert max(len(line) for line in shown.stdout.splitlines()) <= width
    assert "…" not in shown.stdout
    data = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    messages = ["".join(g["message"].split()) for g in data["gates"]]
    assert ["".join(d.split()) for d in _details(shown.stdout)] == messages


def test_a_long_policy_spec_is_broken_at_its_commas(tmp_path):
    """A spec wider than the gate column was folded at the column's edge, inside a value
    ('...,eps_high=0.345678' over '9,eps_low=...' at 80 columns): the figure 0.3456789 read
    as 0.345678. Each line now ends at a comma, every value whole."""
    spec = "grpo:agg=seq-mean-token-sum-norm,eps_high=0.3456789,eps_low=0.1234567,max_len=4096"
    tiny_run(tmp_path / "run", steps=4)
    args = ["check", str(tmp_path / "run"), "--device", "cpu", "-p", spec]
    shown = runner.invoke(app, [*args, "--max-discard-frac", "1"], env={"COLUMNS": "80"})
    assert shown.exit_code == 0, shown.output
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80
    lines = [line.strip("│ ") for line in shown.stdout.splitlines() if line.startswith("│ ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("grpo:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("max_discard_frac"))
    spec_lines = [line.split("│")[0].strip() for line in lines[start:end]]
    assert "".join(spec_lines) == spec, spec_lines
    assert len(spec_lines) > 1 and all(line.endswith(",") for line in spec_lines[:-1])
