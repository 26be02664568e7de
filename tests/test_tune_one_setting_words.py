"""`stabledrl tune`'s lines for a sweep of one setting."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

GRPO = Path(__file__).resolve().parents[1] / "fixtures" / "grpo"
runner = CliRunner()


def test_one_setting_is_one_setting():
    """`tune RUN -p grpo:eps_low=0.3` said 'tuning 1 settings over RUN' on stderr and titled its
    table 'tune RUN: 160 steps, 1 settings'."""
    result = runner.invoke(app, ["tune", str(GRPO), "-p", "grpo:eps_low=0.3"])
    assert result.exit_code == 0, result.output
    assert f"tuning 1 setting over {GRPO}" in result.stderr.splitlines()
    assert "160 steps, 1 setting" in result.stdout and "1 settings" not in result.stdout
    two = runner.invoke(app, ["tune", str(GRPO), "-p", "grpo:eps_low=0.1|0.3"])
    assert f"tuning 2 settings over {GRPO}" in two.stderr.splitlines()
