"""A replay that cannot run says why in one true line (exit 3): a multi-rank scalar run with a
rank behind has nothing to replay (its steps were read; the steps the lagging rank has not
written are named), an archive whose index fails its checksum is named as such (not as a
skipped step file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _cli import run_cli_together
from _corpus import edit_archive, flip_index

import stabledrl_cli as sd
from stabledrl_cli.replay.engine import NothingToReplay

STEPS = 5


def _multirank_scalar_run(path: Path, *, behind: int = 1) -> Path:
    """Two ranks of per-step scalars (no policy batch); rank 1 `behind` steps behind rank 0,
    as a live run's lagging rank leaves it (its last steps miss rank 1's file)."""
    for rank in (0, 1):
        with sd.Recorder(path, policy=None, rank=rank, world_size=2) as rec:
            for step in range(STEPS - behind * rank):
                rec.log_step(step, grad_norm=1.0, reward_mean=0.5, step_time=0.1)
    return path


def test_a_multirank_scalar_run_with_a_rank_behind_has_nothing_to_replay(tmp_path):
    complete = _multirank_scalar_run(tmp_path / "complete", behind=0)
    lagging = _multirank_scalar_run(tmp_path / "lagging")
    done, lagged = run_cli_together(["replay", complete, "-p", "grpo"], ["replay", lagging])
    assert done.returncode == lagged.returncode == 3, (done.stderr, lagged.stderr)
    assert done.stdout == lagged.stdout == ""
    assert f"{complete}: nothing to replay: a scalar run ({STEPS} steps" in done.stderr
    (line,) = lagged.stderr.strip().splitlines()
    assert f"{lagging}: nothing to replay: no readable step holds a policy batch" in line
    assert f"{STEPS - 1} steps of per-step scalars" in line
    assert "1 step file was skipped: step 4: incomplete, no file for rank(s) [1]" in line
    assert "`stabledrl inspect` shows it and `stabledrl check`" in line
    assert "no step could be read" not in line


@pytest.mark.parametrize("engine", ["local", "processes"])
def test_the_api_refuses_a_multirank_scalar_run_as_nothing_to_replay(tmp_path, engine):
    run = _multirank_scalar_run(tmp_path / "run")
    with pytest.raises(NothingToReplay, match="no readable step holds a policy batch"):
        sd.replay(run, "grpo", engine=engine)


def test_a_scalar_run_with_a_torn_step_has_nothing_to_replay_and_names_it(tmp_path):
    """Its other steps were read: the torn file is named, as it may have held a batch."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as rec:
        for step in range(STEPS):
            rec.log_step(step, grad_norm=1.0, step_time=0.1)
    last = sorted((path / "steps").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:50])
    with pytest.raises(NothingToReplay) as raised:
        sd.replay(path, "grpo")
    assert "no readable step holds a policy batch (4 steps of per-step scalars; 1 step file " in (
        str(raised.value)
    )
    assert "step 4: torn" in str(raised.value)


@pytest.mark.parametrize("command", ["replay", "check"])
def test_an_archive_whose_index_fails_its_checksum_is_named_as_such(tmp_path, command):
    archive = edit_archive(tmp_path, flip_index("steps/step"))
    gate = ["--max-collapsed", "0"] if command == "check" else []
    (done,) = run_cli_together([command, archive, "-p", "grpo", *gate])
    assert done.returncode == 3, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line == (
        f"error: {archive}: no step could be read (archive index steps/step: checksum "
        "mismatch; every step is skipped)"
    )
