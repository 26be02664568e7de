"""How `diff` lines up one run's steps with another's where a step of one is not a step of the
other (docs/diff.md), from the runs' step headers (no step's data read):

- `RolloutRewards`: a run's reward_mean draws, one a rollout, at the rollout's first step;
- `WindowMeans`: a run of every step at the rows of a log written every k steps (its means
  over each row's window, as transformers and TRL log them);
- `TrainingSteps`: a verl recording (a step an optimizer step, from 0) at verl's log's
  training steps (from 1), its means over each rollout's optimizer steps.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from stabledrl_cli.dump import Run
from stabledrl_cli.dump._schema import REWARD_COUNT
from stabledrl_cli.replay.observed import import_source, is_verl_recording
from stabledrl_cli.replay.recorded import training_step_means
from stabledrl_cli.replay.rollouts import (
    REWARD_DRAW_SCALARS,
    count_weights,
    rollout_indices,
    run_reward_draws,
    training_step_starts,
)

WINDOW_MEAN_SCALARS = ("loss", "entropy", "kl", "clip_frac", "clip_frac_low", "clip_frac_high")
"""Scalars a log written every k steps holds, at a row, as the mean over the steps since the
row before (transformers' `loss`, TRL's metrics); its `reward_mean` is the mean over the
rollouts generated there (`WindowMeans`). Its `grad_norm` and `lr` are the row's step's own."""
SERIES_READ = (*REWARD_DRAW_SCALARS, *WINDOW_MEAN_SCALARS, "rollout_count", "grad_norm", "lr")
"""The scalars read from each run's headers, in one pass, for its reward draws and, against a
log written every k steps, its means over the log's rows (against verl's log, a verl
recording's means over its training steps, `TrainingSteps`)."""
VERL_LOG_SOURCES = ("actor/loss", "actor/grad_norm")
"""The metrics of verl's log (`stabledrl import`'s `mapped` sources) that mark it verl's and
a row of it an actor update's (`TrainingSteps`)."""
Series = dict[str, tuple[np.ndarray, np.ndarray]]
"""A run's scalar series (`Run.scalar_series_many`): name -> (step numbers, values)."""


@dataclass(frozen=True)
class RolloutRewards:
    """A run's reward_mean draws (`reward_draws`: one a rollout, the mean of its steps'
    rewards or its recorded `rollout_reward`, at its first step), over the steps both runs
    hold, from their headers (no step's data read)."""

    starts: np.ndarray
    draws: np.ndarray

    @classmethod
    def of(cls, series: Series, steps: list[int], *, verl: bool = False) -> RolloutRewards:
        """A run's draws over `steps` (the steps both runs hold), from its `series`
        (`SERIES_READ`); `verl`: the run is a verl recording (`reward_draws`)."""
        held = {}
        for name, (numbers, values) in series.items():
            common = np.isin(numbers, steps)
            held[name] = numbers[common], values[common]
        return cls(*run_reward_draws(held, verl=verl))

    def at(self, step: int) -> float | None:
        """The draw of the rollout that starts at `step`; None at any other step."""
        i = int(np.searchsorted(self.starts, step))
        found = i < self.starts.size and self.starts[i] == step
        return float(self.draws[i]) if found else None

    def inside(self, step: int) -> bool:
        """`step` is a rollout's, not its first: its reward is in the rollout's draw."""
        return bool(self.starts.size) and step > self.starts[0] and self.at(step) is None


def logging_steps(run: Run) -> int:
    """k of an imported log whose manifest says it was written every k steps (its `source`'s
    `logging_steps`, from trainer_state.json); 1 for any other run."""
    k = (import_source(run) or {}).get("logging_steps")
    return k if type(k) is int and k > 1 else 1


