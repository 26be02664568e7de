"""A W&B chart export's row where the envelope (`__MIN`, `__MAX`) parts from the line is
refused naming both values: its cells (up to 128 KB each, csv's field limit) went whole into
that line. They are cut as any value of an input is, their length said."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

LONG = 100_000


def test_long_cells_of_a_refused_envelope_row_are_cut(tmp_path: Path) -> None:
    chart = tmp_path / "wandb.csv"
    line, low = "0." + "5" * LONG, "0." + "4" * LONG
    chart.write_text(f"Step,reward,reward__MIN\n9,0.5,0.5\n10,{line},{low}\n")
    result = CliRunner().invoke(app, ["import", str(chart), "--out", str(tmp_path / "run")])
    assert result.exit_code == 3, result.stderr[:300]
    (error,) = result.stderr.splitlines()
    assert len(error) < 350 + len(str(chart)), error[:400]  # the path's length is the machine's
    cut = f"({LONG + 2:,} characters)"
    assert f"line 3: reward is {'0.' + '5' * 38!r}... {cut} but its __MIN is " in error
    assert f"but its __MIN is {'0.' + '4' * 38!r}... {cut}: the W&B chart drew" in error
