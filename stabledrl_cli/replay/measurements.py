"""The per-step measurements a pass over a run's steps gathers for its observed behaviour: the
estimator's noise floor (the pooled std of log r at inner_step 0) and the own-sample
likelihood the collapse warning reads, one step at a time, with the host arrays they read."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from stabledrl_cli.dump import Run
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay.detectors import own_likelihood, own_likelihood_series
from stabledrl_cli.vocab import Unit

if TYPE_CHECKING:
    import torch


NOISE_FLOOR_INNER_STEP = 0
"""Steps recorded with this `inner_step` scalar are at theta == theta_old: their log r is pure
estimator noise."""


class OwnLikelihood:
    """The collapse warning's per-step measurements, gathered one step at a time, and the
    steps that make no policy-gradient update, which the recorded grad-norm spike rule leaves
    out (`without_advantage`) and the unscored-streak rule reads (`batch_steps`,
    `without_scored`)."""

    def __init__(self) -> None:
        self.batch_steps: list[int] = []
        """Every step with a policy batch noted (`note_advantages`), in step order."""
        self.without_scored: list[int] = []
        """Of those, the steps that score no unit (an all-zero mask: TRL's
        `mask_truncated_completions` masks every completion that ran to its length limit)."""
        self.without_advantage: list[int] = []
        """Steps with a policy batch none of whose scored units has a nonzero advantage: their
        gradient, if any, is another term's (TRL's KL with beta > 0), no policy update."""
        self.steps: list[int] = []
        self.inner_step: list[float] = []
        self.values: list[float] = []
        """Each step's median of logp_old over its units."""
        self.per_token_values: list[float | None] = []
        """Each step's median of logp_old / token_count; None for a step without counts."""

    @staticmethod
    def wanted(inner_step: float | None) -> bool:
        """A step whose inner_step is 0 or not recorded can be a measurement."""
        return inner_step is None or inner_step == NOISE_FLOOR_INNER_STEP

    def add(
        self,
        step: int,
        inner_step: float | None,
        logp_old: np.ndarray,
        mask: np.ndarray,
        token_count: np.ndarray | None = None,
    ) -> None:
        """One step's measurement (`detectors.own_likelihood`; logp_old, mask and the units'
        token_count, when the step records them (`unit_token_counts`): [U])."""
        self.steps.append(step)
        self.inner_step.append(math.nan if inner_step is None else inner_step)
        self.values.append(own_likelihood(logp_old, mask))
        self.per_token_values.append(
            None if token_count is None else own_likelihood(logp_old, mask, token_count)
        )

    def note_advantages(self, step: int, advantages: np.ndarray, mask: np.ndarray) -> None:
        """Notes step `step` in `batch_steps`, in `without_advantage` when none of its scored
        units (mask [U] nonzero) has a nonzero advantage (advantages [U]; NaN counts as
        nonzero), and in `without_scored` too when it scores none."""
        self.batch_steps.append(step)
        scored = mask.reshape(-1) != 0
        if not np.any(scored & (advantages.reshape(-1) != 0)):
            self.without_advantage.append(step)
            if not np.any(scored):
                self.without_scored.append(step)

    def extend(self, later: OwnLikelihood) -> None:
        """Appends the measurements gathered over the steps after this one's."""
        self.batch_steps.extend(later.batch_steps)
        self.without_scored.extend(later.without_scored)
        self.without_advantage.extend(later.without_advantage)
        self.steps.extend(later.steps)
        self.inner_step.extend(later.inner_step)
        self.values.extend(later.values)
        self.per_token_values.extend(later.per_token_values)

    @property
    def per_token(self) -> bool:
        """Whether the warning measures per token: every measured step records its sequences'
        token counts. A run where some step does not is measured per unit, as one without
        any (a series mixing sums and per-token means would drop where they change)."""
        return bool(self.steps) and None not in self.per_token_values

    def series(self) -> tuple[np.ndarray, np.ndarray]:
        """The measurements ([M] steps, [M] values): `detectors.own_likelihood_series`, per
        token when `per_token`."""
        values = self.per_token_values if self.per_token else self.values
        return own_likelihood_series(
            np.array(self.steps, dtype=np.int64),
            np.array(self.inner_step, dtype=np.float64),
            np.array(values, dtype=np.float64),
        )


