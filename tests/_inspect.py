"""`stabledrl inspect`'s tables as a test reads them."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


def inspect_rows(run: Path) -> dict[str, str]:
    """The run and observed tables' rows at a width that wraps none: what -> value."""
    result = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    cells = [line.strip("│ ").split("│") for line in result.stdout.splitlines()]
    return {row[0].strip(): row[1].strip() for row in cells if len(row) == 2}
