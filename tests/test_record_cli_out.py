"""`stabledrl record --out` and `stabledrl import --out` refusals name the path as typed and
the remedy of the command that refuses it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

FORMS = {
    "record": ["record", "--out", "BLOCK/run", "--rl-steps", "1"],
    "record -- CMD": ["record", "--out", "BLOCK/run", "--", "python", "-c", "pass"],
    "import": ["import", "log.jsonl", "--out", "BLOCK/run"],
}
"""The commands that take an --out, BLOCK the name of what is in the way."""


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("blocked", "said"),
    [
        ("afile", "afile is not a directory"),
        ("gone", "gone is a symlink to nowhere, which does not exist"),
    ],
    ids=["a file", "a symlink to nothing"],
)
def test_an_out_under_a_file_is_named_as_typed(tmp_path, monkeypatch, form, blocked, said):
    """Before, under a file: record's built-in example and import said 'error:
    /abs/path/afile/run: cannot write it (Not a directory)' (exit 4), the path made absolute,
    record -- CMD the same with the path as typed, after its check let it through. Under a
    symlink to nothing (--out gone itself was refused so, exit 2), each said '... cannot
    write it (File exists)' (exit 4), a reason that names no file."""
    monkeypatch.chdir(tmp_path)
    if blocked == "afile":
        Path("afile").write_text("")
    else:
        os.symlink("nowhere", "gone")
    Path("log.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    args = [arg.replace("BLOCK", blocked) for arg in FORMS[form]]
    result = CliRunner().invoke(app, args)
    assert (result.exit_code, result.stderr) == (2, f"error: --out {blocked}/run: {said}\n")
    assert sorted(os.listdir()) == [blocked, "log.jsonl"]


def test_imports_refusal_of_a_manifest_that_is_a_directory_says_import(tmp_path: Path) -> None:
    """Before, it said '... remove it, or record elsewhere': import records nothing."""
    (tmp_path / "run" / "manifest.json").mkdir(parents=True)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n')
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "replacing a run never removes it: remove it, or import into another --out\n"
    ), result.stderr


def test_import_refuses_an_out_inside_a_runs_steps_folder(tmp_path: Path) -> None:
    """As record's --out is refused there. Before, import wrote its run into the steps folder
    of the run at `first`, whose integrity then listed 'newrun: not a step file of this run'."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n')
    first = tmp_path / "first"
    assert CliRunner().invoke(app, ["import", str(log), "--out", str(first)]).exit_code == 0
    out = first / "steps" / "newrun"
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(out)])
    assert (result.exit_code, result.stderr) == (
        2,
        f"error: {out}: a run would be inside the steps folder of {first}; pass another --out\n",
    )
    assert not out.exists()
