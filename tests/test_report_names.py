"""A report's name that cannot be a file: `replay --out rep/` wrote the report as a FILE named
rep (exit 0), as pack once wrote `archives/`; a name longer than the file system takes
exited 3, the code of a bad input. Now exit 2 and exit 4, before any replay, nothing written."""

from __future__ import annotations

import pytest
from _cli import run_cli
from _corpus import tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()

COMMANDS = [
    (["replay", "-p", "grpo", "--out"], "--out"),
    (["replay", "-p", "grpo", "--plot"], "--plot"),
    (["check", "--max-collapsed", "9", "--junit"], "--junit"),
    (["check", "--write-baseline"], "--write-baseline"),
    (["tune", "-p", "dapo:eps_high=0.2|0.3", "--plot"], "--plot"),
]


@pytest.mark.parametrize(("command", "flag"), COMMANDS)
def test_a_report_name_ending_in_a_slash_is_refused(tmp_path, monkeypatch, command, flag):
    run = tiny_run(tmp_path / "run", steps=4)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [command[0], str(run), *command[1:], "reports/"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert f"'{flag}'" in line and "reports/ ends in /: give the report's file name" in line
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize(("command", "flag"), COMMANDS)
def test_a_report_name_too_long_for_the_file_system_is_an_output_error(
    tmp_path, monkeypatch, command, flag
):
    run = tiny_run(tmp_path / "run", steps=4)
    monkeypatch.chdir(tmp_path)
    name = "a" * 300 + ".out"
    result = runner.invoke(app, [command[0], str(run), *command[1:], name])
    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: {name}: cannot write it (File name too long)", line


def test_the_exit_code_in_a_real_process(tmp_path):
    run = tiny_run(tmp_path / "run", steps=4)
    done = run_cli("replay", run, "-p", "grpo", "--out", f"{tmp_path / 'rep'}/")
    assert done.returncode == 2, done.stderr
    assert "rep/ ends in /: give the report's file name" in done.stderr, done.stderr
    assert not (tmp_path / "rep").exists()
