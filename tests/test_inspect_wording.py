"""`stabledrl inspect` as a demanding user reads it: what its rows claim of a run."""

from __future__ import annotations

import json

from _corpus import step_path, tiny_run
from _inspect import inspect_rows
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app


def test_a_run_of_no_step_beside_a_stray_file_is_not_said_to_have_unreadable_ones(tmp_path):
    """A run that recorded no step, a note someone left in its steps/ (an `unknown_file`
    finding): 'scored tokens / step' read 'n/a (no readable step)', as if it held steps that
    could not be read. Only a finding of a step the reader skips (torn, unreadable, a missing
    rank) says so; this run has no step."""
    run = tmp_path / "run"
    sd.Recorder(run, policy="grpo").close()
    (run / "steps" / "README.txt").write_text("notes\n")
    rows = inspect_rows(run)
    assert rows["steps"] == "0"
    assert rows["scored tokens / step"] == "n/a (no step)"


def test_a_step_file_of_one_byte_is_said_in_the_singular(tmp_path):
    """A step file cut to 1 byte read 'torn: 1 bytes, shorter than a safetensors header'."""
    run = tiny_run(tmp_path / "run")
    step_path(run, 1).write_bytes(b"x")
    result = CliRunner().invoke(app, ["inspect", str(run), "-f", "json"])
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert [f["message"] for f in findings] == [
        "step 1: torn: 1 byte, shorter than a safetensors header"
    ]


def test_a_manifest_without_its_writer_or_date_says_so(tmp_path):
    """A manifest someone rewrote without `tool_version` and `created` read 'v1.0 (written by
    stabledrl None)' and 'created None'; a value that is not a string is no version or date
    either."""
    run = tiny_run(tmp_path / "run")
    manifest = run / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["tool_version"]
    data["created"] = {"by": "hand"}
    manifest.write_text(json.dumps(data))
    rows = inspect_rows(run)
    assert rows["format"] == f"v{data['format_version']} (writer not recorded)"
    assert rows["created"] == "not recorded"
