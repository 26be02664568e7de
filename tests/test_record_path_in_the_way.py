"""A file put where `stabledrl record`'s run goes (its --out, or the run's `steps`) while the
command runs, before its first step opens the run: a write failure, exit 4 with one line
naming the path, and training goes on. Before: exit 2, a usage error, for a path the user
never gave ('.../run exists and is not a directory'; with --force '.../steps: not a
directory ... replacing a run never removes it'), and '.../steps: cannot write it (File
exists)' without --force."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _cli import torch_training
from _record_here import record_python_here

from stabledrl_cli import Recorder

TRAIN = torch_training(3)
SCRIPT = """
import os, shutil

run = os.environ["STABLEDRL_RUN_DIR"]
place = os.path.join(run, {name!r}) if {name!r} else run
if os.path.isdir(place):
    shutil.rmtree(place)
open(place, "w").close()  # a file where a directory goes, after record checked the run
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 3 optimizer steps as record's hooks write TRAIN's, written once for the module
    by a Recorder in this process (no training process to start); each test that has --force
    replace a run copies it (the tests replace or remove their copy)."""
    run = tmp_path_factory.mktemp("recorded") / "run"
    with Recorder(run, policy=None) as recorder:
        for step in range(3):
            recorder.log_step(step, grad_norm=1.0, lr=0.1)
    return run


@pytest.mark.parametrize("force", [False, True], ids=["new run", "--force"])
@pytest.mark.parametrize("name", ["", "steps"], ids=["the run directory", "its steps"])
def test_a_file_in_the_runs_place_is_a_write_failure(
    tmp_path, monkeypatch, capfd, name, force, recorded
):
    run = tmp_path / "run"
    if force:  # a run recorded before, which --force replaces
        shutil.copytree(recorded, run)
    options = ["--force"] if force else []
    done, errors = record_python_here(
        monkeypatch, capfd, SCRIPT.format(name=name) + TRAIN, *options, cwd=tmp_path
    )
    assert done.returncode == 4, done.stderr
    assert "trained" in done.stdout  # recording never breaks the training
    place = run / name if name else run
    assert errors[-1] == (
        f"error: recording failed: recording optimizer step 0: {place}: cannot write it "
        "(Not a directory)"
    ), done.stderr
    assert "Traceback" not in done.stderr


OWN = """
from stabledrl_cli import Recorder

try:
    Recorder(run{kwargs})
finally:
    print("trained")
"""


@pytest.mark.parametrize(
    ("options", "kwargs"),
    [([], ""), (["--force"], ""), ([], ", overwrite=True")],
    ids=["new run", "--force", "overwrite=True"],
)
@pytest.mark.parametrize("name", ["", "steps"], ids=["the run directory", "its steps"])
def test_a_scripts_own_recorder_finds_a_file_in_the_runs_place(
    tmp_path, monkeypatch, capfd, name, options, kwargs, recorded
):
    """The script's own Recorder of record's run reports it as record's own Recorder does:
    exit 4 naming the path (before: exit 2 with --force or overwrite=True, 'not a directory
    (where a run keeps its step files); replacing a run never removes it'; 'cannot write it
    (File exists)' without)."""
    run = tmp_path / "run"
    if options:  # a run recorded before, which --force replaces
        shutil.copytree(recorded, run)
    done, errors = record_python_here(
        monkeypatch,
        capfd,
        SCRIPT.format(name=name) + OWN.format(kwargs=kwargs),
        "--no-optimizer-hooks",
        *options,
        cwd=tmp_path,
    )
    assert done.returncode == 4, done.stderr
    assert "trained" in done.stdout
    place = run / name if name else run
    assert errors == [f"error: {place}: cannot write it (Not a directory)"], done.stderr
    assert "Traceback" not in done.stderr
