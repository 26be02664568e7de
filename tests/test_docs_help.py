"""Each command's help reads at the widths a terminal has: the note click closes an option's
help with (`[default: table]`, `[required]`, `[x>=0]`) stays whole on one line."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import COMMANDS, app

NOTE_OPENED = re.compile(r"\[[^\]]*$")


@pytest.mark.parametrize("width", [80, 100, 120])
@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_no_closing_note_of_an_option_is_split_across_lines(name: str, width: int) -> None:
    args = [name, "--help"] if name else ["--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    split = [line for line in result.stdout.splitlines() if NOTE_OPENED.search(line)]
    assert not split, split
