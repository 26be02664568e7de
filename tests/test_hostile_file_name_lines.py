"""A file in a run's steps/ whose name ends in a newline (`step-00000001.safetensors\\n`) was
printed by `inspect` with the line break as it is: its row read `step-00000001.safetensors`,
the name of the run's real step 1, with the reason on a line below. Its name and message show
the line break escaped (`\\n`); `--format json` keeps the name as it is."""

from __future__ import annotations

import json
from pathlib import Path

from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def test_a_file_name_with_a_line_break_shows_it_escaped(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "run")
    odd = run / "steps" / "step-00000001.safetensors\n"
    odd.write_text("x")
    result = runner.invoke(app, ["inspect", str(run)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "unknown_file" in line]
    assert len(rows) == 1, result.stdout
    assert "step-00000001.safetensors\\n " in rows[0]
    assert "step-00000001.safetensors\\n: not a step file of this run" in rows[0]
    data = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    findings = json.loads(data.stdout)["integrity"]["findings"]
    assert [f["path"] for f in findings] == [str(odd)]
