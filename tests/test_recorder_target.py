"""Where a Recorder may record: never inside the steps, checkpoints or branches folder of
another run, whose files it would then hold (the library refuses it as `record` does)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError, WriteError


@pytest.mark.parametrize(
    ("inside", "folder", "run"),
    [
        ("steps/x", "steps", ""),
        ("checkpoints/x", "checkpoints", ""),
        ("branches", "branches", ""),
        ("branches/grpo@0/x", "branches", ""),
        ("branches/grpo@0/steps/x", "steps", "branches/grpo@0"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_recorder_inside_another_runs_folders_is_refused(
    tmp_path: Path, inside: str, folder: str, run: str, resume: bool
) -> None:
    """Before, Recorder('RUN/steps/x') recorded a run there, and RUN's integrity then listed
    'x: not a step file of this run' (only `record --out` refused the place)."""
    original = tmp_path / "run"
    for path in (original, original / "branches" / "grpo@0"):
        with sd.Recorder(path, policy=None) as recorder:
            recorder.log_step(0, loss=1.0)
    (original / "checkpoints").mkdir()
    before = sorted(original.rglob("*"))
    out = original / inside
    with pytest.raises(UsageError) as refused:
        sd.Recorder(out, policy=None, resume=resume)
    assert str(refused.value) == (
        f"{out}: a run would be inside the {folder} folder of {original / run}; pass another path"
    )
    assert sorted(original.rglob("*")) == before


def test_a_recorder_records_a_branch_run_in_a_runs_branches_folder(tmp_path: Path) -> None:
    """RUN/branches/POLICY@STEP is where `stabledrl branch` records a branch run."""
    original = tmp_path / "run"
    with sd.Recorder(original, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    with sd.Recorder(original / "branches" / "grpo@0", policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    assert sd.open_run(original).integrity.findings == []


def test_a_symlink_loop_inside_a_run_is_a_write_error(tmp_path: Path) -> None:
    """A path through a symlink loop in a run's folder (RUN/loop -> loop): the check that the
    path lies outside the run's folders resolved it, and Python raised RuntimeError ('Symlink
    loop from ...'); `record --out RUN/loop/x` said 'internal error' (exit 70). Now the write
    refuses it, naming it, as it does outside a run (record: exit 4)."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    (run / "loop").symlink_to("loop")
    out = run / "loop" / "x"
    with pytest.raises(WriteError, match=r"cannot write it \(Too many levels of symbolic links"):
        sd.Recorder(out, policy=None)
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1"])
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: {out}: cannot write it (Too many levels of symbolic links)\n",
    )
