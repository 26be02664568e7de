"""diff of a run recorded with gradient geometry against the same training recorded without:
the geometry and its grad_norm_covered are a recording option, not a change of training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _run(path: Path, *, geometry: bool, covered_scale: float = 1.0) -> Path:
    rng = np.random.default_rng(0)
    with sd.Recorder(path, unit="sequence", policy="grpo") as rec:
        for step in range(6):
            logp = -rng.random(4).astype(np.float32)
            grads = rng.normal(size=(4, 3))
            fields = {"logp": logp, "logp_old": logp, "reward": np.full(4, 0.5, dtype=np.float32)}
            fields["advantages"] = rng.normal(size=4).astype(np.float32)
            if geometry:
                fields["unit_grad_gram"] = (grads @ grads.T).astype(np.float32)
                fields["grad_norm_covered"] = covered_scale * float(np.linalg.norm(grads.sum(0)))
            rec.log_step(step, grad_norm=float(rng.random()), **fields)
    return path


def test_geometry_recorded_by_one_run_only_is_no_parting(tmp_path: Path) -> None:
    """It read 'scalars part at step 0 / grad_norm_covered: 0.73 vs absent / parted at step 0'
    (exit 1): fixtures/grpo against the same training recorded without --geometry (400 steps,
    seed 0) parted at step 0, where the training parts at step 92."""
    with_geometry = _run(tmp_path / "gram", geometry=True)
    without = _run(tmp_path / "plain", geometry=False)
    result = runner.invoke(app, ["diff", str(with_geometry), str(without)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "scalars     equal on all 6 compared steps" in result.stdout
    assert "grad_norm_covered: " in result.stdout  # listed under arrays
    assert (
        "they never part: bits first differ at step 0, within atol 1e-06, rtol 1e-05 but for "
        "grad_norm_covered, unit_grad_gram (compared bit for bit only)"
    ) in result.stdout


def test_grad_norm_covered_both_record_is_compared(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", geometry=True)
    b = _run(tmp_path / "b", geometry=True, covered_scale=1.01)
    result = runner.invoke(app, ["diff", str(a), str(b)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "scalars     part at step 0" in result.stdout
    assert "parted at step 0" in result.stdout
