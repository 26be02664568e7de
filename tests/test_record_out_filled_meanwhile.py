"""A run that appears in `stabledrl record`'s --out after record checked it (another job that
records there, started at the same time) refuses the command's Recorder with a line that names
what the user can type: `stabledrl record --force`, not the Recorder's Python arguments. Before:
'... already exists and is not empty (manifest.json); pass overwrite=True to replace the run,
or resume=True to continue it', arguments of a Recorder the user never wrote."""

from __future__ import annotations

import pytest
from _cli import torch_training
from _record_here import record_python_here

from stabledrl_cli import Recorder
from stabledrl_cli.errors import UsageError

FILLED = """
import json, os
run = os.environ["STABLEDRL_RUN_DIR"]
os.makedirs(run, exist_ok=True)
with open(os.path.join(run, "manifest.json"), "w") as manifest:
    json.dump({"format": "stabledrl-run"}, manifest)
"""


def test_the_refusal_names_record_force(tmp_path, monkeypatch, capfd):
    done, errors = record_python_here(monkeypatch, capfd, FILLED + torch_training(3), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert errors and errors[-1].startswith("error: recording failed: "), done.stderr
    assert (
        "already exists and is not empty (manifest.json); run `stabledrl record --force` to "
        "record into it" in errors[-1]
    ), errors
    assert "overwrite=True" not in done.stderr
    assert "trained" in done.stdout  # recording never breaks training


def test_a_recorder_of_ones_own_is_told_its_arguments(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(UsageError, match="pass overwrite=True to replace the run, or resume"):
        Recorder(tmp_path, unit="sequence")
