"""A path given to a command that is a symlink loop (`ln -s loop loop`) is named as one: it
was `no such run` / `no such file or directory`, and `watch` waited for a run to land there
(`waiting for loop/manifest.json`) until stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
LOOP = "Too many levels of symbolic links"


@pytest.fixture
def loop(tmp_path: Path) -> Path:
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    return tmp_path / "a"


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{}"],
        ["replay", "{}", "-p", "grpo"],
        ["watch", "{}", "--once"],
        ["inspect", "{}/run"],
    ],
    ids=["inspect", "replay", "watch-once", "under-a-loop"],
)
def test_a_run_path_that_is_a_symlink_loop_is_named_as_one(loop: Path, args: list[str]) -> None:
    given = args[1].format(loop)
    result = runner.invoke(app, [args[0], given, *args[2:]])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: cannot read {given}: {LOOP}\n"


def test_watch_refuses_a_symlink_loop_at_once(loop: Path) -> None:
    """A live watch waits for a path with nothing there yet; a loop never becomes a run."""
    start = time.monotonic()
    result = runner.invoke(app, ["watch", str(loop), "--until-idle", "20", "--interval", "1"])
    assert result.exit_code == 3, result.output
    assert result.stderr.endswith(f"error: cannot read {loop}: {LOOP}\n"), result.stderr
    assert "waiting" not in result.output
    assert time.monotonic() - start < 10


def test_import_of_a_symlink_loop_is_named_as_one(loop: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", str(loop), "--out", str(tmp_path / "out")])
    assert result.exit_code == 3, result.output
    assert result.stderr == f"error: {loop}: cannot read it ({LOOP})\n"


def test_a_missing_path_is_still_no_such_run(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to("nowhere")
    for given in (tmp_path / "nothing", tmp_path / "dangling"):
        result = runner.invoke(app, ["inspect", str(given)])
        assert result.exit_code == 3
        assert result.stderr == f"error: no such run: {given}\n"