@dataclass(frozen=True)
class WindowMeans:
    """What a run of every step gives at the rows of a log written every k steps (the other
    run, `logging_steps`): at a row's step s, each `WINDOW_MEAN_SCALARS`' mean over the run's
    steps since the log's row before (transformers' window: from its last row's step, from
    step 1 at the log's first row, whatever its logging_strategy), over those that record it;
    and
    reward_mean the mean of the rollouts' draws (`reward_draws`, over all of the run's steps)
    that start in the window, NaN ones left out, each weighted by the rollouts it is a mean of
    (its step's `rollout_count`; 1 where none is recorded), as TRL's log averages its
    `reward`, one value a rollout (none where no rollout starts there: TRL logs none). A row
    whose window the run does not hold whole gives nothing: the step's own values are
    compared there."""

    values: dict[int, dict[str, float]]
    """The log's row -> the means over its window (rows whose window the run holds whole)."""
    whole: bool = False
    """The means are every scalar compared there (a verl recording's training step,
    `TrainingSteps`): none of the step's own is."""

    @classmethod
    def of(cls, series: Series, numbers: list[int], rows: list[int]) -> WindowMeans:
        """A run's means over the windows of a log of `rows` (its steps), from its `series`
        (`SERIES_READ`) and its step `numbers`."""
        starts, draws = run_reward_draws(series)
        weights = count_weights(starts, *series["rollout_count"])
        held = set(numbers)
        values: dict[int, dict[str, float]] = {}
        before: int | None = None
        for row in rows:
            low = 1 if before is None else before + 1
            before = row
            if not all(n in held for n in range(low, row + 1)):
                continue
            means = {}
            for name in WINDOW_MEAN_SCALARS:
                steps, found = series[name]
                inside = found[(steps >= low) & (steps <= row)]
                if inside.size:
                    means[name] = float(np.mean(inside))
            window = (starts >= low) & (starts <= row)
            if window.any():
                scored = window & ~np.isnan(draws) & (weights > 0)
                means["reward_mean"] = (
                    float(np.average(draws[scored], weights=weights[scored]))
                    if scored.any()
                    else math.nan
                )
            values[row] = means
        return cls(values)

    def at(self, step: int) -> dict[str, float] | None:
        """The means at the log's row `step`; None where the run does not hold its window."""
        return self.values.get(step)


def _is_verl_log(run: Run) -> bool:
    """verl's log imported (`stabledrl import`): its `loss` or `grad_norm` read from verl's
    `VERL_LOG_SOURCES`."""
    mapped = (import_source(run) or {}).get("mapped")
    return isinstance(mapped, dict) and any(v in VERL_LOG_SOURCES for v in mapped.values())


TRAINING_STEP_SCALARS = ("loss", "grad_norm", "lr", "clip_frac", "kl")
"""The compared scalars verl's log holds at a training step as the mean over its optimizer
steps (`TrainingSteps`)."""


@dataclass(frozen=True)
class TrainingSteps:
    """A verl recording (one step an optimizer step, numbered from 0) as verl's log holds it:
    one step a training step (a rollout: `rollouts.training_step_starts`, each step's from its
    step minus its inner_step), numbered as the log's: the recording's k-th rollout (from
    0, `rollout_indices`: counted in its optimizer steps, so a rollout whose every step file
    is lost or unreadable still takes its number) is the log's step `first` + k, `first` the
    log's first row of an actor update (its `loss` or `grad_norm`: the rows before it are a
    critic's warmup or before a resume). At a
    training step its `TRAINING_STEP_SCALARS` are the means over the rollout's steps (NaN
    when one is, inf when one is inf, as verl's `reduce_metrics`), its reward_mean the mean of
    its steps' rewards that are not NaN (the rollout's draw), its `nonfinite` the non-finite
    of its loss and grad_norm, as an imported step counts them; nothing else of the recording
    is compared there. Against verl's file log, which spells NaN and the infinities alike
    (its import's `nonfinite_null`), an infinite mean is NaN, as the log reads."""

    read: dict[int, int]
    """Training step -> the recording's step read for it (its rollout's first)."""
    window: WindowMeans
    """The scalars compared at each rollout's first step (`whole`)."""
    numbers: dict[int, int]
    """The recording's step -> its training step (where the recording establishes it)."""

    @classmethod
    def of(
        cls, series: Series, numbers: list[int], log: Series, *, nonfinite_null: bool
    ) -> TrainingSteps | None:
        """The recording's training steps, from its `series` (`SERIES_READ`) and step
        `numbers`, lined up with the log's (its `series`; `nonfinite_null`: a log that reads
        an infinity as NaN); None when either has none."""
        inner = series["inner_step"]
        steps = np.asarray(numbers, dtype=np.int64)
        starts = training_step_starts(steps, *inner)
        actor = np.union1d(log["loss"][0], log["grad_norm"][0])
        if not (starts.size and actor.size):
            return None
        means: dict[int, dict[str, float]] = {int(n): {} for n in starts}
        for name in TRAINING_STEP_SCALARS:
            for n, value in zip(*training_step_means(*series[name], *inner), strict=True):
                means[int(n)][name] = float(value)
        reward_steps, rewards = series["reward_mean"]
        weights = count_weights(reward_steps, *series[REWARD_COUNT])
        drawn = ~np.isnan(rewards) & (weights > 0)  # a rollout's draw, as `reward_draws`'
        draws = training_step_means(
            reward_steps[drawn], rewards[drawn], *inner, weights=weights[drawn]
        )
        for n, value in zip(*draws, strict=True):
            means[int(n)]["reward_mean"] = float(value)
        for values in means.values():
            counted = (name for name in ("loss", "grad_norm") if name in values)
            values["nonfinite"] = float(sum(not math.isfinite(values[n]) for n in counted))
            if nonfinite_null:
                values.update({n: math.nan for n, v in values.items() if math.isinf(v)})
        first = int(actor[0])
        trained = {n: first + k for n, k in rollout_indices(*inner).items()}
        read: dict[int, int] = {}
        for n in starts.tolist():  # a rollout's first step, then any unread step of it
            if n in trained:
                read.setdefault(trained[n], n)
        return cls(read, WindowMeans(means, whole=True), trained)

    def number(self, step: int) -> int | None:
        """The training step the recording's `step` belongs to; None where the recording does
        not establish it (before its first rollout, or past a lost stretch of steps)."""
        return self.numbers.get(step)

    def note(self, recording: str, log: str) -> str:
        """What the `notes` say of this alignment (`recording`, `log`: "A", "B")."""
        first, start = next(iter(self.read.items()))
        return (
            f"{recording} is a verl recording (a step an optimizer step, from 0) and {log} "
            f"verl's log (a step a training step): {recording}'s steps are compared a training "
            f"step at a time, numbered as {log}'s ({recording}'s rollout from step {start} as "
            f"{log}'s step {first}, {log}'s first with an actor update, and so on), its "
            f"{', '.join(TRAINING_STEP_SCALARS)} as their means over the rollout's optimizer "
            "steps, as verl logs them, and reward_mean as the rollout's"
        )


