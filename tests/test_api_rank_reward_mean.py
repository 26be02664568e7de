"""A step joined from ranks where one rank's sequences could not be scored (every reward NaN,
so its reward_mean is NaN) has the reward_mean of the scored ones, as the same step recorded
from one process has: it was NaN, poisoning the run's reward series."""

from __future__ import annotations

import math

import numpy as np

import stabledrl_cli as sd


def _log(recorder: sd.Recorder, reward: list[float]) -> None:
    count = len(reward)
    logp = np.zeros((count, 2), dtype=np.float32)
    recorder.log_step(
        0, logp=logp, logp_old=logp, advantages=np.zeros(count, dtype=np.float32),
        group_id=np.arange(count), reward=np.array(reward, dtype=np.float32),
    )  # fmt: skip


def test_a_rank_whose_rewards_are_all_nan_leaves_the_others_mean(tmp_path):
    rewards = [[1.0, 0.0, 1.0], [math.nan, math.nan]]
    with (
        sd.Recorder(tmp_path / "ranks", world_size=2, rank=0, policy=None) as first,
        sd.Recorder(tmp_path / "ranks", world_size=2, rank=1, policy=None) as second,
    ):
        _log(first, rewards[0])
        _log(second, rewards[1])
    with sd.Recorder(tmp_path / "one", policy=None) as alone:
        _log(alone, rewards[0] + rewards[1])
    joined = sd.open_run(tmp_path / "ranks").step(0).scalars["reward_mean"]
    assert joined == sd.open_run(tmp_path / "one").step(0).scalars["reward_mean"]
    assert math.isclose(joined, 2 / 3)
