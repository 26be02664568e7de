"""Stray files in a run's steps/: the first UNKNOWN_LISTED are a finding each, the rest one
finding that counts them, in `inspect` (table and JSON) and `Run.integrity`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import _listing


def _run_with_junk(tmp_path: Path, count: int) -> Path:
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as rec:
        for step in range(3):
            rec.log_step(step, loss=1.0)
    for i in range(count):
        (run / "steps" / f"junk-{i:03}.txt").write_text("")
    return run


def test_unknown_files_past_the_bound_are_one_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_with_junk(tmp_path, 25)
    monkeypatch.setattr(_listing, "UNKNOWN_LISTED", 10)
    result = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)["integrity"]["findings"]
    unknown = [f for f in findings if f["kind"] == "unknown_file"]
    assert len(unknown) == 11
    assert [f["path"] for f in unknown[:10]] == [
        str(run / "steps" / f"junk-{i:03}.txt") for i in range(10)
    ]
    assert unknown[10]["path"] is None
    assert unknown[10]["message"].startswith("15 more files in steps/")
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "200"})
    assert "Integrity: 11 finding(s)" in table.stdout
    assert "15 more files in steps/" in table.stdout


def test_unknown_files_under_the_bound_are_each_a_finding(tmp_path: Path) -> None:
    run = _run_with_junk(tmp_path, 25)
    findings = sd.open_run(run).integrity.findings
    assert len(findings) == 25 and all(f.path for f in findings)
