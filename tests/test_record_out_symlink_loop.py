"""`stabledrl record --out` on a symlink loop (or under one): refused as the writes refuse it,
one line with a usage or write error's code, before the command runs. Before: exit 70, an
internal error (`RuntimeError: Symlink loop from ...`, from `Path.resolve` on Python < 3.13)."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app


@pytest.mark.parametrize(
    ("under", "code", "line"),
    [
        ("", 2, "error: --out {out} exists and is not a directory"),
        ("run", 4, "error: {out}: cannot write it (Too many levels of symbolic links)"),
    ],
    ids=["the loop itself", "a run under it"],
)
@pytest.mark.parametrize("command", [True, False], ids=["-- CMD", "built-in example"])
def test_an_out_in_a_symlink_loop_is_one_line(tmp_path, under, code, line, command):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    out = tmp_path / "a" / under if under else tmp_path / "a"
    tail = ["--", sys.executable, "-c", "print('trained')"] if command else ["--rl-steps", "1"]
    result = CliRunner().invoke(app, ["record", "--out", str(out), *tail])
    assert result.exit_code == code, result.output
    assert result.stderr.strip() == line.format(out=out)
    assert "trained" not in result.stdout  # refused before the command runs
