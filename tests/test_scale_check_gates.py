"""`check` against a baseline of many recorded series draws a bounded table and stderr; its
exit code and JSON keep every gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli import _check_view
from stabledrl_cli.cli.app import app


@pytest.fixture
def run_and_baseline(tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as rec:
        for step in range(3):
            rec.log_step(step, loss=1.0, reward_mean=0.5)
    baseline = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["check", str(run), "--write-baseline", str(baseline)])
    assert result.exit_code == 0, result.output
    data = json.loads(baseline.read_text())
    tol = {"value": 0.0, "worse": "lower", "abs_tol": 0.01, "rel_tol": 0.1}
    data["recorded"].update({f"gone{i:02}": {"mean": tol} for i in range(30)})
    baseline.write_text(json.dumps(data))
    return run, baseline


def test_check_draws_at_most_gates_shown(
    run_and_baseline: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, baseline = run_and_baseline
    monkeypatch.setattr(_check_view, "GATES_SHOWN", 10)
    result = CliRunner().invoke(app, ["check", str(run), "-b", str(baseline)])
    assert result.exit_code == 1
    table = result.stdout
    assert table.count("FAILED") == 10 and " ok " not in table  # the tripped first
    assert "more gates (20 tripped): --format json and --junit have every gate" in table
    assert "check failed: 30 of" in result.stderr
    assert result.stderr.count("baseline.present:") == 10
    assert "... and 20 more tripped gates" in result.stderr
    as_json = CliRunner().invoke(app, ["check", str(run), "-b", str(baseline), "--format", "json"])
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["tripped"] == 30 and len(report["gates"]) == report["gates_checked"] > 30


def test_check_draws_every_gate_under_the_bound(run_and_baseline: tuple[Path, Path]) -> None:
    run, baseline = run_and_baseline
    result = CliRunner().invoke(app, ["check", str(run), "-b", str(baseline)])
    assert result.exit_code == 1
    assert result.stdout.count("FAILED") == 30 and "more gates" not in result.stdout
    assert result.stderr.count("baseline.present:") == 30
