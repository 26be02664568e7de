"""docs/collapse.md: a fall within the first W rewards, which no W-reward level shows (the first
holds the fall), is read from the means of the first rewards; the same fall after W steady
rewards is found by the levels, as before."""

from __future__ import annotations

import numpy as np

from stabledrl_cli.replay.detectors import observed_reward_collapse


def _rewards(steady: int, seed: int = 0) -> np.ndarray:
    """`steady` rewards about 0.62, then 50 - `steady` about 0.09 (noise 0.03)."""
    noise = np.random.default_rng(seed).normal(0.0, 0.03, 50)
    return np.where(np.arange(50) < steady, 0.62, 0.09) + noise


def test_a_fall_within_the_first_window_is_seen():
    """It was not ('none'): `check --fail-on-collapse` passed a run that fell at once."""
    steps = np.arange(50) * 4  # one reward a rollout of mu = 4 steps
    early = observed_reward_collapse(steps, _rewards(1), reward_range=(0.0, 1.0))
    assert early is not None and early < 4 * 10
    after = observed_reward_collapse(steps, _rewards(20), reward_range=(0.0, 1.0))
    assert after is not None and 80 <= after <= 80 + 4 * 10
