"""Where two runs part: `diff_runs` aligns two runs by step number and finds the first step at
which they differ, per kind of difference (docs/diff.md).

The runs are compared step by step, one field of one step of each run in memory at a time, in
ascending order of the steps both hold, until every kind has parted (or the steps run out;
the names below are `diff.steps`'s):

- `arrays`: every array of the step and its `SCALAR_NAMES`, bit for bit (a field only one of the two
  has differs);
- `inputs`: what training fed the loss (`INPUT_FIELDS`), exactly;
- `logprobs`: the log-probabilities (`LOGP_FIELDS`), within a tolerance;
- `scalars`: the step's training scalars (`SCALAR_NAMES`), within the same tolerance but the
  counts (`COUNT_SCALARS`), exactly.

`reward_mean` is compared at a rollout's first step as the observed-collapse rule reads it
(`rollouts.reward_draws`, over the steps both runs hold): the mean of its steps' rewards, or
the step's `rollout_reward` where it records one (a TRL recording: the rollouts TRL generated
during the step), TRL's logged `reward` (a recording of a rollout trained over several steps
holds each step's own, the framework's log one a rollout); at its other steps, as recorded
where both runs record it (a reward there only one run records is not listed as unshared: it
is in the draw). `rollout_reward` is compared so, as reward_mean's draw, not on its own.
Against an imported log written every k steps (its manifest's `source.logging_steps`), whose
rows hold means over the steps since the row before, a run of every step is compared by its
means over those steps (`WindowMeans`); the result's `notes` say so. A verl recording (a
step an optimizer step) against verl's imported log (a step a training step) is compared a
training step at a time, numbered as the log's (`TrainingSteps`): the result's steps, ranges
and parting are then training steps, as its `notes` say. How the steps line up is
`alignment`'s.

Two values agree within the tolerance as `diff.values` says. The runs *part* at the first
step where inputs, log-probabilities or scalars differ; steps only one run holds are listed,
not counted as parting; where either step is of scalars only (an imported log, the optimizer
hooks' steps) only the scalars (and arrays) both record there are compared, and those only one
records are listed (`diff.steps`). Around the parting step the figures of each run are set
side by side: reward and grad norm as recorded, the rollout's reward as compared, discard
fraction and risk of the run's own policy replayed (`diff.figures`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

from stabledrl_cli.dump import Run, RunIntegrityWarning, Step
from stabledrl_cli.dump._integrity import SKIPPED_KINDS
from stabledrl_cli.errors import ConfigError, InputError, counted
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.diff.alignment import (
    SERIES_READ,
    RolloutRewards,
    WindowMeans,
    log_windows,
    training_steps,
)
from stabledrl_cli.replay.diff.figures import FIGURES, run_figures
from stabledrl_cli.replay.diff.result import DiffResult, SideBySide
from stabledrl_cli.replay.diff.steps import DERIVED_SCALARS, Comparison
from stabledrl_cli.replay.observed import is_verl_recording
from stabledrl_cli.replay.run_facts import (
    in_flight_steps,
    is_scalar_run,
    own_spec,
    replayed_loss_norm,
    run_gaps,
    shown_reasons,
    whole_run_refusal,
)

DEFAULT_ATOL = 1e-6
"""Absolute tolerance of log-probabilities and scalars."""
DEFAULT_RTOL = 1e-5
"""Relative tolerance of log-probabilities and scalars (float32 sums reordered, e.g. by another
thread count, move the example's values by about 1e-7 relative)."""
DEFAULT_CONTEXT = 3
"""Steps shown before and after the parting step."""


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Ascending numbers as inclusive ranges of consecutive ones: [1,2,3,7] -> [(1,3), (7,7)]."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _pairs(
    a: Run,
    b: Run,
    common: list[int],
    unread: tuple[set[int], set[int]],
    reads: tuple[dict[int, int], dict[int, int]],
) -> Iterator[tuple[int, Step, Step]]:
    """Each common step (a compared number) read from both runs, each at its step `reads`
    gives for the number (the number itself where it gives none). A step a run cannot read
    (its data corrupt) is skipped with a warning and its number added to that run's set in
    `unread` (A's, B's)."""
    for n in common:
        read = []
        for run, skipped, at in zip((a, b), unread, reads, strict=True):
            step = at.get(n, n)
            try:
                read.append(run.step(step))
            except InputError as exc:
                warnings.warn(f"skipping step {step}: {exc}", RunIntegrityWarning, stacklevel=2)
                skipped.add(n)
        if len(read) == 2:
            yield n, read[0], read[1]


