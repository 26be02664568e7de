"""Every numeric option of every command reads its value as a spec's number (`spec_int`,
`spec_float`), not with Python's int()/float(), which take `1_0`, other scripts' digits and
spaces around; its range and its one-line usage error (exit 2) are kept."""

from __future__ import annotations

import json
import typing

import pytest
from conftest import FIXTURES
from typer.core import TyperOption
from typer.testing import CliRunner

from stabledrl_cli.cli._options import StrictNumber
from stabledrl_cli.cli.app import COMMANDS, app, load_command


def numeric_options() -> list[tuple[str, str, type]]:
    """(command, option, int or float) of every numeric option (or option of numbers), read
    from the commands."""
    found = []
    for name in COMMANDS:
        for param in load_command(name).params:
            if not isinstance(param, TyperOption):
                continue
            kind = param.type_descriptor.annotation
            if typing.get_origin(kind) is list:
                (kind,) = typing.get_args(kind)
            if kind in (int, float):
                found.append((name, param.opts[0], kind))
    return found


NUMERIC = numeric_options()


def test_the_numeric_options_are_found():
    """The discovery is not empty by mistake: it finds options of the shared aliases, of one
    command's own declarations, ranged ones and floats."""
    found = {(name, option) for name, option, _ in NUMERIC}
    expected = {
        ("replay", "--threads"),
        ("tune", "--workers"),
        ("check", "--max-discard-frac"),
        ("watch", "--interval"),
        ("record", "--rl-steps"),
        ("branch", "--at"),
        ("diff", "--atol"),
    }
    assert expected <= found and len(found) > 30


@pytest.mark.parametrize(("name", "option", "kind"), NUMERIC)
def test_each_numeric_option_is_read_by_the_shared_parser(name, option, kind):
    (param,) = [p for p in load_command(name).params if p.opts[:1] == [option]]
    parser = param.type_descriptor.parameter_info.parser
    assert isinstance(parser, StrictNumber) and parser.kind is kind
    assert (parser.low, parser.high) == (param.min, param.max)


@pytest.mark.parametrize("text", ["1_0", "١", " 2 "])
@pytest.mark.parametrize(("name", "option", "kind"), NUMERIC)
def test_each_numeric_option_refuses_what_only_python_reads_as_a_number(name, option, kind, text):
    result = CliRunner().invoke(app, [name, option, text])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    what = "not an integer" if kind is int else "not a number"
    assert line.startswith(f"error: Invalid value for '{option}': {what}: '{text}' (")
    assert line.endswith(f"(stabledrl {name} -h for help)")


@pytest.mark.parametrize(("name", "option"), [(n, o) for n, o, kind in NUMERIC if kind is float])
def test_each_float_option_refuses_a_number_too_small_for_a_float(name, option):
    """`diff --atol 1e-400` compared with a tolerance of 0.0 (float() underflows) and
    `replay --spike-factor 1e-400` was checked as 0.0: the value read is not the one given."""
    result = CliRunner().invoke(app, [name, option, "1e-400"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: Invalid value for '{option}': '1e-400' is too small for a float: it reads as 0"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "--threads", "2.0"], "'--threads': not an integer: '2.0'"),
        (["replay", "--spike-factor", "4,5"], "'--spike-factor': not a number: '4,5'"),
        (["record", "--rl-steps", "0"], "'--rl-steps': Input should be greater than or equal to 1"),
        (
            ["record", "--rl-steps", "100001"],
            "'--rl-steps': Input should be less than or equal to 100000",
        ),
        (["branch", "--at", "-1"], "'--at': Input should be greater than or equal to 0"),
        (["watch", "--interval", "abc"], "'--interval': not a number: 'abc'"),
    ],
)
def test_a_bad_number_or_one_out_of_range_is_one_usage_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: Invalid value for {message}")


def test_numbers_in_ascii_notation_are_read():
    result = CliRunner().invoke(
        app,
        [
            "replay",
            str(FIXTURES / "grpo"),
            "--threads",
            "+2",
            "--spike-factor",
            "1e1",
            "--drift-threshold",
            "-.5",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] == 2


def test_the_help_keeps_the_metavars_and_ranges():
    result = CliRunner().invoke(app, ["record", "-h"], terminal_width=200)
    assert result.exit_code == 0
    assert "--rl-steps INT" in result.stdout and "[1<=x<=100000]" in result.stdout
    assert "--lr FLOAT" in result.stdout and "--checkpoint-every N" in result.stdout
