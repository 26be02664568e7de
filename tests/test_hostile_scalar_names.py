"""`inspect`'s tables cut a scalar name past 1000 characters as they cut a meta key: a step
file may name a scalar with millions of characters (its header may hold 100 MB), and the
tables printed it whole, twice (the scalars row and the recorded series), wrapped or padded
to its width: a name of 30 MB kept `inspect` busy past 60 s. `--format json` has the name
whole."""

from __future__ import annotations

import json
from pathlib import Path

from _corpus import edit_header, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LONG = 300_000


def test_a_long_scalar_name_is_cut_in_the_tables(tmp_path: Path) -> None:
    run = edit_header(
        tiny_run(tmp_path / "run"), 1, lambda h: h["__metadata__"].update({"s" * LONG: "1.5"})
    )
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout) < 20_000, len(result.stdout)
    assert f"({LONG:,} characters;" in result.stdout  # cut at 1000 characters, its length said
    whole = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert "s" * LONG in json.loads(whole.stdout)["scalars"]
