"""A training of the built-in example cut short (Ctrl-C) says so in its run: a branch, and a
`record` of the example, whose Recorder closes on the way out. Before: the branch read as a
closed, finished run of 5 steps (`inspect`: 'closed: its Recorder finished'; `replay`: no
word), where 10 were asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.branching import run_branches
from stabledrl_cli.capture.branch_protocol import checkpoints_dir
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.example.checkpoint import CheckpointPlan
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import train
from stabledrl_cli.policies import get_policy

CONFIG = ExampleConfig(seed=3, steps=16, pretrain_steps=20)


def _ctrl_c_after(stop: int):
    def on_step(step: int) -> None:
        if step == stop:
            raise KeyboardInterrupt

    return on_step


def _says_interrupted(run: Path, note: str) -> None:
    runner = CliRunner()
    inspected = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert inspected.exit_code == 0, inspected.output
    assert open_run(run).manifest["recording_stopped"]["reason"] == note
    replayed = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert replayed.exit_code == 0, replayed.output
    assert f"warning: {run}: recording stopped at step " in replayed.stderr
    assert note in replayed.stderr


def test_an_interrupted_branch_says_where_it_was_cut_short(tmp_path: Path) -> None:
    run = tmp_path / "run"
    plan = CheckpointPlan(directory=checkpoints_dir(run), every=8)
    with Recorder(run, **recorder_kwargs(CONFIG, get_policy(CONFIG.policy))) as recorder:
        train(CONFIG, recorder=recorder, checkpoints=plan)

    with pytest.raises(KeyboardInterrupt):
        run_branches(
            run, at=8, policies=["grpo"], steps=10, out=tmp_path / "b", on_step=_ctrl_c_after(12)
        )
    branch = tmp_path / "b" / "grpo@8"
    assert open_run(branch).step_numbers == [8, 9, 10, 11, 12]
    note = "training interrupted (Ctrl-C) at step 13, 5 of the 10 steps asked (8..17) recorded"
    _says_interrupted(branch, note)
    assert open_run(branch).manifest["recording_stopped"]["step"] == 13


def test_an_interrupted_record_of_the_example_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with (
        pytest.raises(KeyboardInterrupt),
        Recorder(run, **recorder_kwargs(CONFIG, get_policy(CONFIG.policy))) as recorder,
    ):
        train(CONFIG, recorder=recorder, on_step=lambda info: _ctrl_c_after(3)(info.step))
    note = "training interrupted (Ctrl-C) at step 4, 4 of the 16 steps asked (0..15) recorded"
    _says_interrupted(run, note)


def test_a_finished_training_notes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with Recorder(run, **recorder_kwargs(CONFIG, get_policy(CONFIG.policy))) as recorder:
        train(CONFIG, recorder=recorder)
    assert "recording_stopped" not in open_run(run).manifest
    replayed = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo"])
    assert replayed.exit_code == 0 and "warning" not in replayed.stderr, replayed.stderr


def test_a_branch_of_an_interrupted_run_warns_as_replay_does(tmp_path: Path) -> None:
    """The original stopped at step 12 of the 16 asked: branch trained to its end, 4 steps,
    and said nothing of it, where replay, check and tune of the same run warn that the
    recording stopped."""
    run = tmp_path / "run"
    plan = CheckpointPlan(directory=checkpoints_dir(run), every=8)
    with (
        pytest.raises(KeyboardInterrupt),
        Recorder(run, **recorder_kwargs(CONFIG, get_policy(CONFIG.policy))) as recorder,
    ):
        train(
            CONFIG, recorder=recorder, checkpoints=plan, on_step=lambda i: _ctrl_c_after(11)(i.step)
        )
    args = ["branch", str(run), "--at", "8", "-p", "grpo", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"warning: {run}: recording stopped at step 12 (rank 0): training interrupted" in (
        result.stderr
    ), result.stderr
