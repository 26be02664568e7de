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


def test_a_temporary_name_that_no_rank_of_the_run_writes_is_an_unknown_file(
    tmp_path: Path,
) -> None:
    """Before, a temporary step file of a rank the run does not have (rank 5 of world_size 2),
    or spelled as the writer never spells it, or a directory, was a `temporary` finding, 'in
    flight, or left by a killed writer', and its step no gap; each is a file that is not the
    run's, named why as its final name would be."""
    run = tiny_run(tmp_path / "run", world_size=2)
    steps = run / "steps"
    odd = {
        ".step-00000004.rank-0005.safetensors.tmp-1": "rank 5 >= the run's world_size 2",
        ".step-00000004.rank-00001.safetensors.tmp-1": "not spelled as the writer spells it",
        ".step-000000004.rank-0001.safetensors.tmp-1": "not spelled as the writer spells it",
        ".step-00000004.safetensors.tmp-1": "a step file of a run with another world_size",
        ".step-00000004.rank-0001.safetensors.tmp-2": "not a regular file",
    }
    for name in odd:
        (steps / name).write_text("x") if name.endswith("1") else (steps / name).mkdir()
    (steps / ".step-00000005.rank-0001.safetensors.tmp-1").write_text("x")  # in flight
    findings = sd.open_run(run).integrity.findings
    assert [(f.kind, f.step) for f in findings if f.kind != "unknown_file"] == [
        ("gap", 4),
        ("temporary", 5),
    ]
    stray = {Path(str(f.path)).name: f.message for f in findings if f.kind == "unknown_file"}
    assert stray.keys() == odd.keys()
    assert all(why in stray[name] for name, why in odd.items())