def _warn_skipped(run: Run, listed: list[int]) -> set[int]:
    """One warning naming the step files the run's reader skips at its header check (torn,
    unreadable) and the steps a rank wrote no file of (incomplete; not one still in flight,
    `in_flight_steps`): they are not among its steps, so not compared. -> their steps."""
    known = set(listed)
    findings = run.header_findings()
    known.update(in_flight_steps(run))
    skipped = [
        f
        for f in findings
        if f.kind in SKIPPED_KINDS and f.step is not None and f.step not in known
    ]
    reasons = [f.message for f in skipped]
    if reasons:
        incomplete = sum(f.kind == "missing_rank" for f in skipped)  # no file to read
        counts = (
            (incomplete, "incomplete step"),
            (len(reasons) - incomplete, "unreadable step file"),
        )
        what = " and ".join(counted(n, noun) for n, noun in counts if n)
        message = f"{run.location}: skipped {what} ({shown_reasons(reasons)})"
        warnings.warn(message, RunIntegrityWarning, stacklevel=3)
    return {f.step for f in skipped if f.step is not None}


def _sides(side: int, mine: Any, other: Any) -> tuple[Any, Any]:
    """(A's, B's): `mine` is run `side`'s (0 A, 1 B), `other` the other's."""
    return (mine, other) if side == 0 else (other, mine)


def _loss_norm_note(a: Run, b: Run) -> list[str]:
    """A note when the runs' ranks normalised their losses apart (a run of one rank's is
    either): equal arrays are then other losses to a replay."""
    norms = [replayed_loss_norm(run) for run in (a, b)]
    if norms[0] == norms[1]:
        return []
    return [f"A says loss_norm {norms[0]}, B {norms[1]}: equal arrays replay as other losses"]


