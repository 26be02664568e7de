"""A scalar that some ranks of a step logged and others did not: the joined step takes it from
the ranks that logged it. Before, it took rank 0's or nothing: a loss, grad_norm and lr that
only rank 1 logged (a pipeline's last stage holds the loss) were lost, two ranks' losses of
three read as rank 0's alone, and a reward_mean that only rank 1's rewards gave was dropped."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd


def _joined(path: Path, scalars: list[dict[str, float]], rewards: list[bool]) -> dict[str, float]:
    """One step of len(scalars) ranks, rank r's part r + 2 sequences (its rewards 0, 1, ...
    when `rewards[r]`) and its own `scalars[r]`: the joined step's scalars."""
    for rank, (given, rewarded) in enumerate(zip(scalars, rewards, strict=True)):
        count = rank + 2
        reward = {"reward": np.arange(count, dtype=np.float32)} if rewarded else {}
        with sd.Recorder(path, world_size=len(scalars), rank=rank, policy=None) as recorder:
            recorder.log_step(
                0, logp=np.zeros((count, 1), np.float32), logp_old=np.zeros((count, 1), np.float32),
                advantages=np.ones(count, np.float32), **reward, **given,
            )  # fmt: skip
    return sd.open_run(path).step(0).scalars


def test_scalars_only_a_later_rank_logged_are_kept(tmp_path):
    joined = _joined(tmp_path, [{}, {"loss": 2.0, "grad_norm": 3.0, "lr": 0.1}], [True, True])
    assert (joined["loss"], joined["grad_norm"], joined["lr"]) == (2.0, 3.0, 0.1)
    assert list(joined) == sorted(joined)


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([1.0, None, None], 1.0),  # rank 0 logs the reduced loss alone: its value, as before
        ([None, 1.0, 4.0], 2.5),  # the ranks that hold one (each pipeline's last stage)
        ([1.0, 2.0, 6.0], 3.0),  # every rank's own: their mean, as before
    ],
)
def test_the_loss_is_the_mean_of_the_ranks_that_logged_one(tmp_path, losses, expected):
    scalars = [{} if loss is None else {"loss": loss, "grad_norm": 5.0} for loss in losses]
    joined = _joined(tmp_path, scalars, [True] * 3)
    assert joined["loss"] == expected and joined["grad_norm"] == 5.0


def test_reward_mean_is_the_ranks_that_have_one(tmp_path):
    """Only rank 1 recorded rewards (0, 1, 2): their mean; rank 0 with none is left out, as a
    rank whose rewards are all NaN is."""
    assert _joined(tmp_path / "one", [{}, {}], [False, True])["reward_mean"] == 1.0
    three = _joined(tmp_path / "three", [{}, {}, {}], [True, False, True])
    assert math.isclose(three["reward_mean"], (0 + 1 + 0 + 1 + 2 + 3) / 6)
