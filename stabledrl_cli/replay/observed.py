"""What the recorded run itself did: its reward curve, collapse, spikes, non-finite steps and
the estimator's noise floor (gathered by `measurements`). `inspect` prints it; replay puts it
beside its results."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from stabledrl_cli._repr import compact_repr
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import counted
from stabledrl_cli.replay.config import (
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_WARNING_DROP,
    DEFAULT_WARNING_WINDOW,
    SPIKE_MIN_HISTORY,
    UNSCORED_STREAK_MIN,
    ReplayConfig,
)
from stabledrl_cli.replay.detectors import (
    collapse_warning,
    observed_reward_collapse,
    rolling_mean,
    spike_flags,
    warning_judged,
)
from stabledrl_cli.replay.guards import (
    GuardReport,
    OwnGuard,
    guard_agreement,
    own_guard,
    replay_guards,
)
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood, measurements_of
from stabledrl_cli.replay.rollouts import (
    REWARD_DRAW_SCALARS,
    rollout_indices,
    run_reward_draws,
    training_step_starts,
)

NONFINITE_COUNTS = ("nonfinite", "nonfinite_grads")
"""The recorded counts that make a step non-finite when above 0."""


@dataclass(frozen=True, kw_only=True)
class RewardCurve:
    """Rolling means (over `window` steps) of the recorded `reward_mean`."""

    window: int
    first: float
    """The first full window's mean."""
    best: float
    last: float


GUARD_SCALARS = ("guard_action", "guard_rule_action", "guard_loss")
"""The scalars of the run's own guard a replay of its rule reads (`stabledrl_cli.guard`)."""


WARNING_DETECTOR = "own_likelihood_drop"
"""The collapse warning's detector (`detectors.collapse_warning`)."""


@dataclass(frozen=True, kw_only=True)
class CollapseWarning:
    """The run-level collapse warning (docs/collapse.md): where the policy's likelihood of its
    own fresh samples (the median of `window` measurements) fell by more than `drop` nats
    below its best so far, on two measurements in a row."""

    detector: str = WARNING_DETECTOR
    measure: str = "unit"
    """What a measurement's median is over: "unit" (each scored unit's logp_old), or "token"
    (each sequence's logp_old / token_count: a sequence run that records token counts)."""
    window: int = DEFAULT_WARNING_WINDOW
    drop: float = DEFAULT_WARNING_DROP
    steps: list[int] = field(default_factory=list)
    """Steps whose measurement warns."""
    measurements: int = 0
    """Measurements taken: one a rollout (its step with `inner_step` 0, or every step with a
    policy batch when the run records no inner_step)."""
    finite: int = 0
    """Measurements that are finite (a step that scores no token measures none)."""
    windows: int = 0
    """Windows of `window` finite measurements in a row."""
    first_step: int | None = None
    lead_steps: int | None = None
    """The observed collapse step minus `first_step` (None: either is missing)."""
    judged: int = 0
    """Measurements the warning judges (`detectors.warning_judged`; 0: it judges none)."""

    def __repr__(self) -> str:
        """The fields, a long list of steps as its first items and its length."""
        return compact_repr(self)

    @property
    def measured(self) -> str:
        """What the warning measures, in words."""
        return f"own-sample {'per-token ' if self.measure == 'token' else ''}likelihood"

    @property
    def rule_text(self) -> str:
        """What made a step warn, in words (the tables' note)."""
        return f"{self.measured} fell by > {self.drop:g} nats"

    def to_dict(self) -> dict[str, object]:
        """The replay JSON's `collapse_warning` entry."""
        return {
            "detector": self.detector,
            "settings": {"window": self.window, "drop": self.drop},
            "steps": list(self.steps),
            "first_step": self.first_step,
            "lead_steps": self.lead_steps,
            "measure": self.measure,
        }


def import_source(run: Run) -> dict[str, Any] | None:
    """The manifest's `source` of an imported log (`stabledrl import`); None for any other
    run."""
    source = run.manifest.get("source")
    return source if isinstance(source, dict) and source.get("kind") == "import" else None


