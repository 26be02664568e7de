"""What the recorded run itself did: its reward curve, collapse, spikes, non-finite steps and
the estimator's noise floor. `inspect` prints it; replay puts it beside its results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from stabledrl_cli.dump import Run
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay.detectors import (
    collapse_window,
    observed_reward_collapse,
    rolling_mean,
    spike_flags,
)


@dataclass(frozen=True, kw_only=True)
class RewardCurve:
    """Rolling means (over `window` steps) of the recorded `reward_mean`."""

    window: int
    first: float
    """The first full window's mean."""
    best: float
    last: float


@dataclass(frozen=True, kw_only=True)
class Observed:
    first_reward_collapse: int | None
    """design.md's observed-collapse rule on `reward_mean`; None without one (or no rewards)."""
    recorded_spike_steps: list[int] = field(default_factory=list)
    """Steps whose recorded pre-clip grad_norm is a spike (detectors.spike_flags)."""
    nonfinite_steps: list[int] = field(default_factory=list)
    """Steps whose recorded `nonfinite` count is > 0 (NaN or inf in the step's data)."""
    noise_floor_logratio_std: float | None = None
    """std of logp - logp_old over the finite scored tokens of steps with inner_step 0."""
    noise_floor_units: int = 0
    """How many scored units (tokens, or sequences for unit "sequence") it was measured on."""
    reward_curve: RewardCurve | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reward_curve(rewards: np.ndarray, window: int) -> RewardCurve | None:
    if rewards.size == 0:
        return None
    window = min(window, rewards.size)  # a run shorter than W: one window over all of it
    means = rolling_mean(rewards, window)
    full = means[window - 1 :]
    finite = full[np.isfinite(full)]
    return RewardCurve(
        window=window,
        first=float(full[0]),
        best=float(finite.max()) if finite.size else float("nan"),
        last=float(full[-1]),
    )


def _noise_floor(run: Run, steps: list[int]) -> tuple[float | None, int]:
    """Pooled std of log r over steps at theta == theta_old, one step in memory at a time."""
    count, mean, m2 = 0, 0.0, 0.0
    for n in steps:
        try:
            step = run.step(n)
        except InputError:
            continue  # corrupt: reported by the integrity check
        scored = step["mask"].bool()
        logratio = (step["logp"].double() - step["logp_old"].double())[scored]
        logratio = logratio[torch.isfinite(logratio)]  # non-finite ones: in nonfinite_steps
        k = int(logratio.numel())
        if k == 0:
            continue
        batch_mean = float(logratio.mean())
        batch_m2 = float(((logratio - batch_mean) ** 2).sum())
        delta = batch_mean - mean
        total = count + k
        mean += delta * k / total
        m2 += batch_m2 + delta * delta * count * k / total  # Chan et al.'s pairwise update
        count = total
    if count == 0:
        return None, 0
    return float(np.sqrt(m2 / count)), count


def observe(run: Run) -> Observed:
    """The observed behaviour of a recorded run, from its per-step scalars (and, for the noise
    floor, the token arrays of steps recorded with inner_step 0)."""
    series = run.scalar_series_many(["reward_mean", "grad_norm", "nonfinite", "inner_step"])
    reward_steps, rewards = series["reward_mean"]
    norm_steps, grad_norms = series["grad_norm"]
    count_steps, nonfinite = series["nonfinite"]
    inner_steps, inner = series["inner_step"]
    window = collapse_window(rewards.size)
    collapse = observed_reward_collapse(reward_steps, rewards, run.reward_range)
    spikes = norm_steps[spike_flags(grad_norms)]
    bad = count_steps[~(nonfinite == 0)]  # NaN counts as non-finite too
    floor, tokens = _noise_floor(run, [int(s) for s in inner_steps[inner == 0]])
    return Observed(
        first_reward_collapse=collapse,
        recorded_spike_steps=[int(s) for s in spikes],
        nonfinite_steps=[int(s) for s in bad],
        noise_floor_logratio_std=floor,
        noise_floor_units=tokens,
        reward_curve=_reward_curve(rewards, window),
    )
