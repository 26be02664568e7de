"""What a person sees at 80, 120 and 250 columns: `policies` never splits a `key=value` pair
nor a long line past the terminal (a table when it fits whole, one block a policy when not)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.spec import format_value

WIDTHS = (80, 120, 250)
runner = CliRunner()


def _run(args: list[str], width: int) -> str:
    result = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def _pairs(args: list[str]) -> set[str]:
    """Every `key=value` the table shows, from the JSON of the same command."""
    rows = json.loads(_run([*args, "--format", "json"], 250))["policies"]
    return {
        f"{key}=(required)" if key in row["required"] else f"{key}={format_value(value)}"
        for row in rows
        for key, value in row["params"].items()
        if value is not None or key in row["required"]
    }


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize(
    "args", [["policies"], ["policies", "-p", "gspo", "-p", "two-sided:delta=4", "-p", "dapo"]]
)
def test_policies_never_split_a_pair_and_fit_the_width(args, width):
    text = _run(args, width)
    assert max(len(line) for line in text.splitlines()) <= width
    words = set(text.replace("│", " ").split())
    for pair in _pairs(args):
        assert pair in words, f"{pair} is split at {width} columns"


def test_policies_is_a_table_when_wide_and_blocks_when_narrow():
    assert "┃ name" in _run(["policies"], 250)
    narrow = _run(["policies"], 80)
    assert "┃" not in narrow and re.search(r"\n  defaults +eps_low=0\.2 eps_high=0\.2", narrow)
