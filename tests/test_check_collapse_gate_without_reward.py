"""`--fail-on-collapse` on a run that recorded no reward."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

runner = CliRunner()


def _run(path, *, reward: bool):
    """30 scalar steps (what record's optimizer hooks write: a grad norm, no reward)."""
    rng = np.random.default_rng(0)
    with Recorder(path, policy=None) as recorder:
        for step in range(30):
            rewarded = {"reward_mean": 0.5} if reward else {}
            recorder.log_step(step, grad_norm=1.0 + 0.01 * rng.random(), **rewarded)
    return path


def test_a_run_without_a_reward_trips_the_collapse_gate(tmp_path):
    """The gate passed, 'the recorded reward did not collapse' (exit 0), on a run that holds
    no reward at all: a CI job gated on it could never fail. It trips now, saying why, as a
    baseline's series the run did not record trips baseline.present."""
    run = _run(tmp_path / "hooks", reward=False)
    result = runner.invoke(app, ["check", str(run), "--fail-on-collapse", "--format", "json"])
    assert result.exit_code == 1, result.output
    (gate,) = json.loads(result.stdout)["gates"]
    assert gate["gate"] == "reward_collapse" and not gate["ok"]
    assert "recorded no reward_mean" in gate["message"]
    done = runner.invoke(app, ["check", str(run), "--fail-on-collapse"])
    assert done.exit_code == 1, done.stderr
    assert "(run) reward_collapse: the run recorded no reward_mean" in done.stderr


def test_a_run_with_a_steady_reward_still_passes(tmp_path):
    run = _run(tmp_path / "steady", reward=True)
    result = runner.invoke(app, ["check", str(run), "--fail-on-collapse"])
    assert result.exit_code == 0, result.output
