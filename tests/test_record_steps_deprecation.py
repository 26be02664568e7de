"""`record --steps`'s deprecation warning names the commands where --steps is a step range."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.cli.record import STEPS_DEPRECATED

runner = CliRunner()


def test_the_commands_the_warning_names_take_steps():
    """The warning said '--steps is a step range in replay and check', and check has no
    --steps (`check --steps 5:9` is 'No such option', exit 2)."""
    named = re.search(r"\(--steps is a step range in ([^)]*)\)", STEPS_DEPRECATED)
    assert named is not None, STEPS_DEPRECATED
    commands = re.split(r", | and ", named.group(1))
    for command in commands:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, command
        assert re.search(r"--steps\b", result.output), command
