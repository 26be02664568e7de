"""A baseline may name a recorded series the run did not record: the tripped gate quoted the
name whole, in its stderr line and in the table's cell, which wrapped it. A baseline of 12 MB
(16 MB are read) naming one series of 12,000,000 characters kept `check` busy past 60 s; the
name is quoted cut, its length said, as any value of an input is."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "grpo"
LONG = 1_000_000


def test_a_long_series_name_the_run_lacks_trips_in_a_short_line(tmp_path: Path) -> None:
    tolerance = {"value": 1.0, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.0}
    settings = {"spike_factor": 10.0, "window": 50, "drift_threshold": -0.15}
    gates = {"recorded": {"s" * LONG: {"max": tolerance}}, "policies": {}}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps({"schema": "stabledrl-baseline", "version": 1, "replay": settings, **gates})
    )
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.stderr.splitlines() if "baseline.present" in line]
    assert len(line) < 300 + len(str(tmp_path)), line[:300]
    assert f"recorded series {'s' * 40!r}... ({LONG:,} characters) (max)" in line
    assert len(result.stdout) < 20_000, len(result.stdout)
