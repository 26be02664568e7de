"""`branch --out` never writes a branch onto the run it branches from, nor into its files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app


def _stabledrl(*args: object) -> Result:
    """`stabledrl ARGS...` in this process; its exit code and both streams."""
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("u3_branch") / "grpo@4"
    result = _stabledrl("record", "--out", run, "--rl-steps", "8", "--checkpoint-every", "4")
    assert result.exit_code == 0, result.stderr
    return run


def _copy(recorded: Path, where: Path) -> Path:
    run = where / recorded.name
    shutil.copytree(recorded, run)
    return run


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_branch_onto_the_original_run_is_refused(
    recorded: Path, tmp_path: Path, force: list[str]
) -> None:
    """RUN named grpo@4 and --out its parent: the grpo branch at step 4 is RUN itself. Without
    --force the line said to pass --force to overwrite 'the branches'; with it, the branch
    replaced the original's 8 steps with its own 2 (the run it branched from, gone)."""
    run = _copy(recorded, tmp_path)
    args = ["--at", "4", "-p", "grpo", "--rl-steps", "2", "--out", tmp_path, *force]
    result = _stabledrl("branch", run, *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run}: a branch run would be the run it branches from; pass another --out"
    ]
    assert sd.open_run(run).step_numbers == list(range(8))


@pytest.mark.parametrize(
    ("out", "folder"),
    [("steps", "steps"), ("checkpoints", "checkpoints"), ("branches/mine", "branches")],
)
def test_a_branch_inside_the_runs_own_folders_is_refused(
    recorded: Path, tmp_path: Path, out: str, folder: str
) -> None:
    """--out RUN/steps put the branch run in the original's steps folder, which inspect then
    reported as an unknown file of the original run (an integrity finding); --out
    RUN/branches/mine put it at RUN/branches/mine/grpo@4, after which `record --out RUN --force`
    exited 2 ('RUN/branches/mine/grpo@4: not a file of a branch run')."""
    run = _copy(recorded, tmp_path)
    args = ["--at", "4", "-p", "grpo", "--rl-steps", "2", "--out", run / out]
    result = _stabledrl("branch", run, *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run / out / 'grpo@4'}: a branch run would be inside the {folder} folder "
        f"of {run}, the run it branches from; pass another --out"
    ]
    assert not (run / out / "grpo@4").exists()
    assert sd.open_run(run).integrity.findings == []


def test_a_branch_of_one_step_is_counted_in_the_singular(recorded: Path, tmp_path: Path) -> None:
    """The branch's start line and the table's title said '1 steps'."""
    args = ["--at", "4", "-p", "grpo", "--rl-steps", "1", "--out", tmp_path]
    result = _stabledrl("branch", recorded, *args)
    assert result.exit_code == 0, result.stderr
    assert f"branch grpo@4: 1 step into {tmp_path / 'grpo@4'}" in result.stderr.splitlines()
    assert "1 step each;" in " ".join(result.stdout.split())


def test_a_url_given_as_the_run_is_refused_in_one_line(tmp_path: Path) -> None:
    """`branch file:///RUN` said 'file:/RUN: not a run directory' (exit 3), its URL mangled
    into a path, as if nothing were there. branch trains from a local run's checkpoints: a URL
    is refused as watch refuses one, exit 2, naming the commands that read a URL."""
    url = tmp_path.as_uri()
    result = _stabledrl("branch", url, "--at", "0", "-p", "grpo")
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {url}: branch takes a local path, not a URL (")
    assert line.endswith("replay, check, inspect, diff, tune and pack read a run at a URL")


@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("out", ["", "sub"])
def test_a_branch_elsewhere_inside_the_original_run_is_refused(
    recorded: Path, tmp_path: Path, out: str, force: list[str]
) -> None:
    """--out RUN put the branch run at RUN/grpo@4, which `record --out RUN --force` kept (it
    removes RUN/branches alone), where docs/branching.md says the new run never carries
    branches of the old one. Only RUN/branches takes a branch run inside RUN."""
    run = _copy(recorded, tmp_path)
    args = ["--at", "4", "-p", "grpo", "--rl-steps", "2", "--out", run / out, *force]
    result = _stabledrl("branch", run, *args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {run / out / 'grpo@4'}: a branch run would be inside {run}, the run it "
        "branches from, outside its branches folder, where recording over the run (--force) "
        f"would keep it; pass another --out, outside the run (or none: {run / 'branches'})"
    ]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "manifest.json", "steps"]


def test_a_branch_through_a_symlink_loop_is_a_write_error(recorded: Path, tmp_path: Path) -> None:
    """--out LOOP/x (LOOP a symlink to itself) said 'internal error: RuntimeError: Symlink
    loop from ...' (exit 70): the check that the branch lies outside its run resolved the path
    (Path.resolve raises on a loop before Python 3.13). The write now names it, exit 4."""
    run = _copy(recorded, tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    out = tmp_path / "loop" / "x"
    result = _stabledrl("branch", run, "--at", "4", "-p", "grpo", "--rl-steps", "1", "--out", out)
    assert (result.exit_code, result.stderr) == (
        4,
        f"error: {out / 'grpo@4'}: cannot write it (Too many levels of symbolic links)\n",
    )


def test_a_branch_out_that_is_a_file_is_refused_before_training(
    recorded: Path, tmp_path: Path
) -> None:
    """`--out FILE` (benchmarks/fuzz_cli.py found it): each branch run would be
    FILE/POLICY@STEP, under a file. It was exit 4 (`cannot write it (Not a directory)`) once
    the original was replayed, where `record --out FILE/run` is a usage error before any
    work."""
    afile = tmp_path / "file.txt"
    afile.write_text("not a folder\n")
    result = _stabledrl("branch", recorded, "--at", "4", "-p", "dapo", "--out", afile)
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {afile / 'dapo@4'}: {afile} is not a directory\n",
    )
    assert afile.read_text() == "not a folder\n"


def test_a_branches_folder_that_is_a_file_is_refused_before_training(
    recorded: Path, tmp_path: Path
) -> None:
    """A run whose `branches` is a file: its branch runs' default place is under it. It was
    exit 4 once the original was replayed."""
    run = _copy(recorded, tmp_path)
    (run / "branches").write_text("a note\n")
    result = _stabledrl("branch", run, "--at", "4", "-p", "dapo", "--rl-steps", "1")
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {run / 'branches' / 'dapo@4'}: {run / 'branches'} is not a directory\n",
    )