def is_verl_recording(run: Run) -> bool:
    """A run the verl integration recorded (its manifest's `meta.framework`), one step an
    optimizer step; not verl's log imported (`import_source`)."""
    meta = run.manifest.get("meta")
    framework = meta.get("framework") if isinstance(meta, dict) else None
    return framework == "verl" and import_source(run) is None


@dataclass(frozen=True, kw_only=True)
class UnscoredStreak:
    """The longest run of policy-batch steps in a row (the first of equal ones) that make no
    policy-gradient update, at least `config.UNSCORED_STREAK_MIN` long: the policy learns
    nothing from its rewards there (docs/collapse.md)."""

    first_step: int
    last_step: int
    steps: int
    no_token_scored: int
    """Its steps that score no token (an all-zero mask)."""
    no_nonzero_advantage: int
    """Its steps that score some, none of them with a nonzero advantage."""
    to_end: bool
    """Whether it runs to the run's last policy-batch step."""

    @property
    def cause(self) -> str:
        """Why its steps make no update, in words: no token scored, no nonzero advantage, or
        how many of each."""
        if not self.no_nonzero_advantage:
            return (
                "no token was scored: every completion was masked (a policy batch with an "
                "all-zero mask)"
            )
        if not self.no_token_scored:
            return (
                "no scored unit had a nonzero advantage: every group's completions were "
                "rewarded alike"
            )
        return (
            f"no step made a policy-gradient update: {self.no_token_scored} scored no token "
            f"(an all-zero mask), {self.no_nonzero_advantage} no unit with a nonzero advantage"
        )

    @property
    def text(self) -> str:
        """The streak in one line: where, how long, and its cause."""
        where = (
            f"from step {self.first_step} on"
            if self.to_end
            else f"steps {self.first_step}-{self.last_step}"
        )
        return (
            f"{where} ({self.steps} steps), {self.cause}; the policy learns nothing from its "
            "rewards there"
        )

    def to_dict(self) -> dict[str, object]:
        """The JSON entry `observed.unscored_streak`."""
        return asdict(self)


def unscored_streak(likelihood: OwnLikelihood) -> UnscoredStreak | None:
    """The longest streak of the steps noted in `likelihood` that make no policy-gradient update
    (`without_advantage`, an all-zero mask among them), when it is at least
    `UNSCORED_STREAK_MIN` steps long; None else."""
    steps = likelihood.batch_steps
    silent = np.isin(steps, likelihood.without_advantage)
    best = (0, 0)  # (length, -start index): max keeps the first of equal lengths
    start = 0
    for index, quiet in enumerate([*silent.tolist(), False]):
        if not quiet:
            best = max(best, (index - start, -start))
            start = index + 1
    length, first = best[0], -best[1]
    if length < UNSCORED_STREAK_MIN:
        return None
    streak = steps[first : first + length]
    unscored = int(np.count_nonzero(np.isin(streak, likelihood.without_scored)))
    return UnscoredStreak(
        first_step=streak[0],
        last_step=streak[-1],
        steps=length,
        no_token_scored=unscored,
        no_nonzero_advantage=length - unscored,
        to_end=first + length == len(steps),
    )


