"""A checkpoint whose rollout index does not fit its step (step != rollout x mu) is off a
rollout boundary: `branch` refuses it, exit 3, before a branch run is opened."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_branch import _record
from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import checkpoints_dir
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.example import ExampleConfig


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps, 3 rollouts of mu = 4: checkpoints at steps 0, 4 and 8."""
    out = tmp_path_factory.mktemp("rollout") / "run"
    return _record(out, ExampleConfig(seed=0, steps=12, pretrain_steps=5), every=4)


def _branch(run: Path) -> tuple[int, str]:
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "1"]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stderr


def test_a_checkpoint_at_a_rollout_boundary_branches(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    code, stderr = _branch(run)
    assert code == 0, stderr
    rollouts = open_run(run / "branches" / "grpo@8").scalar_series_many(["rollout"])["rollout"]
    assert rollouts[1].tolist() == [2.0]  # the original's rollout of step 8 (mu = 4)


@pytest.mark.parametrize("rollout", [0, 3])
def test_a_checkpoint_off_a_rollout_boundary_exits_3_naming_it(recorded, tmp_path, rollout):
    """It branched (exit 0), recording step 8 as rollout 3 where the original recorded
    rollout 2: `diff` does not compare a run's own scalars, so nothing said so."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    path = checkpoints_dir(run) / "step-00000008.pt"
    state = torch.load(path, weights_only=True)
    state["rollout"] = rollout
    torch.save(state, path)
    code, stderr = _branch(run)
    assert code == 3, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: {path}: it resumes at step 8 and rollout {rollout}")
    assert "off a rollout boundary" in errors[0]
    assert not (run / "branches").exists()
