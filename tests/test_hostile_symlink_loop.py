"""A path given to a command that is a symlink loop (`ln -s loop loop`) is named as one: it
was `no such run` / `no such file or directory`, and `watch` waited for a run to land there
(`waiting for loop/manifest.json`) until stopped."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from _corpus import tiny_run
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


@pytest.mark.parametrize("command", [["inspect"], ["replay", "-p", "grpo"]])
def test_a_file_url_of_a_symlink_loop_is_exit_3_as_its_path(
    loop: Path, tmp_path: Path, command: list[str]
) -> None:
    """At its file:// URL the same loop was a usage error (exit 2), and a URL under a regular
    file too, where the path says `no such run` (exit 3): the local filesystem's errors are
    the input's, not a host that cannot be reached."""
    (tmp_path / "file").write_text("x")
    for url, said in (
        (loop.as_uri(), f"cannot read {loop.as_uri()}: {LOOP}"),
        (f"{(tmp_path / 'file').as_uri()}/run", f"no such run: {(tmp_path / 'file').as_uri()}/run"),
    ):
        result = runner.invoke(app, [command[0], url, *command[1:]])
        assert result.exit_code == 3, result.output
        assert result.stderr == f"error: {said}\n"


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


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "{run}", "-p", "grpo", "--out", "{out}"],
        ["pack", "{run}", "{out}", "--force"],
        ["check", "{run}", "--max-spikes", "100", "--junit", "{out}"],
    ],
    ids=["replay-out", "pack", "check-junit"],
)
def test_an_output_named_by_a_symlink_loop_is_refused_and_the_link_stays(
    loop: Path, tmp_path: Path, args: list[str]
) -> None:
    """`replay RUN --out loop` (`ln -s b a; ln -s a b`) replaced the link `a` with the report,
    exit 0, and so did pack and check's reports: a link names the file it leads to (the link
    stays, docs/trust.md), and a loop leads to none (a shell's `>` fails too). Exit 4 naming
    it with the system's reason; the link stays."""
    run = tiny_run(tmp_path / "run")
    given = [arg.format(run=run, out=loop) for arg in args]
    result = runner.invoke(app, given)
    assert result.exit_code == 4, result.output
    assert result.stderr.strip().splitlines()[-1] == f"error: {loop}: cannot write it ({LOOP})"
    assert loop.is_symlink() and os.readlink(loop) == "b"
