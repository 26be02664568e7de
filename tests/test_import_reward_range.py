"""`import --reward-range`: a logged run's reward floor, so that a small lasting fall of a
success rate is no collapse (docs/collapse.md: without a range the floor is the run's own
lowest reward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def _success_log(path: Path) -> Path:
    """A CSV log of a 0/1 success rate that steps from 0.8 to 0.7 at step 250 of 500 (noise
    0.03 a step): a plateau, no collapse."""
    rng = np.random.default_rng(7)
    rows = ["step,reward,grad_norm"]
    for step in range(500):
        level = 0.8 if step < 250 else 0.7
        rows.append(f"{step},{level + 0.03 * rng.standard_normal():.6f},1.0")
    path.write_text("\n".join(rows) + "\n")
    return path


def _collapse(run: Path) -> object:
    result = runner.invoke(app, ["inspect", str(run), "-f", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["observed"]["first_reward_collapse"]


def test_a_declared_range_keeps_a_small_fall_from_reading_as_a_collapse(tmp_path):
    """Imported without a range, the fall from 0.8 to 0.7 is reported as a collapse (the floor
    is the run's lowest reward); with --reward-range 0,1 it is not, and the manifest holds
    the range."""
    log = _success_log(tmp_path / "log.csv")
    bare, ranged = tmp_path / "bare", tmp_path / "ranged"
    assert runner.invoke(app, ["import", str(log), "--out", str(bare)]).exit_code == 0
    done = runner.invoke(app, ["import", str(log), "--out", str(ranged), "--reward-range", "0,1"])
    assert done.exit_code == 0, done.output
    assert _collapse(bare) is not None
    assert _collapse(ranged) is None
    assert json.loads((ranged / "manifest.json").read_text())["reward_range"] == [0.0, 1.0]


@pytest.mark.parametrize("given", ["1,0", "a,b", "0,1,2", "nan,1", "0,inf", "0"])
def test_a_bad_range_is_a_usage_error_before_anything_is_written(tmp_path, given):
    log = _success_log(tmp_path / "log.csv")
    out = tmp_path / "run"
    result = runner.invoke(app, ["import", str(log), "--out", str(out), "--reward-range", given])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --reward-range '{given}': give LOW,HIGH")
    assert not out.exists()
