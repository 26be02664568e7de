"""The note on the run's own policy is one line on stderr, as every note is: it was printed
wrapped at the terminal's width (80 columns when stderr is a file), so a CI log's `grep
note:` found its first 80 characters. A manifest naming a policy the catalogue does not
know makes a note of about 330 characters."""

from __future__ import annotations

from pathlib import Path

import pytest
from _corpus import edit_manifest, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    "options", [["replay", "-p", "grpo"], ["check", "--max-nonfinite", "5"], ["watch", "--once"]]
)
def test_the_own_policy_note_is_one_line(tmp_path: Path, options: list[str]) -> None:
    run = edit_manifest(tiny_run(tmp_path / "run"), lambda m: m["policy"].update(spec="nope"))
    result = CliRunner().invoke(app, [options[0], str(run), *options[1:]])
    assert result.exit_code == 0, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if "note:" in line]
    assert note.startswith("note: the run's own policy 'nope' is none"), note
    assert note.endswith("no policy is marked as the run's own"), result.stderr
