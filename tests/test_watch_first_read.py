"""While a watch reads a run's steps for the first time, its view says so.

`watch live` of a 600-step run showed `waiting for live/manifest.json` on the terminal for the
seconds its first poll read the steps (a longer run: minutes), and Ctrl-C then left that line
with `stopped (0 steps seen)`: the manifest was there all along. The view said the manifest
was awaited before any poll had looked for it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fixture_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.watch.follow import RunWatcher

CPU = ReplayConfig(device="cpu")


def test_the_view_before_a_poll_says_the_run_is_read(tmp_path: Path) -> None:
    run = fixture_run("grpo")
    assert RunWatcher(run, CPU).state().waiting == f"reading {run}"
    later = tmp_path / "later"
    later.mkdir()
    awaited = RunWatcher(later, CPU)
    awaited.poll()
    assert awaited.state().waiting == f"waiting for {later / 'manifest.json'}"


def test_a_path_with_nothing_there_yet_is_awaited_as_itself(tmp_path: Path) -> None:
    """`watch run.h5` before `pack` wrote it said 'waiting for run.h5/manifest.json', a file
    no archive has: what comes there is a run directory or a packed archive."""
    archive = tmp_path / "run.h5"
    awaited = RunWatcher(archive, CPU)
    awaited.poll()
    assert awaited.state().waiting == (
        f"waiting for {archive} to appear (a run directory or a packed archive)"
    )
    pack_run(open_run(fixture_run("grpo")), archive)
    awaited.poll()
    assert awaited.closed and awaited.state().steps == len(open_run(archive).step_numbers)


def test_ctrl_c_while_the_first_poll_reads_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: object, numbers: object) -> list[int]:
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.replay.incremental.OwnReplay.extend", interrupted)
    run = fixture_run("grpo")
    result = CliRunner().invoke(app, ["watch", str(run), "--device", "cpu"])
    assert result.exit_code == 130, result.output
    assert f"reading {run}" in result.stderr.splitlines()
    assert "manifest.json" not in result.stderr
