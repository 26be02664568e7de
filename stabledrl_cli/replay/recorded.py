"""What a run recorded per step, as series: each scalar's whole-run statistics, beside the
run's observed behaviour (`observed.observe`). `inspect` shows them, `check` gates them (the
baseline's `recorded` section); they need no policy batch, so a scalar run (an imported log,
an optimizer-hook recording) has them too.

A series statistic is taken over the finite values of the steps that recorded the scalar:
first, last, min, max, mean, median, tail (the mean of the last `TAIL_STEPS`) (None when there
is none); `nonfinite` counts the others. `reward_mean`'s values are its draws, one a rollout
(`rollouts.reward_draws`, what the observed-collapse rule reads): the framework's logged
reward (TRL's `reward`, verl's `critic/score/mean`), where a rollout is trained over several
recorded steps and the framework's log has one value for it (a TRL step's `rollout_reward`,
its mark of the rollouts begun in it, is in those draws, not a series of its own, nor its
`rollout_count`, nor a step's `reward_count`, the weight of its reward there). A verl
run's scalars that verl logs once a training step (`TRAINING_STEP_MEANS`: loss, grad_norm,
clip_frac, kl, ...) take one value a rollout too, the mean over its optimizer steps, as verl
logs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stabledrl_cli.dump import Run
from stabledrl_cli.dump._schema import DRAW_SCALARS, LOSS_AUX
from stabledrl_cli.dump._views import ReadSteps
from stabledrl_cli.integrations._verl_facts import TRAINING_STEP_MEANS
from stabledrl_cli.replay.observed import Observed, is_verl_recording
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.rollouts import (
    REWARD_DRAW_SCALARS,
    run_reward_draws,
    training_step_starts,
)
from stabledrl_cli.vocab import SeriesStat, Worse

BOOKKEEPING_SCALARS = ("step", "wall_time")
"""Scalars every step has that say nothing about training: not summarized."""
TAIL_STEPS = 10
"""How many of a series' last finite values its `tail` averages (all of them when fewer): where
the run ended, without the noise of its one last step (one batch's reward)."""


@dataclass(frozen=True, kw_only=True)
class SeriesStats:
    """One recorded scalar over the run."""

    steps: int
    """Steps that recorded it."""
    nonfinite: int
    """Of those, steps where it is NaN or inf."""
    first: float | None
    last: float | None
    min: float | None
    max: float | None
    mean: float | None
    median: float | None
    tail: float | None
    """The mean of the last `TAIL_STEPS` finite values."""

    def stat(self, name: SeriesStat) -> float | None:
        """One statistic by name (None: no finite value; `nonfinite` is always a count)."""
        value: float | None = getattr(self, name)
        return value


def policy_loss(scalars: Mapping[str, float]) -> float:
    """A step's recorded loss less its part outside the policy's objective (`LOSS_AUX`: an
    MoE router loss), what the run's own policy replays to; NaN where no loss is recorded."""
    return scalars.get("loss", math.nan) - scalars.get(LOSS_AUX, 0.0)


def series_stats(values: np.ndarray) -> SeriesStats:
    """values: [S] float64, one per step that recorded the scalar, in step order."""
    finite = values[np.isfinite(values)]
    some = finite.size > 0
    return SeriesStats(
        steps=int(values.size),
        nonfinite=int(values.size - finite.size),
        first=float(finite[0]) if some else None,
        last=float(finite[-1]) if some else None,
        min=float(finite.min()) if some else None,
        max=float(finite.max()) if some else None,
        mean=_in_range(np.mean, finite) if some else None,
        median=_in_range(np.median, finite) if some else None,
        tail=_in_range(np.mean, finite[-TAIL_STEPS:]) if some else None,
    )


def _in_range(statistic: Callable[[np.ndarray], Any], finite: np.ndarray) -> float:
    """`statistic` (a mean or median) of finite values; when values near float64's largest
    overflow its sum, the same of the values scaled by the power of two that brings the
    largest below 1 (exactly), scaled back: a sum of those stays in range, and the statistic,
    no larger than the largest value, is finite, as every value is (a sum past the range in
    both signs, inf + -inf, is NaN: scaled too)."""
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(statistic(finite))
    if np.isfinite(value):
        return value
    _, exponent = math.frexp(float(np.abs(finite).max()))
    return math.ldexp(float(statistic(np.ldexp(finite, -exponent))), exponent)


@dataclass(frozen=True, kw_only=True)
class RecordedRun:
    """A run's recorded series and observed behaviour: what `check` gates without replaying."""

    run: str
    policy: str | None
    """The run's policy spec (None: not known)."""
    source: dict[str, object] | None
    """Where the run came from (the manifest's `source`), if recorded."""
    steps: int
    """Readable steps, scalar steps included."""
    scalar_steps: int
    """Steps without a policy batch (format 1.2)."""
    training_steps: int | None = None
    """A verl recording's training steps (rollouts: `rollouts.training_step_starts`), a line
    each in verl's log; None for any other run."""
    observed: Observed
    series: dict[str, SeriesStats]
    """scalar name -> its statistics, for every recorded scalar but `BOOKKEEPING_SCALARS`."""

    def series_dict(self) -> dict[str, dict[str, object]]:
        """The series as JSON-ready dicts (None for no finite value)."""
        return {name: asdict(stats) for name, stats in self.series.items()}


def recorded_run(run: Run, observed: Observed) -> RecordedRun:
    """`run`'s recorded series from its step headers (no array is read; one walk over them),
    with `observed`; reward_mean's are its draws, one a rollout (module docstring)."""
    headers = list(run.step_headers())
    names = sorted(
        set().union(*(h.scalars for h in headers)) - {*BOOKKEEPING_SCALARS, *DRAW_SCALARS}
    )
    series = ReadSteps.of(run, headers).scalar_series_many([*names, *REWARD_DRAW_SCALARS])
    inner = series["inner_step"]
    verl = is_verl_recording(run)
    if "reward_mean" in names:
        series["reward_mean"] = run_reward_draws(series, verl=verl)
    training_steps = None
    if verl:
        for name in set(TRAINING_STEP_MEANS) & set(names):
            series[name] = training_step_means(*series[name], *inner)
        numbers = np.array([h.step for h in headers], dtype=np.int64)
        training_steps = int(training_step_starts(numbers, *inner).size)
    source = run.manifest.get("source")
    return RecordedRun(
        run=run.location,
        policy=run.policy_spec,
        source=dict(source) if isinstance(source, dict) else None,
        steps=len(headers),
        scalar_steps=sum(1 for h in headers if h.is_scalar),
        training_steps=training_steps,
        observed=observed,
        series={name: series_stats(series[name][1]) for name in names},
    )


def training_step_means(
    steps: np.ndarray,
    values: np.ndarray,
    inner_steps: np.ndarray,
    inner_step: np.ndarray,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The value verl's trainer logs for each training step of a verl run (a rollout:
    `rollouts.training_step_starts`, so a rollout whose first step is unread keeps its own),
    at its first step: the plain mean of its optimizer steps' values, as verl's
    `reduce_metrics` (np.mean) takes it: NaN when one is, inf when one is inf. steps, values:
    [S] the series; inner_steps, inner_step: [I] the inner_step series; weights: [S] each
    value's weight (None: alike, verl's mean) -> ([T] first steps, [T] means)."""
    starts = training_step_starts(steps, inner_steps, inner_step)
    held = np.searchsorted(starts, steps, side="right") - 1
    firsts, group = np.unique(starts[held], return_inverse=True)
    totals = np.bincount(group, weights=weights, minlength=firsts.size)  # counts when None
    weighted = values if weights is None else values * weights
    return firsts, np.bincount(group, weights=weighted, minlength=firsts.size) / totals


def observed_of(result: ReplayResult | None, recorded: RecordedRun | None) -> Observed:
    """The run's observed behaviour: the recorded series' own, else the replay's; ValueError
    without either."""
    if recorded is not None:
        return recorded.observed
    if result is not None:
        return result.observed
    raise ValueError("a check needs a replay or the run's recorded series")


@dataclass(frozen=True, kw_only=True)
class SeriesRule:
    """A standard scalar's direction of harm and the statistics a written baseline gates."""

    worse: Worse
    stats: tuple[SeriesStat, ...]
    abs_tol: float
    rel_tol: float
    gates_nonfinite: bool = False
    """A written baseline also gates the count of steps where it is NaN or infinite
    (`NONFINITE_RULE`): a reward_mean of no scored sample."""


