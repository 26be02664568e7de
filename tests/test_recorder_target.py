"""Where a Recorder may record: never inside another run (its steps, checkpoints or branches
folder, whose files it would then hold, or anywhere else in it; the library refuses it as
`record` does), but for a branch run in RUN/branches/NAME."""

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


@pytest.mark.parametrize("inside", ["sub", "a/b"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_recorder_inside_another_run_is_refused(
    tmp_path: Path, inside: str, resume: bool
) -> None:
    """Before, Recorder('RUN/sub') recorded a run inside the run RUN, which recording over RUN
    (--force) then kept, and whose files RUN's size and pack's warning counted; a Recorder in
    its steps, checkpoints or branches folder was refused already."""
    original = tmp_path / "run"
    with sd.Recorder(original, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    before = sorted(original.rglob("*"))
    out = original / inside
    with pytest.raises(UsageError) as refused:
        sd.Recorder(out, policy=None, resume=resume)
    assert (
        str(refused.value) == f"{out}: a run would be inside the run {original}; pass another path"
    )
    assert sorted(original.rglob("*")) == before


def test_record_and_import_refuse_an_out_inside_a_run(tmp_path: Path) -> None:
    """`record --out RUN/sub` and `import --out RUN/sub` as the Recorder: exit 2, one line."""
    original = tmp_path / "run"
    with sd.Recorder(original, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n')
    out = original / "sub"
    for args in (
        ["record", "--out", str(out), "--rl-steps", "1"],
        ["import", str(log), "--out", str(out)],
    ):
        result = CliRunner().invoke(app, args)
        assert (result.exit_code, result.stderr) == (
            2,
            f"error: {out}: a run would be inside the run {original}; pass another --out\n",
        )
    assert not out.exists()


def test_a_run_may_lie_below_another_tools_manifest(tmp_path: Path) -> None:
    """A project folder whose manifest.json is no run's (a web app's) holds runs below it; so
    does a run's own path given through its subfolder and back (RUN/sub/..)."""
    (tmp_path / "manifest.json").write_text('{"name": "my-app", "version": "1.0"}')
    with sd.Recorder(tmp_path / "runs" / "mine", policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    (tmp_path / "runs" / "mine" / "sub").mkdir()
    with sd.Recorder(tmp_path / "runs" / "mine" / "sub" / "..", policy=None, resume=True) as rec:
        rec.log_step(1, loss=1.0)
    assert sd.open_run(tmp_path / "runs" / "mine").step_numbers == [0, 1]


def test_a_recorder_records_a_branch_run_in_a_runs_branches_folder(tmp_path: Path) -> None:
    """RUN/branches/POLICY@STEP is where `stabledrl branch` records a branch run."""
    original = tmp_path / "run"
    with sd.Recorder(original, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    with sd.Recorder(original / "branches" / "grpo@0", policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    assert sd.open_run(original).integrity.findings == []


@pytest.mark.parametrize("in_a_run", [True, False])
def test_a_symlink_loop_is_never_an_internal_error(tmp_path: Path, in_a_run: bool) -> None:
    """A path through a symlink loop in a run's folder (RUN/loop -> loop): the check that the
    path lies outside the run's folders resolved it, and Python raised RuntimeError ('Symlink
    loop from ...'); `record --out RUN/loop/x` said 'internal error' (exit 70). Now a path in a
    run is refused as one (exit 2), and outside a run the write refuses it, naming it (record:
    exit 4)."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    home = run if in_a_run else tmp_path
    (home / "loop").symlink_to("loop")
    out = home / "loop" / "x"
    result = CliRunner().invoke(app, ["record", "--out", str(out), "--rl-steps", "1"])
    if in_a_run:
        with pytest.raises(UsageError, match="a run would be inside the run"):
            sd.Recorder(out, policy=None)
        assert (result.exit_code, result.stderr) == (
            2,
            f"error: {out}: a run would be inside the run {run}; pass another --out\n",
        )
        return
    with pytest.raises(WriteError, match=r"cannot write it \(Too many levels of symbolic links"):
        sd.Recorder(out, policy=None)
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: {out}: cannot write it (Too many levels of symbolic links)\n",
    )
