"""Help: the root lists every command from its registry line without importing it; each
command's help renders at 80 columns with flags shown without a type."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import COMMANDS, app


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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help_at_80_columns(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and f"{name} [OPTIONS]" in result.stdout
    assert "<bool>" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_root_options():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"})
    for option in ("--debug", "--version", "--install-completion", "-h"):
        assert option in result.stdout
    assert "<bool>" not in result.stdout


def test_record_groups_the_examples_options_in_their_own_panel():
    result = CliRunner().invoke(app, ["record", "--help"], env={"COLUMNS": "100"})
    assert "Built-in example" in result.stdout and "Example:" not in result.stdout
    assert "(default 400)" in result.stdout  # quoted from ExampleConfig, not restated
