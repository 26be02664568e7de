"""`--reward-range` (and verl's $STABLEDRL_REWARD_RANGE, read by the same function) took what
Python's float() takes: `import --reward-range '０,1'` (a full-width zero), `0,1_0` and
`1e-400,1` (a nonzero low read as 0) each wrote a run (exit 0). A number is ASCII notation, as
every other numeric option and spec value is, and one too small for a float is refused (2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run

runner = CliRunner()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5, "reward": 0.25}\n{"step": 2, "loss": 0.4}\n')
    return path


@pytest.mark.parametrize("text", ["\uff10,1", "0,1_0", "1e-400,1", "0,\u0661", "0x0,1"])
def test_a_reward_range_not_in_ascii_notation_is_refused(
    log: Path, tmp_path: Path, text: str
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["import", str(log), "--out", str(out), "--reward-range", text])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --reward-range {text!r}: give LOW,HIGH"), result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("text", "span"), [("0, 1", [0.0, 1.0]), ("-.5,2e3", [-0.5, 2000.0])])
def test_a_reward_range_in_ascii_notation_is_recorded(
    log: Path, tmp_path: Path, text: str, span: list[float]
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["import", str(log), "--out", str(out), "--reward-range", text])
    assert result.exit_code == 0, result.output
    assert open_run(out).manifest["reward_range"] == span
    assert json.loads((out / "manifest.json").read_text())["reward_range"] == span