@dataclass(frozen=True, kw_only=True)
class Observed:
    """The recorded run's own behaviour (docs/collapse.md)."""

    first_reward_collapse: int | None
    """The observed-collapse rule on `reward_mean`; None without one (or no rewards)."""
    recorded_spike_steps: list[int] = field(default_factory=list)
    """Steps whose recorded pre-clip grad_norm is a spike (detectors.spike_flags, with the
    replay's spike factor)."""
    grad_norm_values: int = 0
    """Steps whose recorded grad_norm is finite and nonzero: the values the spike rule reads (it
    judges a step only after `config.SPIKE_MIN_HISTORY` of them)."""
    nonfinite_steps: list[int] = field(default_factory=list)
    """Steps whose recorded `nonfinite` or `nonfinite_grads` count is > 0 (NaN or inf in the
    step's data, or in some parameter's gradient)."""
    nonfinite_counted: int = 0
    """Steps that recorded a `nonfinite` or `nonfinite_grads` count (0: `nonfinite_steps` says
    nothing)."""
    nonfinite_training_steps: list[int] | None = None
    """A verl recording's training steps (`rollout_indices`, numbered from 1 as verl's log
    numbers them; in turn where the recording does not establish one) that hold any of
    `nonfinite_steps`: the non-finite steps verl's log shows, and the count a baseline's
    `nonfinite_steps` gates; None for any other run."""
    noise_floor_logratio_std: float | None = None
    """std of logp - logp_old over the finite scored entries of steps with inner_step 0."""
    noise_floor_units: int = 0
    """How many scored units (tokens, or sequences for unit "sequence") it was measured on."""
    reward_curve: RewardCurve | None = None
    reward_values: int = 0
    """Finite recorded reward draws, one a rollout (`rollouts.reward_draws`): the values the
    observed-collapse rule reads."""
    reward_steps: int = 0
    """Steps that recorded a reward_mean: more than the draws where a rollout spans steps, and
    none of them gives one when no step starts a rollout (`no_reward_draws`)."""
    reward_windows: int = 0
    """Windows of `collapse_window` finite recorded rewards in a row, NaN ones left out: the
    levels the observed-collapse rule judges (0: it can find no collapse)."""
    collapse_window: int = DEFAULT_COLLAPSE_WINDOW
    """W of the observed-collapse rule it was found with."""
    reward_draw_steps: int = 1
    """Steps from one reward draw to the next (their median; 1 with fewer than two draws): a
    rollout reused over 4 steps draws every 4th step, so W draws span W times as many."""
    collapse_warning: CollapseWarning = field(default_factory=CollapseWarning)
    unscored_streak: UnscoredStreak | None = None
    """The longest streak of steps without a policy-gradient update (`unscored_streak`), when
    it is long enough to name; None else."""
    guards: list[GuardReport] = field(default_factory=list)
    """What each adaptive grad-norm guard would have done to the recorded steps (guards.py)."""

    def __repr__(self) -> str:
        """The fields, a long list of steps as its first items and its length."""
        return compact_repr(self)

    def to_dict(self) -> dict[str, object]:
        """Every field, JSON-ready (NaN still to be mapped to null)."""
        return asdict(self)

    def counted_nonfinite(self) -> tuple[list[int], str]:
        """(the non-finite steps the run-level count counts, what they are): a verl
        recording's `nonfinite_training_steps`, "training step", as verl's log counts them;
        `nonfinite_steps`, "step", for any other run."""
        if self.nonfinite_training_steps is not None:
            return list(self.nonfinite_training_steps), "training step"
        return list(self.nonfinite_steps), "step"

    def unjudged(self, figure: str) -> str | None:
        """Why the rule of a run-level figure (`figures.RUN_METRICS`) judged no step of this
        run, so that its figure says nothing (a gate on it could never trip); None when it
        judged some."""
        if figure == "first_reward_collapse":
            if self.reward_curve is None:
                return self.no_reward_draws()
            if not self.reward_windows:
                has = (
                    f"{counted(self.reward_values, 'finite value')} (one a rollout), no "
                    f"{self.collapse_window} in a row (the collapse window)"
                    if self.reward_values
                    else "no finite value"
                )
                return f"the run's reward_mean has {has}: the collapse rule judges no step"
        elif figure == "spike_steps" and self.grad_norm_values <= SPIKE_MIN_HISTORY:
            recorded = (
                counted(self.grad_norm_values, "finite, nonzero grad_norm value")
                if self.grad_norm_values
                else "no finite, nonzero grad_norm"
            )
            return (
                f"the run recorded {recorded}; the spike rule judges a step after "
                f"{SPIKE_MIN_HISTORY} such"
            )
        elif figure == "nonfinite_steps" and not self.nonfinite_counted:
            return f"the run recorded no {' or '.join(NONFINITE_COUNTS)} count"
        elif figure == "collapse_warning_first_step" and not self.collapse_warning.judged:
            warning = self.collapse_warning
            if not warning.measurements:
                return (
                    "the run has no own-sample likelihood (a step with a policy batch, one a "
                    "rollout) for the collapse warning to judge"
                )
            finite = (
                f"{warning.finite} of them finite (a step that scores no token measures none), "
                "too few in a row"
                if warning.finite < warning.measurements
                else "too few"
            )
            return (
                f"the run has {counted(warning.measurements, 'own-sample likelihood')} (one a "
                f"rollout: its step with inner_step 0, or every step when none records it), "
                f"{finite} for the collapse warning to judge: it needs the median of "
                f"{warning.window} finite in a row to fall below an earlier one on two "
                f"measurements in a row, beyond the noise of {warning.window} before them "
                f"({2 * warning.window} measurements, none missing)"
            )
        return None

    def no_reward_draws(self) -> str:
        """Why the run gives the observed-collapse rule no reward (`reward_curve` is None): it
        recorded none, or each step that did is a later update of a rollout whose first, the
        one recorded at inner_step 0, the run does not hold (a loop counting from 1, say)."""
        if not self.reward_steps:
            return "the run recorded no reward_mean"
        return (
            f"the run's {counted(self.reward_steps, 'step')} with a reward_mean all record "
            "inner_step above 0, later updates of a rollout that starts at inner_step 0 on no "
            "step of the run (inner_step counts a rollout's updates from 0)"
        )

    def contract_dict(self) -> dict[str, object]:
        """The `observed` entry of the replay JSON contract."""
        return {
            "first_reward_collapse": self.first_reward_collapse,
            "recorded_spike_steps": list(self.recorded_spike_steps),
            "noise_floor_logratio_std": self.noise_floor_logratio_std,
        }


