"""`import LOG.jsonl --step-key KEY` with a KEY no row has quoted KEY whole in its error line:
a 100,000-character key (a variable holding a file's text, say) made a line of 100,056
characters. It is quoted as every value of the user's is, cut at 40 characters with its
length said."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def test_a_long_step_key_is_quoted_cut(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n')
    key = "k" * 100_000
    args = ["import", str(log), "--out", str(tmp_path / "run"), "--step-key", key]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {log}: no row of 1 row has the step key {'k' * 40!r}... (100,000 characters)\n"
    )
