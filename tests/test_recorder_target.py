"""Where a Recorder may record: never inside the steps, checkpoints or branches folder of
another run, whose files it would then hold (the library refuses it as `record` does)."""

from __future__ import annotations

from pathlib import Path

import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


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
