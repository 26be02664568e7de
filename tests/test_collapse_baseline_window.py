"""A baseline's tolerance of the observed collapse step is the collapse window in steps: W
reward draws, each a rollout, span W times the steps a rollout is reused over. It was W steps
on every run, a quarter of the window on the built-in example's runs (4 steps a rollout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_observed import _reused_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def _rates(fall_at: int, rollouts: int = 80) -> np.ndarray:
    """Rollout rewards: 0.6 up to rollout `fall_at`, 0.1 after, a little noise."""
    noise = np.random.default_rng(0).normal(0.0, 0.02, rollouts)
    return np.where(np.arange(rollouts) < fall_at, 0.6, 0.1) + noise


def _check(tmp_path: Path, mu: int, baseline_fall: int, fall: int) -> tuple[int, dict]:
    good = _reused_run(tmp_path / "good", _rates(baseline_fall), mu)
    run = _reused_run(tmp_path / "run", _rates(fall), mu)
    baseline = tmp_path / "b.json"
    written = runner.invoke(app, ["check", good.location, "--write-baseline", str(baseline)])
    assert written.exit_code == 0, written.output
    result = runner.invoke(app, ["check", run.location, "-b", str(baseline), "--format", "json"])
    gate = next(
        g
        for g in json.loads(result.stdout)["gates"]
        if g["gate"] == "baseline.observed.first_reward_collapse"
    )
    return result.exit_code, gate


def test_the_tolerance_spans_w_rollouts_of_mu_steps(tmp_path: Path) -> None:
    """The same fall 3 rollouts (12 steps) earlier: 'observed.first_reward_collapse 192,
    baseline 204: below the limit 194', exit 1, though the rule finds a collapse within its
    10 rollouts (40 steps)."""
    code, gate = _check(tmp_path, mu=4, baseline_fall=45, fall=42)
    assert (gate["figure"], gate["limit"]) == (192.0, 164.0)
    assert gate["ok"] and code == 0


def test_a_fall_beyond_the_window_trips(tmp_path: Path) -> None:
    code, gate = _check(tmp_path, mu=4, baseline_fall=45, fall=30)
    assert (gate["figure"], gate["limit"]) == (140.0, 164.0)
    assert not gate["ok"] and code == 1


def test_a_run_of_one_step_a_rollout_keeps_w_steps(tmp_path: Path) -> None:
    code, gate = _check(tmp_path, mu=1, baseline_fall=45, fall=42)
    assert (gate["figure"], gate["limit"]) == (48.0, 41.0)
    assert gate["ok"] and code == 0