def unit_token_counts(
    unit: Unit, seq_id: np.ndarray, token_count: np.ndarray | None
) -> np.ndarray | None:
    """[U] each unit's recorded token count in a sequence run (`token_count[seq_id]`); None
    for a token run or a step without counts. A `seq_id` past the counts (a step a replay
    rejects) gives every unit 0: none is measured per token."""
    if unit != "sequence" or token_count is None:
        return None
    ids, counts = seq_id.reshape(-1), token_count.reshape(-1)
    if ids.size and (np.minimum.reduce(ids) < 0 or np.maximum.reduce(ids) >= counts.size):
        return np.zeros(ids.size, dtype=counts.dtype)
    gathered: np.ndarray = counts[ids]
    return gathered


def host_array(values: torch.Tensor) -> np.ndarray:
    """[U] numpy array of a tensor: a view of a CPU tensor whose dtype numpy has, else a
    float32 copy on the host (exact for the half-precision types)."""
    flat = values.detach().reshape(-1).cpu()
    try:
        return flat.numpy()
    except TypeError:  # bfloat16 and kin, which numpy lacks
        return flat.float().numpy()


class NoiseFloor:
    """The pooled std of log r over steps, gathered one step at a time: each step's moments
    are kept (three numbers) and pooled in step order (Chan et al.'s pairwise update), so no
    step's arrays are kept and floors gathered over consecutive parts of a run join exactly."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, float, float]] = []
        """Per step: (values, their mean, sum of squared deviations), in step order."""

    def add(self, count: int, mean: float, m2: float) -> None:
        """One step's moments: its number of values, their mean and sum of squared
        deviations."""
        if count:
            self.parts.append((count, mean, m2))

    def extend(self, later: NoiseFloor) -> None:
        """Appends the steps of a floor gathered over the steps after this one's."""
        self.parts.extend(later.parts)

    @property
    def count(self) -> int:
        """Values pooled."""
        return sum(part[0] for part in self.parts)

    @property
    def std(self) -> float | None:
        """The pooled standard deviation; None before any value."""
        total, pooled_mean, pooled_m2 = 0, 0.0, 0.0
        for count, mean, m2 in self.parts:
            delta = mean - pooled_mean
            pooled_total = total + count
            pooled_mean += delta * count / pooled_total
            pooled_m2 += m2 + delta * delta * total * count / pooled_total
            total = pooled_total
        return math.sqrt(pooled_m2 / total) if total else None


def logratio_moments(
    logp: np.ndarray, logp_old: np.ndarray, mask: np.ndarray
) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the finite log r = logp - logp_old over the
    scored entries (mask [U] nonzero; logp, logp_old [U]), in float64 on the host: the same
    figure whatever device a replay computes on. Non-finite entries are left out: they are
    the run's `nonfinite_steps`."""
    with np.errstate(invalid="ignore"):  # -inf - -inf is NaN, left out below
        logratio = logp.reshape(-1).astype(np.float64) - logp_old.reshape(-1).astype(np.float64)
    kept = logratio[(mask.reshape(-1) != 0) & np.isfinite(logratio)]
    if kept.size == 0:
        return 0, 0.0, 0.0
    mean = float(kept.mean())
    deviations = kept - mean
    return int(kept.size), mean, float(np.dot(deviations, deviations))


def measurements_of(run: Run) -> tuple[NoiseFloor, OwnLikelihood]:
    """The noise floor and the own-sample likelihood read from the run's steps with inner_step
    0 (every step for the likelihood when none records inner_step), one step at a time, and
    the steps without a nonzero advantage, read from every step; scalar steps (no policy
    batch) have none of them."""
    floor, likelihood = NoiseFloor(), OwnLikelihood()
    for header in run.step_headers():
        if header.is_scalar:
            continue
        try:
            step = run.step(header.step)
        except InputError:
            continue  # corrupt: reported by the integrity check
        mask = step.array("mask")
        likelihood.note_advantages(step.step, step.array("advantages"), mask)
        inner = header.scalars.get("inner_step")
        if not OwnLikelihood.wanted(inner):
            continue
        counts = step.array("token_count") if "token_count" in step.fields else None
        token_count = unit_token_counts(run.unit, step.array("seq_id"), counts)
        likelihood.add(step.step, inner, step.array("logp_old"), mask, token_count)
        if inner == NOISE_FLOOR_INNER_STEP:
            floor.add(*logratio_moments(step.array("logp"), step.array("logp_old"), mask))
    return floor, likelihood
