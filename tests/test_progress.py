"""Progress on stderr: a bar in a terminal; without one a line per tenth of the work and at
least every 30 s (a bounded rate a CI log can hold); nothing on stdout."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from _corpus import flip_bit, step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli import _output
from stabledrl_cli.cli._output import ProgressLines, progress
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay import engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import resolve_policies
from stabledrl_cli.replay.shards import shard_tasks


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(_output, "progress_enabled", lambda: False)


def test_without_a_terminal_a_line_per_tenth(no_terminal, capsys):
    with progress("replay", 1000) as advance:
        for _ in range(500):
            advance(2)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert len(lines) == 10
    assert lines[0] == "replay: 100/1000 (10%)" and lines[-1] == "replay: 1000/1000 (100%)"


def test_without_a_terminal_a_line_at_least_every_interval(no_terminal, capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 40))  # 40 s between updates
    monkeypatch.setattr(_output.time, "monotonic", lambda: next(clock))
    lines = ProgressLines("check", 1000)
    for done in range(1, 6):
        lines.update(done)  # far below a tenth, but 40 s apart
    assert len(capsys.readouterr().err.splitlines()) == 5


def test_unknown_total_without_a_terminal_is_silent(no_terminal, capsys):
    with progress("pack", None) as advance:
        advance(1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("total", [50, None])
def test_in_a_terminal_a_transient_bar(monkeypatch, capsys, total):
    monkeypatch.setattr(_output, "progress_enabled", lambda: True)
    with progress("replay", total) as advance:
        for _ in range(50):
            advance(1)
    assert capsys.readouterr().out == ""


def test_pack_reports_progress_without_a_terminal(tmp_path: Path) -> None:
    """Under CI (no terminal) `pack` prints a line per tenth of the steps, on stderr."""
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "grpo"
    result = CliRunner().invoke(app, ["pack", str(fixture), str(tmp_path / "grpo.h5")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("packing: ")]
    assert 1 <= len(lines) <= 11 and lines[-1] == "packing: 160/160 (100%)"


def _lagging_run(path: Path, steps: int = 6, rank_1_steps: int = 4) -> Path:
    """A grpo run of 2 ranks whose rank 1 stopped after `rank_1_steps` of `steps`."""
    tiny_run(path, steps=steps, world_size=2)
    for n in range(rank_1_steps, steps):
        (path / "steps" / f"step-{n:08d}.rank-0001.safetensors").unlink()
    return path


def test_the_replay_total_counts_the_steps_every_rank_wrote(tmp_path: Path) -> None:
    """Rank 1 of 2 stopped after 4 of 6 steps: replay showed 'replaying: 4/6' then '6/6'
    beside 'replayed 4'. A step some rank lacks is never replayed: the total is 4."""
    run = _lagging_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo"])
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("replaying:")]
    assert shown == ["replaying: 4/4 (100%)"], result.stderr
    assert "replayed 4" in result.stderr


def test_the_shards_of_a_replay_hold_only_the_steps_every_rank_wrote(tmp_path: Path) -> None:
    """The process and Ray engines advance the bar by each shard's size: shards cut from the
    whole listing took rank 1's missing steps in, 12/11 on a run of 16 steps of which rank 1
    wrote 11."""
    run = open_run(_lagging_run(tmp_path / "run"))
    policies, own = resolve_policies(run, ["grpo"])
    _, sizes = shard_tasks(run, policies, own, ReplayConfig(device="cpu"), 2)
    assert sum(sizes) == 4


@pytest.mark.parametrize("terminal", [False, True])
def test_a_total_the_work_passes_grows_with_it(monkeypatch, capsys, terminal):
    """Work that finds more units than it counted at its start (a run that grew as it was
    read) raised the bar past its total: 'replaying: 7/5 (140%)'. The total grows to it."""
    monkeypatch.setattr(_output, "progress_enabled", lambda: terminal)
    bars: list[_output.Progress] = []

    class Kept(_output.Progress):
        def __enter__(self) -> _output.Progress:
            bars.append(self)
            return super().__enter__()

    monkeypatch.setattr(_output, "Progress", Kept)
    with progress("replaying", 5) as advance:
        for _ in range(7):
            advance(1)
    if terminal:
        (task,) = bars[0].tasks
        assert (task.completed, task.total) == (7, 7)
    else:
        lines = capsys.readouterr().err.splitlines()
        assert lines[-1] == "replaying: 5/5 (100%)" and not any("(1" in line for line in lines[:-1])


def test_a_run_that_grows_as_it_is_replayed_keeps_the_bar_within_its_total(
    tmp_path, monkeypatch
) -> None:
    """Replay counts the run's steps as it starts and reads the run's listing when it reads its
    steps: 2 steps landing between showed 'replaying: 7/5 (140%)'. It reads the steps listed
    when it began (`open_snapshot`), and its JSON counts the 2 that landed since."""
    run = tiny_run(tmp_path / "run", steps=5)
    extra = tiny_run(tmp_path / "extra", steps=7)
    replaying = engine.replay_run

    def steps_land(*args, **kwargs):
        for n in (5, 6):
            name = f"step-{n:08d}.safetensors"
            (run / "steps" / name).write_bytes((extra / "steps" / name).read_bytes())
        return replaying(*args, **kwargs)

    monkeypatch.setattr(engine, "replay_run", steps_land)
    result = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "-f", "json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["steps"] == 5 and data["live"]["landed_steps"] == 2
    shown = [line for line in result.stderr.splitlines() if line.startswith("replaying:")]
    assert shown == ["replaying: 5/5 (100%)"], result.stderr


def test_the_scalar_steps_of_a_mixed_run_advance_the_replay_as_they_pass(tmp_path) -> None:
    """A run with a policy batch every 5th step: the scalar steps between, in no chunk, were
    counted only at the end: of 100 steps, 'replaying: 20/100' then '100/100'."""
    run, ones = tmp_path / "run", np.ones((2, 3), dtype=np.float32)
    batch = {"logp": -ones, "logp_old": -ones, "advantages": ones[:, 0], "mask": ones}
    with sd.Recorder(run, policy="grpo") as recorder:
        for n in range(20):
            recorder.log_step(n, grad_norm=1.0, **({} if n % 5 else batch))
    result = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "--chunk-size", "1"])
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("replaying:")]
    done = [int(line.split()[1].split("/")[0]) for line in shown]
    assert done[-1] == 20 and max(b - a for a, b in pairwise([0, *done])) <= 10, shown


def test_the_damaged_steps_advance_the_replay_as_they_are_passed(tmp_path) -> None:
    """10 steps, 1 to 5 corrupt: the steps skipped were counted only at the end, the bar at
    5/10 until it jumped to 10/10 beside 'skipped 5', 'replayed 5'."""
    run = tiny_run(tmp_path / "run", steps=10)
    for n in range(1, 6):
        flip_bit(step_path(run, n), -5)
    result = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "--chunk-size", "1"])
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("replaying:")]
    assert shown[-2:] == ["replaying: 9/10 (90%)", "replaying: 10/10 (100%)"], shown
    assert "skipped 5 " in result.stderr and "replayed 5" in result.stderr
