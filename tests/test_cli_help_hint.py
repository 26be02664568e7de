"""A command line that does not parse names the help of the command it was for: an option
given without its value pointed at the root's help (`stabledrl -h`), click's parser leaving
that error without its command."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["record", "--out"], "Option '--out' requires an argument."),
        (["record", "-o"], "Option '-o' requires an argument."),
        (["replay", "RUN", "--steps"], "Option '--steps' requires an argument."),
        (["check", "RUN", "-b"], "Option '-b' requires an argument."),
        (["record", "--out", "R", "--bogus"], "No such option: --bogus"),
    ],
)
def test_an_option_without_its_value_names_its_commands_help(args, line) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {line}"), result.stderr
    assert lines[0].endswith(f"(stabledrl {args[0]} -h for help)"), result.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["replay", "RUN", "--format", "xml"], "'xml' is not one of 'table', 'json'."),
        (["record", "--out", "R", "--unit", "word"], "'word' is not one of 'token', 'sequence'."),
        (["check", "RUN", "--engine", "gpu"], "'gpu' is not one of 'local', 'processes', 'ray'."),
    ],
)
def test_a_choice_not_offered_is_named_in_the_tools_words(args, line) -> None:
    """A value outside an option's choices read `Invalid value for '--format' / '-f': Value
    error, 'xml' is not one of ...`: pydantic's name for the error typer raises, which no
    other refusal of the tool says."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    [shown] = result.stderr.splitlines()
    assert "Value error" not in shown, shown
    assert f": {line} (stabledrl {args[0]} -h for help)" in shown, shown