def finite_windows(values: np.ndarray, window: int) -> int:
    """How many windows of `window` finite values in a row `values` [S] holds."""
    return int(np.count_nonzero(np.isfinite(rolling_mean(values, window))))


def reward_windows(rewards: np.ndarray, window: int) -> int:
    """How many windows of `window` finite reward draws [S] in a row the observed-collapse rule
    judges: a NaN draw (nothing scored) is left out, as the rule leaves it out."""
    return finite_windows(rewards[~np.isnan(rewards)], window)


def draw_steps(steps: np.ndarray) -> int:
    """The median number of steps between successive reward draws (`steps` [D], in step
    order); 1 with fewer than two."""
    if steps.size < 2:
        return 1
    return max(1, round(float(np.median(np.diff(steps)))))


def _reward_curve(rewards: np.ndarray, window: int) -> RewardCurve | None:
    scored = rewards[~np.isnan(rewards)]  # the collapse rule's draws, when there are any
    rewards = scored if scored.size else rewards
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


def observe(
    run: Run,
    config: ReplayConfig | None = None,
    *,
    noise_floor: NoiseFloor | None = None,
    likelihood: OwnLikelihood | None = None,
    guard_reports: list[GuardReport] | None = None,
) -> Observed:
    """The observed behaviour of a recorded run, from its per-step scalars.

    config: the settings of the rules applied (None: the defaults): `spike_factor` for the
    recorded grad norms' spikes, `collapse_window` (W of the observed-collapse rule), the
    collapse warning's `warning_window` and `warning_drop`, and the grad-norm `guards`
    replayed over the recorded grad_norm (and loss) series.
    noise_floor, likelihood: the noise floor and the own-sample likelihood already gathered
    over the run's steps (a replay's streaming pass does); None: read from the steps here.
    guard_reports: the guards already replayed over the run's steps (a follower replays
    them step by step); None: replayed here.
    """
    config = config or ReplayConfig()
    own = own_guard(run.manifest.get("meta"))  # the guard the run was recorded under
    series = run.scalar_series_many(
        [*REWARD_DRAW_SCALARS, "grad_norm", "loss", *GUARD_SCALARS, *NONFINITE_COUNTS]
    )
    verl = is_verl_recording(run)
    reward_steps, rewards = run_reward_draws(series, verl=verl)
    norm_steps, grad_norms = series["grad_norm"]
    bad = np.union1d(
        *(
            steps[~(counts == 0)]
            for steps, counts in (series["nonfinite"], series["nonfinite_grads"])
        )
    )  # a NaN count counts as non-finite too
    training = None
    if verl:
        indices = rollout_indices(*series["inner_step"])
        if all(int(n) in indices for n in bad):
            training = sorted({indices[int(n)] + 1 for n in bad})
        else:  # numbered in turn: their count is still the rollouts that hold them
            starts = training_step_starts(bad, *series["inner_step"])
            training = np.unique(np.searchsorted(starts, bad, side="right")).tolist()
    collapse = observed_reward_collapse(
        reward_steps, rewards, run.reward_range, window=config.collapse_window
    )
    if noise_floor is None or likelihood is None:
        noise_floor, likelihood = measurements_of(run)
    # A step without a nonzero advantage makes no policy update, as one of norm 0 makes none:
    # its norm (TRL's KL term alone, with beta > 0) is no history of the spike rule.
    judged_norms = np.where(np.isin(norm_steps, likelihood.without_advantage), 0.0, grad_norms)
    spikes = norm_steps[spike_flags(judged_norms, factor=config.spike_factor)]
    measured_steps, measurements = likelihood.series()
    warn_steps = collapse_warning(
        measured_steps, measurements, window=config.warning_window, drop=config.warning_drop
    )
    first = int(warn_steps[0]) if warn_steps.size else None
    warning = CollapseWarning(
        measure="token" if likelihood.per_token else "unit",
        window=config.warning_window,
        drop=config.warning_drop,
        steps=[int(s) for s in warn_steps],
        measurements=int(measurements.size),
        finite=int(np.count_nonzero(np.isfinite(measurements))),
        windows=finite_windows(measurements, config.warning_window),
        judged=warning_judged(measurements, config.warning_window),
        first_step=first,
        lead_steps=collapse - first if collapse is not None and first is not None else None,
    )
    return Observed(
        first_reward_collapse=collapse,
        recorded_spike_steps=[int(s) for s in spikes],
        grad_norm_values=int(np.count_nonzero(np.isfinite(judged_norms) & (judged_norms != 0))),
        nonfinite_steps=[int(s) for s in bad],
        nonfinite_counted=int(np.union1d(*(series[name][0] for name in NONFINITE_COUNTS)).size),
        nonfinite_training_steps=training,
        noise_floor_logratio_std=noise_floor.std,
        noise_floor_units=noise_floor.count,
        reward_curve=_reward_curve(rewards, config.collapse_window),
        reward_values=int(np.count_nonzero(np.isfinite(rewards))),
        reward_steps=int(series["reward_mean"][0].size),
        reward_windows=reward_windows(rewards, config.collapse_window),
        collapse_window=config.collapse_window,
        reward_draw_steps=draw_steps(reward_steps),
        collapse_warning=warning,
        unscored_streak=unscored_streak(likelihood),
        guards=_with_agreement(
            own,
            norm_steps,
            {**_by_step(series["guard_action"]), **_by_step(series["guard_rule_action"])},
            guard_reports
            if guard_reports is not None
            else replay_guards(
                norm_steps,
                grad_norms,
                _by_step(series["loss"]),
                config.guards,
                None if own is None else own.spec,
                _by_step(series["guard_loss"]),
            ),
        ),
    )


def run_guard_spec(run: Run) -> str | None:
    """The canonical spec of the rule of the guard `run` was recorded under (`own_guard`),
    None without one."""
    own = own_guard(run.manifest.get("meta"))
    return None if own is None else own.spec


def _by_step(series: tuple[np.ndarray, np.ndarray]) -> dict[int, float]:
    """A recorded scalar's (steps, values) as step -> value."""
    return dict(zip(series[0].tolist(), series[1].tolist(), strict=True))


def _with_agreement(
    own: OwnGuard | None,
    norm_steps: np.ndarray,
    recorded: dict[int, float],
    reports: list[GuardReport],
) -> list[GuardReport]:
    """`reports`, the run's `own` guard's rule's with its agreement with the decisions the
    guard recorded (`recorded`: step -> code, `guard_agreement`) over the steps with a grad
    norm (`norm_steps`)."""
    if own is None:
        return reports
    return [
        replace(r, agreement=guard_agreement(own, r, norm_steps.tolist(), recorded)) if r.own else r
        for r in reports
    ]
