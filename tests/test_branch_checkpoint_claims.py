"""A checkpoint in a run's checkpoints folder that says another run than the run's manifest (a
hand-edited seed or clip bound, a guard taken out) is refused, exit 3, naming the setting
and the two values, before any branch trains. Before: `branch` trained from it silently and
recorded the edited settings under the run's name (a branch whose manifest said seed 7 of a
run recorded with seed 0)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import checkpoints_dir
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder
from stabledrl_cli.example.checkpoint import CheckpointPlan
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.policies import get_policy


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ExampleConfig(seed=3, steps=12, pretrain_steps=20)
    run = tmp_path_factory.mktemp("claims") / "run"
    plan = CheckpointPlan(directory=checkpoints_dir(run), every=8)
    with Recorder(run, **recorder_kwargs(config, get_policy(config.policy))) as recorder:
        train(config, recorder=recorder, checkpoints=plan)
    return run


def _branch(run: Path):
    return CliRunner().invoke(
        app, ["branch", str(run), "--at", "8", "-p", "grpo", "--rl-steps", "2"]
    )


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("config", ("seed", 7), "seed 7 in the checkpoint, 3 in the run"),
        ("config", ("max_grad_norm", 5.0), "max_grad_norm 5.0 in the checkpoint, 1.0 in the run"),
        ("guard", {"mode": "skip", "rule": "skip-step", "norms": None}, "guard"),
    ],
)
def test_a_checkpoint_that_is_not_its_runs_is_refused(recorded, tmp_path, key, value, said):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    path = run / "checkpoints" / "step-00000008.pt"
    data = torch.load(path, weights_only=True)
    if key == "config":
        data["config"][value[0]] = value[1]
    else:
        data[key] = {**value, "norms": torch.zeros(8, dtype=torch.float64)}
    torch.save(data, path)

    done = _branch(run)
    assert done.exit_code == 3, done.output
    assert not (run / "branches").exists()  # refused before any branch trains
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {path}: not a checkpoint of the run it is in: its "), line
    if key == "config":
        assert line.endswith(f"its settings are not the run's ({said}: {run}/manifest.json)")
    else:
        assert "its guard is not the run's (one in the checkpoint, none in the run" in line


def test_the_runs_own_checkpoint_branches(recorded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    done = _branch(run)
    assert done.exit_code == 0, done.output
