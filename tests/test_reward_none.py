"""Rewards with None among them, as TRL's reward functions return for a completion they do
not score: `log_step(reward=[1.0, None])` raised 'reward: expected a floating dtype, got
object'; a None is recorded as NaN, the recorded field's 'no reward'."""

from __future__ import annotations

import math

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


def _log(path, reward) -> None:
    with sd.Recorder(path) as rec:
        rec.log_step(
            0, logp=np.zeros(3), logp_old=np.zeros(3), advantages=np.ones(3), seq_id=[0, 1, 2],
            reward=reward,
        )  # fmt: skip


def test_a_none_reward_is_recorded_as_nan(tmp_path):
    _log(tmp_path / "run", [1.0, None, 0])
    step = sd.open_run(tmp_path / "run").step(0)
    reward = np.asarray(step["reward"])
    assert reward[0] == 1.0 and math.isnan(reward[1]) and reward[2] == 0.0
    assert step.scalars["reward_mean"] == pytest.approx(0.5)


def test_a_reward_that_is_no_number_is_still_refused(tmp_path):
    with pytest.raises(UsageError, match=r"^reward: expected a floating dtype"):
        _log(tmp_path / "run", [1.0, "good", None])
