"""Help: the root lists every command from its registry line without importing it; each
command's help fits 80 and 120 columns with every option name whole, readable metavars, flags
shown without a type, and usage examples."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import COMMANDS, ROOT_EXAMPLES, app, load_command

WIDTHS = (80, 120)
UNREADABLE = ("<bool>", "<list", "<str>", "<int>", "<float>", "<path>", "{run}", "{")


def _help(args: list[str], width: int) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_root_help_lists_every_command_without_importing_any():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from stabledrl_cli.cli.app import COMMANDS, app\n"
        "result = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '120'})\n"
        "assert result.exit_code == 0, result.output\n"
        "for name, entry in COMMANDS.items():\n"
        "    assert f'{name}  ' in result.stdout and entry.summary in result.stdout, name\n"
        "    assert entry.module not in sys.modules, entry.module\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_fits_with_every_option_name_whole(name, width):
    text = _help([name], width)
    assert text.startswith(f"Usage: stabledrl {name} [OPTIONS]")
    assert max(len(line) for line in text.splitlines()) <= width
    for marker in UNREADABLE:
        assert marker not in text, marker
    assert "…" not in text
    words = set(text.replace(",", " ").split())
    for param in load_command(name).params:
        if getattr(param, "hidden", False):
            continue
        for option in (*param.opts, *getattr(param, "secondary_opts", ())):
            if option.startswith("-"):
                assert option in words, f"{option} is not shown whole"


@pytest.mark.parametrize("name", [n for n, entry in COMMANDS.items() if entry.examples])
def test_each_command_help_ends_with_its_examples(name):
    text = _help([name], 80)
    examples = text.split("\nExamples:\n", 1)[1]
    for example in COMMANDS[name].examples:
        assert f"  {example}\n" in examples  # on one line, never rewrapped


def test_every_command_has_a_usage_example():
    for name, entry in COMMANDS.items():
        has_docstring_examples = "Example" in (load_command(name).help or "")
        assert entry.examples or has_docstring_examples, name


@pytest.mark.parametrize("width", WIDTHS)
def test_root_options_and_examples(width):
    text = _help([], width)
    for option in ("--debug", "--version", "--install-completion", "-h"):
        assert option in text
    assert max(len(line) for line in text.splitlines()) <= width
    assert all(example in text for example in ROOT_EXAMPLES)
    assert "<bool>" not in text


def test_metavars_are_readable():
    text = _help(["replay"], 120)
    for shown in ("RUN", "-p, --policy SPEC", "--device auto|cpu|cuda[:N]|mps", "--plot FILE.png",
                  "--window N", "--spike-factor FLOAT", "-o, --out PATH"):  # fmt: skip
        assert shown in text, shown
    assert "Usage: stabledrl pack [OPTIONS] RUN OUT.h5" in _help(["pack"], 80)


def test_debug_is_accepted_anywhere_on_the_line():
    for args in (["--debug", "policies", "-p", "nope"], ["policies", "-p", "nope", "--debug"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "Traceback" in result.stderr


def test_the_debug_help_says_where_the_flag_is_taken():
    """After a bare `--` the flag is an argument (of `record`'s command): the help said
    '(anywhere on the line)', which the README and docs/exit-codes.md no longer say."""
    result = CliRunner().invoke(app, ["policies", "-p", "nope", "--", "--debug"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "unexpected extra argument(s) (--debug)" in result.stderr
    assert "errors (anywhere on the line before a bare --)" in " ".join(_help([], 80).split())


def test_record_groups_the_examples_options_in_their_own_panel():
    text = _help(["record"], 100)
    assert "\nBuilt-in example:\n" in text and "Example:" not in text
    assert "(default 400)" in text  # quoted from ExampleConfig, not restated


@pytest.mark.parametrize("command", ["check", "watch"])
def test_each_gate_that_trips_unjudged_says_so_in_its_help(command):
    """A gate whose rule judged no step trips (docs/exit-codes.md): --max-collapsed on a policy
    with no more than 5 finite update norms, --max-nonfinite on a run that records no count of
    non-finite steps; the help said they fail only on more steps."""
    text = " ".join(_help([command], 200).split())
    for option in ("--max-collapsed", "--max-nonfinite", "--max-spikes", "--fail-on-collapse"):
        shown = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert "judge" in shown, (option, shown)


REPORTS = {"replay": {"--out", "--plot"}, "check": {"--write-baseline", "--junit", "--plot"},
           "tune": {"--plot"}}  # fmt: skip


@pytest.mark.parametrize("name", list(REPORTS))
def test_each_report_option_says_it_replaces_its_file(name):
    """docs/ci.md says a report replaces its file (a CI job rewrites it on every run); the
    options' help said only 'Write ... to this file'."""
    helps = {
        option: param.help
        for param in load_command(name).params
        for option in param.opts
        if option in REPORTS[name]
    }
    assert set(helps) == REPORTS[name]
    for option, text in helps.items():
        assert "replaced if it exists" in (text or ""), option
