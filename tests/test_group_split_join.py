"""A prompt group whose members the ranks share (group ids "global") is whole in the joined
step once all the members the trainer generated for it (the manifest's meta.num_generations)
are there: the join clears its group_split, so adv= recomputes it; a group short of members
in the join (cut across optimizer steps) stays marked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

GENERATIONS = 4
STEPS = 2
REWARD = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 3.0], [2.0, 1.0, 1.0, 0.0]])
"""The reward of each group's members, by group (the same in every step)."""


def _rows(group: int) -> dict[str, np.ndarray]:
    """The step's rows of `group`: one completion of 3 tokens each."""
    member = np.arange(GENERATIONS)[:, None]
    logp = np.full((GENERATIONS, 3), -1.0) + 0.1 * member
    return {
        "logp": logp,
        "logp_old": logp - 0.05 * member,
        "advantages": np.zeros((GENERATIONS, 3)),
        "mask": np.ones((GENERATIONS, 3)),
        "group_id": np.full(GENERATIONS, group),
        "reward": REWARD[group],
    }


def _log(recorder: sd.Recorder, step: int, rows: list[dict[str, np.ndarray]]) -> None:
    """Logs the rows (each: one group's, or the part of it the rank holds) as one step, each
    sequence marked split where its group has fewer than GENERATIONS members here (as TRL's)."""
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    _, inverse, counts = np.unique(batch["group_id"], return_inverse=True, return_counts=True)
    recorder.log_step(step, **batch, group_split=counts[inverse] < GENERATIONS, loss=0.0)


def _record(path: Path, world_size: int, parts: dict[int, list[dict[str, np.ndarray]]]) -> None:
    for rank in range(world_size):
        recorder = sd.Recorder(
            path,
            policy="grpo",
            meta={"num_generations": GENERATIONS},
            world_size=world_size,
            rank=rank,
            group_ids="global",
        )
        for step in range(1, STEPS + 1):
            _log(recorder, step, parts[rank])
        recorder.close()


def _half(group: int, which: int) -> dict[str, np.ndarray]:
    return {k: v[which * 2 : which * 2 + 2] for k, v in _rows(group).items()}


def _centered(path: Path) -> list[float]:
    """Replay's objective and net push of each step with the advantages recomputed."""
    series = sd.replay(path, policies=["grpo:adv=center"], device="cpu").policies[0].series
    return [float(v) for column in ("objective", "net_push") for v in series[column]]


def test_a_group_the_ranks_share_recomputes_as_one_ranks_recording(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _record(one, 1, {0: [_rows(0), _rows(1)]})
    _record(two, 2, {0: [_half(0, 0), _half(1, 0)], 1: [_half(0, 1), _half(1, 1)]})
    joined = sd.open_run(two)
    assert all(not step["group_split"].any() for step in joined)
    losses = _centered(two)
    assert losses == pytest.approx(_centered(one)) and all(map(math.isfinite, losses))
    assert all(losses)  # the members' ratios differ: the centered advantages weigh them


def test_a_group_short_of_its_members_in_the_join_stays_split(tmp_path: Path) -> None:
    two = tmp_path / "two"
    _record(two, 2, {0: [_half(0, 0), _rows(1)], 1: [_half(0, 1), _half(2, 0)]})
    for step in sd.open_run(two):
        assert step["group_split"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(UsageError, match="2 sequences of this step"):
        _centered(two)