def log_windows(
    a: Run,
    b: Run,
    steps_a: list[int],
    steps_b: list[int],
    common: list[int],
    series: tuple[Series, Series],
) -> tuple[tuple[WindowMeans | None, WindowMeans | None], list[str]]:
    """(each run's means over the rows of the other where that one is a log written every k
    steps and it is not, `WindowMeans`; the notes that say so, or that an imported log's
    rows skip steps the other run holds while it does not say how it was written)."""
    k = (logging_steps(a), logging_steps(b))
    windows: list[WindowMeans | None] = [None, None]
    notes = []
    sides = (("A", a, steps_a), ("B", b, steps_b))
    for i, (name, _, steps) in enumerate(sides):
        other, every, rows = sides[1 - i]
        if k[1 - i] > 1 and k[i] == 1:
            windows[i] = WindowMeans.of(series[i], steps, rows)
            notes.append(
                f"{other} is a log written every {k[1 - i]} steps (its logging_steps): a row "
                f"holds means over the steps since the row before, so {name}'s "
                f"{', '.join(WINDOW_MEAN_SCALARS)} and reward_mean are compared as their means "
                "over those steps (grad_norm and lr as they are: the row's step's own)"
            )
            continue
        source = import_source(every)
        silent = source is not None and "logging_steps" not in source  # an import without k
        between = _skipped_between(common, steps)
        if silent and between is not None:
            notes.append(
                f"{other} is an imported log whose rows skip steps {name} holds ({between}) "
                "and that does not say how it was written: a log written every k steps "
                "holds at a row means over the steps since the row before (loss, TRL's "
                f"metrics), compared here with {name}'s step alone (import its "
                "trainer_state.json, which says)"
            )
    return (windows[0], windows[1]), notes


def training_steps(
    a: Run, b: Run, steps: tuple[list[int], list[int]], series: tuple[Series, Series]
) -> tuple[int, TrainingSteps] | None:
    """(0 for A, 1 for B: the run that is a verl recording, its `TrainingSteps`) where the
    other run is verl's log imported; None otherwise."""
    for side, (recording, log) in enumerate(((a, b), (b, a))):
        if is_verl_recording(recording) and _is_verl_log(log):
            null = (import_source(log) or {}).get("nonfinite_null") is True
            training = TrainingSteps.of(
                series[side], steps[side], series[1 - side], nonfinite_null=null
            )
            return None if training is None else (side, training)
    return None


def _skipped_between(rows: list[int], steps: list[int]) -> str | None:
    """The first of `steps` strictly between two consecutive `rows` (both ascending), as text
    ('step 3, between rows 2 and 4'); None when none is."""
    for n in steps:
        after = bisect.bisect_right(rows, n)
        if 0 < after < len(rows) and rows[after - 1] != n:
            return f"step {n}, between rows {rows[after - 1]} and {rows[after]}"
    return None
