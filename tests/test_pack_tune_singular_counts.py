"""pack and tune count one step in the singular."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app


def test_a_run_of_one_step_is_counted_in_the_singular(tmp_path: Path) -> None:
    """pack said 'packed 1 steps (6 tokens)', tune's title 'tune RUN: 1 steps, 1 setting'."""
    with sd.Recorder(tmp_path / "run", policy="is") as recorder:
        recorder.log_step(
            0,
            logp=torch.full((2, 3), -1.0),
            logp_old=torch.full((2, 3), -1.1),
            advantages=torch.tensor([1.0, -1.0]),
        )
    runner = CliRunner()
    packed = runner.invoke(app, ["pack", str(tmp_path / "run"), str(tmp_path / "run.h5")])
    assert packed.exit_code == 0, packed.output
    assert packed.stdout.startswith(f"packed 1 step (6 tokens) of {tmp_path / 'run'} into ")
    tuned = runner.invoke(app, ["tune", str(tmp_path / "run"), "-p", "grpo", "--device", "cpu"])
    assert tuned.exit_code == 0, tuned.output
    assert tuned.stdout.startswith(f"tune {tmp_path / 'run'}: 1 step, 1 setting")


def test_a_run_of_scalars_only_is_not_said_to_pack_tokens(tmp_path: Path) -> None:
    """pack of an imported log or an optimizer-hook recording said '(0 tokens)'."""
    with sd.Recorder(tmp_path / "run", policy=None) as recorder:
        for step in range(3):
            recorder.log_step(step, grad_norm=1.0, loss=0.5)
    packed = CliRunner().invoke(app, ["pack", str(tmp_path / "run"), str(tmp_path / "run.h5")])
    assert packed.exit_code == 0, packed.output
    assert packed.stdout.startswith(f"packed 3 steps (scalars only) of {tmp_path / 'run'} into ")
