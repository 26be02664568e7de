"""watch, diff and the follower they replay with (`incremental.OwnReplay`) refuse a run as
replay does, in replay's words: an archive whose index fails its checksum is named as the
reason no step could be read (not a skipped step); a scalar run with a step file skipped has
nothing to replay and names the skipped file."""

from __future__ import annotations

from pathlib import Path

import pytest
from _corpus import edit_archive, flip_index, packed
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import NothingToReplay
from stabledrl_cli.replay.incremental import OwnReplay


def _index_failure(tmp_path: Path, name: str = "steps/step") -> Path:
    """An archive of a 3-step run with one bit of index `name` flipped (its CRC as packed)."""
    folder = tmp_path / name.replace("/", "_")
    folder.mkdir(parents=True, exist_ok=True)
    return edit_archive(folder, flip_index(name))


def _refusal(archive: Path, name: str = "steps/step") -> str:
    return (
        f"error: {archive}: no step could be read (archive index {name}: checksum mismatch; "
        "every step is skipped)"
    )


@pytest.mark.parametrize("index", ["steps/step", "scalars/grad_norm"])
def test_watch_names_an_archive_index_that_fails_its_checksum(tmp_path, index):
    """It said "warning: skipped 1 unreadable step of RUN.h5 (archive index ...)" then
    "error: RUN.h5: the run has no readable step yet": no step file was skipped, and none
    will be readable later."""
    archive = _index_failure(tmp_path, index)
    once = CliRunner().invoke(app, ["watch", str(archive), "--once", "--device", "cpu"])
    follow = ["--until-idle", "0", "--interval", "0.1", "--device", "cpu"]
    followed = CliRunner().invoke(app, ["watch", str(archive), *follow])
    assert once.exit_code == followed.exit_code == 3, (once.stderr, followed.stderr)
    assert once.stderr.strip().splitlines() == [_refusal(archive, index)]
    followed_lines = followed.stderr.strip().splitlines()
    assert followed_lines[-1] == _refusal(archive, index)
    assert not any(line.startswith("warning") for line in followed_lines)


def _scalar_run_with_a_step_skipped(path: Path, skipped: str) -> Path:
    """Per-step scalars only (no policy batch) over 5 steps, the last skipped by the reader:
    rank 1 of 2 one step behind ("incomplete"), or its one file torn."""
    ranks = 2 if skipped == "rank behind" else 1
    for rank in range(ranks):
        with sd.Recorder(path, policy=None, rank=rank, world_size=ranks) as rec:
            for step in range(5 - rank):
                rec.log_step(step, grad_norm=1.0, reward_mean=0.5, step_time=0.1)
    if skipped == "torn":
        last = sorted((path / "steps").iterdir())[-1]
        last.write_bytes(last.read_bytes()[:50])
    return path


@pytest.mark.parametrize("skipped", ["rank behind", "torn"])
def test_the_follower_refuses_a_scalar_run_with_a_step_skipped_as_replay_does(tmp_path, skipped):
    """Its result() said "nothing to replay: a scalar run (4 steps of per-step scalars, no
    policy batch)", as if no step file had been skipped."""
    run = sd.open_run(_scalar_run_with_a_step_skipped(tmp_path / "run", skipped))
    follower = OwnReplay(run, ReplayConfig(device="cpu"))
    follower.extend(run.step_numbers)
    with pytest.raises(NothingToReplay) as followed:
        follower.result()
    with pytest.raises(NothingToReplay) as replayed:
        sd.replay(run, "grpo", device="cpu")
    assert str(followed.value) == str(replayed.value)
    assert "no readable step holds a policy batch (4 steps of per-step scalars; 1 step was " in (
        str(followed.value)
    )


@pytest.mark.parametrize("damaged", ["both", "A", "B"])
def test_diff_names_an_archive_index_that_fails_its_checksum(tmp_path, damaged):
    """It said "error: A.h5 and B.h5 share no step: nothing to compare", as if the runs were
    of other steps."""
    broken = _index_failure(tmp_path / "broken")
    intact = packed(tmp_path)
    other = _index_failure(tmp_path / "other") if damaged == "both" else intact
    a, b = (intact, broken) if damaged == "B" else (broken, other)
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu"])
    assert done.exit_code == 3, done.stderr
    assert done.stderr.strip().splitlines() == [_refusal(broken)]
