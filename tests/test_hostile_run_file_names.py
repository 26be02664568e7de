"""The names of a run's files match as the writer spells them only. `$` also matched before a
final newline and `\\d` took other scripts' digits: a file `stopped.rank-0001.json\\n` in
steps/ was read as rank 1's stop note (no finding; `recording_stops` named it), and
`Recorder(run, overwrite=True)` deleted a user's `step-٠٠٠٠٠٠٠١.safetensors` (Arabic-Indic
digits) as one of the run's step files. Both are now files that are not the run's."""

from __future__ import annotations

import json
from pathlib import Path

from _corpus import tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()
NOTE = '{"step": 2, "rank": 1, "reason": "disk full"}\n'


def _inspected(run: Path) -> dict[str, object]:
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_a_note_name_with_a_final_newline_is_not_a_note(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run", world_size=2)
    odd = run / "steps" / "stopped.rank-0001.json\n"
    odd.write_text(NOTE)
    data = _inspected(run)
    assert data["recording_stops"] == []
    findings = data["integrity"]["findings"]  # type: ignore[index]
    assert [(f["kind"], f["path"]) for f in findings] == [("unknown_file", str(odd))]
    odd.rename(run / "steps" / "stopped.rank-0001.json")  # the writer's name: a note
    assert _inspected(run)["recording_stops"] == [json.loads(NOTE)]


def test_names_in_other_digits_or_with_a_newline_are_unknown_files(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    steps = run / "steps"
    odd = [
        steps / ".DS_Store\n",
        steps / ".writer.rank-\u0660\u0660\u0660\u0660.lock",
        steps / ".step-00000009.safetensors.tmp-1\n",
    ]
    for path in odd:
        path.write_text("x")
    findings = _inspected(run)["integrity"]["findings"]  # type: ignore[index]
    assert sorted(f["path"] for f in findings if f["kind"] == "unknown_file") == sorted(
        map(str, odd)
    )


def test_recording_over_a_run_leaves_a_file_that_is_not_its_own(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    user = run / "steps" / "step-\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0661.safetensors"
    user.write_text("mine")
    with sd.Recorder(run, policy="grpo", overwrite=True):
        pass
    assert user.read_text() == "mine"
    assert not list(run.glob("steps/step-0*"))  # the run's own step files went