NONFINITE: SeriesStat = "nonfinite"
"""The statistic that counts a series' NaN and infinite values (`SeriesStats.nonfinite`)."""
NONFINITE_RULE = SeriesRule(worse="higher", stats=(NONFINITE,), abs_tol=0.0, rel_tol=0.1)
"""The `nonfinite` statistic's direction and slack, whatever its series': a count of steps, as
a policy's `collapsed_steps` is, so more of them is worse."""


# What `check --write-baseline` records for the standard scalars a run has (docs/run-format.md).
# A baseline may gate any recorded scalar by hand, naming its `worse`. Slack: a recorded
# series is one run's noise, so means and medians may move by 10%, a maximum (one step) by 25%;
# fractions also by one percentage point. Where a run ended is its `tail`, not its `last` step:
# one batch's reward varies between healthy runs by more than 10%.
SERIES_RULES: dict[str, SeriesRule] = {
    "reward_mean": SeriesRule(
        worse="lower", stats=("mean", "tail"), abs_tol=0.01, rel_tol=0.1, gates_nonfinite=True
    ),
    "grad_norm": SeriesRule(worse="higher", stats=("median", "max"), abs_tol=0.0, rel_tol=0.25),
    "clip_frac": SeriesRule(worse="higher", stats=("mean", "max"), abs_tol=0.01, rel_tol=0.1),
    "clip_frac_low": SeriesRule(worse="higher", stats=("mean", "max"), abs_tol=0.01, rel_tol=0.1),
    "clip_frac_high": SeriesRule(worse="higher", stats=("mean", "max"), abs_tol=0.01, rel_tol=0.1),
    "entropy": SeriesRule(worse="lower", stats=("mean", "tail"), abs_tol=0.0, rel_tol=0.1),
    "kl": SeriesRule(worse="higher", stats=("mean", "max"), abs_tol=0.0, rel_tol=0.25),
    # Machine-dependent: a direction for a hand-written gate, but never written by default.
    "step_time": SeriesRule(worse="higher", stats=(), abs_tol=0.0, rel_tol=0.25),
}
