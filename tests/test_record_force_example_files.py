"""`record --force -- CMD` over a run of the built-in example kept its checkpoints and branch
runs (RUN/checkpoints, RUN/branches) in the command's new run: `branch` read the example's
checkpoints as the new run's. They go once the command replaced the run (a Recorder of it
overwrote the run), their folders too (an empty RUN/checkpoints was left: a fresh run looks
like one), and stay with a run the command resumed."""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli import cli_environment, record_python
from _record_here import record_python_here
from typer.testing import CliRunner, Result

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

LOOP = textwrap.dedent(
    """
    import sys
    import numpy as np
    import stabledrl_cli as sd

    start, end = int(sys.argv[1]), int(sys.argv[2])
    kwargs = {"resume": True, "resume_from": start} if start else None
    for step in range(start, end):
        logp = np.full((2, 3), -1.0, dtype="float32")
        sd.log_policy_batch(
            step, recorder_kwargs=kwargs, logp=logp, logp_old=logp,
            advantages=np.ones(2, dtype="float32"),
        )
    """
)
OPTIONS = ("--force", "-p", "grpo", "--no-optimizer-hooks")


def _script(start: int, end: int) -> str:
    """LOOP over steps `start` to `end` (not included)."""
    return f"import sys; sys.argv[1:] = ['{start}', '{end}']\n{LOOP}"


def _loop(monkeypatch, capfd, tmp_path: Path, start: int, end: int, *options: str):
    return record_python_here(monkeypatch, capfd, _script(start, end), *options, cwd=tmp_path)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run of LOOP's steps 0-2 under `stabledrl record`, recorded once for the module
    (`_with_example_files` gives each test its own copy)."""
    tmp = tmp_path_factory.mktemp("recorded")
    first, _ = record_python(
        _script(0, 3), "-p", "grpo", "--no-optimizer-hooks", cwd=tmp, env=cli_environment()
    )
    assert first.returncode == 0, first.stderr
    return tmp / "run"


def _with_example_files(tmp_path: Path, recorded: Path) -> tuple[Path, Path]:
    """A run of 3 steps (a copy of `recorded`) with a checkpoint and a branch run beside it, as
    the example leaves."""
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    checkpoint = run / "checkpoints" / "step-00000000.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"the old run's checkpoint")
    with Recorder(run / "branches" / "grpo@0", policy="grpo") as branch:
        branch.log_step(0, grad_norm=1.0)
    return run, checkpoint


def test_a_command_that_replaces_the_run_leaves_no_checkpoint_or_branch_of_it(
    tmp_path, monkeypatch, capfd, recorded
):
    run, checkpoint = _with_example_files(tmp_path, recorded)
    resumed, errors = _loop(monkeypatch, capfd, tmp_path, 2, 4, *OPTIONS)
    assert resumed.returncode == 0 and errors == [], resumed.stderr
    assert checkpoint.is_file() and (run / "branches" / "grpo@0" / "manifest.json").is_file()

    replaced, errors = _loop(monkeypatch, capfd, tmp_path, 0, 2, *OPTIONS)
    assert replaced.returncode == 0 and errors == [], replaced.stderr
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "steps"]


def _refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    """`record --out run --force ... -- python -c ...` in this process, in `tmp_path` (the
    refusal names the path as typed), whose command leaves `tmp_path/ran` if it is started: the
    refusals below come before it (a real process's refusal, exit 2, is
    test_a_file_browsers_files_go_with_the_branch_runs_anything_else_is_refused's)."""
    monkeypatch.chdir(tmp_path)
    command = [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w').close()"]
    return CliRunner().invoke(app, ["record", "--out", "run", *OPTIONS, "--", *command])


def test_what_is_no_branch_runs_is_refused_before_the_command_starts(
    tmp_path, monkeypatch, recorded
):
    run, checkpoint = _with_example_files(tmp_path, recorded)
    mine = run / "branches" / "notes.txt"
    mine.write_text("mine")
    refused = _refused(tmp_path, monkeypatch)
    assert refused.exit_code == 2 and not (tmp_path / "ran").exists(), refused.output
    assert refused.stderr == (
        f"error: {Path('run') / 'branches' / 'notes.txt'}: not a file of a branch run; "
        "recording over the run (--force) removes its branches, never another file: remove it, "
        "or record elsewhere\n"
    )
    assert mine.read_text() == "mine" and checkpoint.is_file()


def test_checkpoints_of_a_directory_that_holds_no_run_are_refused_not_removed(
    tmp_path, monkeypatch
):
    """A project folder recorded into with --force: its own `checkpoints/step-00001000.pt` is
    no run's, and the command's recording would have removed it."""
    mine = tmp_path / "run" / "checkpoints" / "step-00001000.pt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my model's weights")
    refused = _refused(tmp_path, monkeypatch)
    assert refused.exit_code == 2 and not (tmp_path / "ran").exists(), refused.output
    assert refused.stderr.startswith(
        f"error: {Path('run') / 'checkpoints' / 'step-00001000.pt'}: no run's (run holds no "
        "manifest.json); "
    )
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert mine.read_bytes() == b"my model's weights"


def test_a_file_browsers_files_go_with_the_branch_runs_anything_else_is_refused(
    tmp_path, monkeypatch, capfd, recorded
):
    """A .DS_Store Finder left in a branch run (macOS opens RUN/branches/grpo@0 once) made
    `record --force` refuse until it was removed by hand: such files (.DS_Store, ._NAME,
    Thumbs.db) are no one's data and go with the branch runs; a folder so named is refused."""
    run, _ = _with_example_files(tmp_path, recorded)
    branch = run / "branches" / "grpo@0"
    browsers = [
        run / "branches" / ".DS_Store",
        branch / ".DS_Store",
        branch / "._manifest.json",
        branch / "steps" / "Thumbs.db",
        branch / "steps" / "._step-00000000.safetensors",
    ]
    for path in browsers:
        path.write_bytes(b"\0")
    shutil.copytree(run, tmp_path / "mine")

    replaced, errors = _loop(monkeypatch, capfd, tmp_path, 0, 2, *OPTIONS)
    assert replaced.returncode == 0 and errors == [], replaced.stderr
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "steps"]

    mine = tmp_path / "mine" / "branches" / "grpo@0" / "steps" / ".DS_Store"
    mine.mkdir()  # a folder: not what a file browser leaves
    script = "print('the command ran')"
    refused, errors = record_python_here(
        monkeypatch, capfd, script, *OPTIONS, cwd=tmp_path, out="mine"
    )
    assert refused.returncode == 2 and "the command ran" not in refused.stdout
    assert errors == [
        f"error: {Path('mine') / 'branches' / 'grpo@0' / 'steps' / '.DS_Store'}: not a file of a "
        "branch run; recording over the run (--force) removes its branches, never another file: "
        "remove it, or record elsewhere"
    ]
    assert mine.is_dir() and (tmp_path / "mine" / "branches" / ".DS_Store").is_file()


