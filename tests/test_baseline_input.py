"""A hostile baseline file is a malformed baseline (exit 3, one line naming it), never a
crash: JSON nested past the parser's depth, NaN, or a file far larger than any baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "grpo"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("nested", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("nan", json.dumps({"schema": "stabledrl-baseline"})[:-1] + ', "x": NaN}', "NaN"),
        ("huge", " " * (17 * 1024 * 1024) + "{}", "larger than"),
    ],
)
def test_a_hostile_baseline_exits_3_in_one_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    baseline = tmp_path / f"{name}.json"
    baseline.write_text(text)
    result = CliRunner().invoke(app, ["check", str(FIXTURE), "--baseline", str(baseline)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(baseline) in lines[0] and message in lines[0]
