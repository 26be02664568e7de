"""`import`'s summary counts in words that agree with their numbers."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


def test_one_of_each_is_said_in_the_singular(tmp_path: Path) -> None:
    """A log of one step with one of each: the summary said 'imported 1 steps', 'kept 1 other
    metrics', 'dropped 1 non-numeric values', '1 values replaced', '1 values dropped'."""
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"step": 3, "loss": 1.0, "loss_scale": 2.0, "x": "text"}\n'
        '{"step": 4, "loss": 0.5}\n'
        '{"step": 3, "loss": 0.9}\n'
    )
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("imported 1 step (3..3) of "), lines
    assert "kept 1 other metric as an extra scalar: loss_scale" in lines
    assert "dropped 1 non-numeric value of x" in lines
    assert "1 value dropped: steps after the step a restarted run logged again" in lines
    assert "1 value replaced by a later row of the same step" in lines


def test_a_logged_name_with_a_line_break_stays_on_its_summary_line(tmp_path: Path) -> None:
    """The summary's notes listed the log's own names as they were: a name holding a newline
    (`"eval_\\nimported 9 steps"`) split its line and printed a line of the log's making. The
    notes show line breaks escaped, as the error and warning lines do."""
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"step": 3, "loss": 1.0, "eval_\\nimported 9 steps": 1, "x\\r\\ndone": "text"}\n'
    )
    result = CliRunner().invoke(app, ["import", str(log), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert not any(line.startswith(("imported 9", "done")) for line in lines), lines
    assert "left out 1 (1 eval): eval_\\nimported 9 steps" in lines
    assert "dropped 1 non-numeric value of x\\x0d\\ndone" in lines