@pytest.mark.parametrize("command", [(), ("--", sys.executable, "-c", "print('it ran')")])
def test_a_folder_named_as_a_checkpoint_is_refused_before_the_run_changes(
    tmp_path, recorded, command
):
    """`mkdir RUN/checkpoints/step-00000008.pt` survived `record --force`: the example's
    checkpoint at step 8 then failed to be written (exit 4, the old run already replaced), or,
    saved at other steps, the new run's `branch --at 8` exited 3 on it. Refused as anything
    else --force would not remove is, exit 2, before the run or the command changes anything."""
    run, checkpoint = _with_example_files(tmp_path, recorded)
    folder = run / "checkpoints" / "step-00000008.pt"
    folder.mkdir()
    before = sorted(p.name for p in (run / "steps").iterdir())
    args = ["record", "--out", str(run), "--force", *command]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == (
        f"error: {folder}: not a checkpoint file; recording over the run (--force) removes its "
        "checkpoints, never another file: remove it, or record elsewhere\n"
    )
    assert "it ran" not in refused.stdout and folder.is_dir() and checkpoint.is_file()
    assert sorted(p.name for p in (run / "steps").iterdir()) == before


@pytest.mark.parametrize("command", [(), ("--", sys.executable, "-c", "print('it ran')")])
def test_a_file_named_branches_is_refused_before_the_run_changes(tmp_path, command):
    """A file at RUN/branches survived `record --force` (exit 0), and every `branch` of the
    new run then exited 4 ('RUN/branches/grpo@0: cannot write it (Not a directory)'): refused
    as anything else --force would not remove is, exit 2, before the run or the command
    changes anything."""
    run = tmp_path / "run"
    with Recorder(run, policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    (run / "branches").write_text("mine")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    refused = CliRunner().invoke(app, ["record", "--out", str(run), "--force", *command])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == (
        f"error: {run / 'branches'}: not a folder of branch runs; recording over the run "
        "(--force) removes its branches, never another file: remove it, or record elsewhere\n"
    )
    assert "it ran" not in refused.stdout
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def _in_process(steps: range, **kwargs: object) -> Callable[..., int]:
    """A stand-in for `_wrap._call`: what a command's process does, done in this process (no
    process to start) under the environment record gives the command: a Recorder of record's
    run with `kwargs`, logging `steps`."""

    def call(cmd: list[str], env: dict[str, str], stop: object) -> int:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with Recorder(env["STABLEDRL_RUN_DIR"], policy="grpo", **kwargs) as recorder:
                for step in steps:
                    recorder.log_step(step, grad_norm=1.0)
        return 0

    return call


@pytest.mark.parametrize("theirs", ["notes.txt", "later"])
def test_a_checkpoints_folder_holding_more_than_checkpoints_is_kept(tmp_path, theirs):
    """Recording over the run removes its checkpoints, and their folder with a file browser's
    file in it when that is all it holds; a file of another name (the user's notes) keeps the
    folder, and so does a checkpoint written there meanwhile (`later`: the new run's own, after
    the list was made)."""
    from stabledrl_cli.example.old_run import old_run_files, remove_old_run_files

    with Recorder(tmp_path / "old", policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    run, checkpoint = _with_example_files(tmp_path, tmp_path / "old")
    (checkpoint.parent / ".DS_Store").write_bytes(b"\0")
    mine = checkpoint.parent / ("notes.txt" if theirs == "notes.txt" else "step-00000004.pt")
    if theirs == "notes.txt":
        mine.write_text("mine")
    old = old_run_files(run)
    if theirs == "later":
        mine.write_bytes(b"the new run's checkpoint")
    remove_old_run_files(old)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "manifest.json", "steps"]
    kept = {mine.name, ".DS_Store"} if theirs == "notes.txt" else {mine.name}  # (all or none)
    assert {path.name for path in checkpoint.parent.iterdir()} == kept


def test_an_empty_checkpoints_folder_of_no_run_is_left_alone(tmp_path):
    """A folder holding no run (no manifest) and an empty checkpoints/ is recorded into with
    --force as before: nothing of it is the run's to remove, and nothing is refused."""
    from stabledrl_cli.example.old_run import old_run_files

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert old_run_files(tmp_path / "run") == []


def test_a_replacement_of_the_same_settings_under_source_date_epoch_is_no_resume(
    tmp_path, monkeypatch
):
    """Under SOURCE_DATE_EPOCH a run recorded again with the same settings has the old run's
    manifest but for its run_id, and record told a replaced run from a resumed one by that
    manifest (the run_id left out, which a resume may renew): the new run kept the old run's
    checkpoint and branch run. record now hears it from the command's Recorder that replaced
    the run; a resume keeps them still."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    with Recorder(tmp_path / "old", policy="grpo") as recorder:
        for step in range(3):
            recorder.log_step(step, grad_norm=1.0)
    run, checkpoint = _with_example_files(tmp_path, tmp_path / "old")
    args = ["record", "--out", str(run), *OPTIONS, "--", sys.executable, "-c", "pass"]

    monkeypatch.setattr("stabledrl_cli.cli._wrap._call", _in_process(range(3, 4), resume=True))
    resumed = CliRunner().invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert checkpoint.is_file() and (run / "branches" / "grpo@0" / "manifest.json").is_file()

    monkeypatch.setattr("stabledrl_cli.cli._wrap._call", _in_process(range(2)))
    replaced = CliRunner().invoke(app, args)
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "steps"]


def test_an_import_over_the_run_leaves_no_checkpoint_or_branch_of_it(tmp_path):
    """`import LOG --out RUN --force` over a run of the example kept its checkpoint and branch
    run beside the imported scalar run, as record --force did before it removed them."""
    with Recorder(tmp_path / "old", policy="grpo") as recorder:
        recorder.log_step(0, grad_norm=1.0)
    run, _ = _with_example_files(tmp_path, tmp_path / "old")
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n')
    imported = CliRunner().invoke(app, ["import", str(log), "--out", str(run), "--force"])
    assert imported.exit_code == 0, imported.output
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "steps"]
