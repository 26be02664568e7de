"""A branch run's `meta.branch.checkpoint` names its checkpoint from anywhere: the absolute
path, not the one relative to where `branch` ran (`checkpoints/step-00000004.pt` from inside
the run named nothing inside the branch run or anywhere else)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_branch import _record
from typer.testing import CliRunner

from stabledrl_cli.capture.branch_protocol import checkpoints_dir
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.example import ExampleConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, checkpoints at steps 0 and 4."""
    out = tmp_path_factory.mktemp("path") / "run"
    return _record(out, ExampleConfig(seed=0, steps=8, pretrain_steps=5), every=4)


@pytest.mark.parametrize(("cwd", "given"), [(".", "."), ("checkpoints", "..")])
def test_the_branch_names_its_checkpoint_by_its_absolute_path(run, monkeypatch, cwd, given):
    monkeypatch.chdir(run / cwd)
    args = ["branch", given, "--at", "4", "-p", "gpg", "--rl-steps", "1", "--force"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    branch = open_run(run / "branches" / "gpg@4")
    named = branch.manifest["meta"]["branch"]["checkpoint"]
    assert os.path.isabs(named), named
    assert os.path.samefile(named, checkpoints_dir(run) / "step-00000004.pt")