def diff_runs(
    a: Run,
    b: Run,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    context: int = DEFAULT_CONTEXT,
    config: ReplayConfig | None = None,
) -> DiffResult:
    """Where runs `a` and `b` part (module docstring). ConfigError (a usage error naming the
    setting) for a negative or non-finite tolerance or a negative context, UsageError for a
    device torch does not see (before any comparison, whether or not they part); InputError when
    they share no step, record different units (the same arrays would mean other things), or
    when a finding of the whole run leaves one with no readable step (`whole_run_refusal`)."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(name, f"must be a finite number >= 0, got {value}")
    if context < 0:
        raise ConfigError("context", f"must be >= 0, got {context}")
    config = config or ReplayConfig()
    if str(config.device) not in ("auto", "cpu"):  # refused now, not only if the runs part
        from stabledrl_cli._device import resolve_device  # torch: only for a device named

        resolve_device(config.device)
    if a.unit != b.unit and not (is_scalar_run(a) or is_scalar_run(b)):  # a scalar run: no unit
        raise InputError(
            f"{a.location} records {a.unit} entries, {b.location} {b.unit} entries: their steps "
            "are not comparable"
        )
    for run in (a, b):
        refusal = whole_run_refusal(run)
        if refusal is not None:
            raise InputError(refusal)
    steps_a, steps_b = a.step_numbers, b.step_numbers
    skipped = (_warn_skipped(a, steps_a), _warn_skipped(b, steps_b))
    series = (a.scalar_series_many(SERIES_READ), b.scalar_series_many(SERIES_READ))
    training = training_steps(a, b, (steps_a, steps_b), series)
    reads: tuple[dict[int, int], dict[int, int]] = ({}, {})
    notes = []
    if training is not None:  # a verl recording against verl's log: by training step
        side, steps = training
        if not steps.read:
            raise InputError(
                f"{(a, b)[side].location}: its first rollout's step files are all lost and no "
                "rollout tells their length: which training step each rollout is is not known, "
                "nothing to compare with verl's log"
            )
        reads = _sides(side, steps.read, {})
        # a training step one of whose step files cannot be read, or that lacks one (its
        # means would be over part of its rollout): unreadable, not compared
        gone = [
            n for gap in run_gaps((a, b)[side]) for n in range(gap.first, gap.last + 1, gap.stride)
        ]
        lacking = {steps.number(n) for n in gone}.intersection(steps.read)
        lost = ({steps.number(n) for n in skipped[side]} | lacking) - {None}
        held = [n for n in steps.read if n not in lost]
        skipped = _sides(side, lost, skipped[1 - side])
        steps_a, steps_b = _sides(side, held, (steps_a, steps_b)[1 - side])
        notes.append(steps.note(*_sides(side, "A", "B")))
    in_b = set(steps_b)
    common = [n for n in steps_a if n in in_b]
    share_none = InputError(f"{a.location} and {b.location} share no step: nothing to compare")
    if not common:
        raise share_none
    verl = (is_verl_recording(a), is_verl_recording(b))
    rewards = (
        RolloutRewards.of(series[0], [reads[0].get(n, n) for n in common], verl=verl[0]),
        RolloutRewards.of(series[1], [reads[1].get(n, n) for n in common], verl=verl[1]),
    )
    windows: tuple[WindowMeans | None, WindowMeans | None]
    if training is not None:
        windows = _sides(training[0], training[1].window, None)
    else:
        windows, notes = log_windows(a, b, steps_a, steps_b, common, series)
    notes += _loss_norm_note(a, b)
    comparison = Comparison(atol=atol, rtol=rtol, rewards=rewards, windows=windows)
    unread = skipped
    for number, step_a, step_b in _pairs(a, b, common, unread, reads):
        comparison.add(number, step_a, step_b)
        if comparison.done:
            break
    if not comparison.compared:  # every common step unreadable in one run or the other
        raise share_none
    if not comparison.batches_compared and not set(comparison.shared) - DERIVED_SCALARS:
        only_a, only_b = (", ".join(sorted(comparison.unshared[side])) for side in "ab")
        raise InputError(
            f"{a.location} and {b.location} share no scalar: A records {only_a or 'none'}, "
            f"B {only_b or 'none'} (nothing to compare)"
        )
    unread_a, unread_b = unread
    # A step a run could not read is not among its readable steps: one only the other holds.
    steps_a = [n for n in steps_a if n not in unread_a]
    steps_b = [n for n in steps_b if n not in unread_b]
    unread_either = unread_a | unread_b
    common = [n for n in common if n not in unread_either]
    in_b = set(steps_b)
    first = comparison.first
    parted = [p.step for kind, p in first.items() if kind != "arrays" and p is not None]
    parted_at = min(parted) if parted else None
    focus = parted_at if parted_at is not None else getattr(first["arrays"], "step", None)
    around: list[SideBySide] = []
    if focus is not None:
        at = common.index(focus)
        shown = common[max(0, at - context) : at + context + 1]
        figures = [
            run_figures(run, shown, config, rewards[i], windows[i], reads[i])
            for i, run in enumerate((a, b))
        ]
        empty = dict.fromkeys(FIGURES)
        around = [
            SideBySide(step=n, a=figures[0].get(n, empty), b=figures[1].get(n, empty))
            for n in shown
        ]
    in_a = set(steps_a)
    return DiffResult(
        run_a=a.location,
        run_b=b.location,
        atol=atol,
        rtol=rtol,
        steps_a=len(steps_a),
        steps_b=len(steps_b),
        common=len(common),
        compared=comparison.compared,
        scalars_only=comparison.scalars_only,
        batches_compared=comparison.batches_compared,
        unshared={side: sorted(names) for side, names in comparison.unshared.items()},
        unshared_compared={
            name: comparison.shared[name]
            for name in sorted(set().union(*comparison.unshared.values()))
            if name in comparison.shared
        },
        only_a=_ranges([n for n in steps_a if n not in in_b]),
        only_b=_ranges([n for n in steps_b if n not in in_a]),
        first=first,
        parted_at=parted_at,
        own_policy={"a": own_spec(a), "b": own_spec(b)},
        around=around,
        unreadable_a=_ranges(sorted(unread_a)),
        unreadable_b=_ranges(sorted(unread_b)),
        bits_only=sorted(comparison.bits_only),
        notes=notes,
    )
