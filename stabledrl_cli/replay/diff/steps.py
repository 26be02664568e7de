"""One step of each run compared: which fields and scalars differ there, per kind of
difference, and the first parting of each kind over the steps compared (`diff_runs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stabledrl_cli.dump import Step
from stabledrl_cli.dump._schema import (
    DRAW_SCALARS,
    SCALAR_STEP_FIELDS,
    SERIES_SCALARS,
    STANDARD_SCALARS,
)
from stabledrl_cli.replay.diff.alignment import WINDOW_MEAN_SCALARS, RolloutRewards, WindowMeans
from stabledrl_cli.replay.diff.result import FieldDifference, Parting
from stabledrl_cli.replay.diff.values import (
    array_type,
    bitwise_equal,
    entry_differences,
    past_float64,
    scalar_text,
    scalars_text,
)
from stabledrl_cli.vocab import DIFF_KINDS, DiffKind

INPUT_FIELDS = (
    "token_ids",
    "reward",
    "advantages",
    "group_id",
    "mask",
    "seq_id",
    "micro_batch",
    "group_split",
    "token_count",
    "loss_weight",
    "loss_scale",
)
"""What training fed the loss, compared exactly."""
LOGP_FIELDS = ("logp", "logp_old", "logp_ref", "logp_rollout")
"""Log-probabilities, compared within the tolerance."""
SCALAR_NAMES = tuple(
    name
    for name in (*STANDARD_SCALARS, *SERIES_SCALARS)
    if name not in ("step", "wall_time", "step_time", "unit_grad_sketch_scale", *DRAW_SCALARS)
)
"""Training scalars compared within the tolerance: the standard ones (format 1.2's series
scalars too) but the step number, the clocks, a sketch's storage scale and DRAW_SCALARS
(compared as reward_mean's draw, `RolloutRewards`) (a run's own scalars are not compared)."""
RECORDING_SCALARS = ("grad_norm_covered", "nonfinite_grads")
"""Scalars a recording option adds, not the training: gradient geometry's grad_norm_covered,
the optimizer hooks' nonfinite_grads (`record -- CMD` against a Recorder of the same loop).
One only one run records (the other recorded none) differs in bits only, as the geometry
does; both record it: compared."""
COUNT_SCALARS = ("inner_step", "nonfinite", "nonfinite_grads")
"""Scalars that count (whole numbers): compared exactly, whatever the tolerance (one more
non-finite value is a parting)."""
DERIVED_SCALARS = frozenset({"nonfinite"})
"""Scalars every step holds, counted by the Recorder from what the step records: two runs
holding only these in common share no scalar (`diff` has nothing to compare)."""
FIELDS_SHOWN = 6
"""Differing fields described per kind."""


def _kind(name: str) -> DiffKind:
    """The kind of difference a differing array makes (beyond `arrays`)."""
    if name in INPUT_FIELDS:
        return "inputs"
    if name in LOGP_FIELDS:
        return "logprobs"
    return "arrays"


def _compared_scalars(
    step: Step, rewards: RolloutRewards, window: WindowMeans | None
) -> dict[str, float]:
    """The step's `SCALAR_NAMES` as compared: against a log written every k steps, the means
    over its row's window (`window`) where the run holds it; else reward_mean its rollout's
    draw (`rewards`) at the rollout's first step, the step's own elsewhere."""
    scalars = {n: step.scalars[n] for n in SCALAR_NAMES if n in step.scalars}
    means = None if window is None else window.at(step.step)
    if means is not None and window is not None and window.whole:
        return dict(means)
    if means is not None:
        for name in (*WINDOW_MEAN_SCALARS, "reward_mean"):
            scalars.pop(name, None)
        return {**scalars, **means}
    draw = rewards.at(step.step)
    if draw is not None:
        scalars["reward_mean"] = draw
    return scalars


def _recorded(step: Step, scalars: dict[str, float]) -> set[str]:
    """What a step records that a step of scalars only may: its compared `scalars` and
    `SCALAR_STEP_FIELDS`."""
    return set(scalars) | (step.fields & set(SCALAR_STEP_FIELDS))


@dataclass
class Comparison:
    """The steps compared so far and the first parting per kind."""

    atol: float
    rtol: float
    rewards: tuple[RolloutRewards, RolloutRewards]
    """Each run's reward_mean draws (A's, B's)."""
    windows: tuple[WindowMeans | None, WindowMeans | None] = (None, None)
    """Each run's means over the rows of the other, a log written every k steps (None: the
    other is not)."""
    first: dict[DiffKind, Parting | None] = field(default_factory=lambda: dict.fromkeys(DIFF_KINDS))
    compared: int = 0
    scalars_only: int = 0
    batches_compared: int = 0
    unshared: dict[str, set[str]] = field(default_factory=lambda: {"a": set(), "b": set()})
    shared: dict[str, int] = field(default_factory=dict)
    """Per scalar, the compared steps where both runs record it."""
    bits_only: set[str] = field(default_factory=set)

    @property
    def done(self) -> bool:
        return all(p is not None for p in self.first.values())

    def _array(self, name: str, a: Step, b: Step) -> tuple[str | None, str | None]:
        """(how the field's bits differ, how its values differ beyond its kind's tolerance):
        None where they do not."""
        if name not in a.fields or name not in b.fields:
            what = "only in A" if name in a.fields else "only in B"
            return what, what
        x, y = a.array(name), b.array(name)
        if bitwise_equal(x, y):
            return None, None
        tolerant = _kind(name) == "logprobs"
        values = entry_differences(
            x, y, self.atol if tolerant else 0.0, self.rtol if tolerant else 0.0
        )
        exact = entry_differences(x, y, 0.0, 0.0) if tolerant else values
        bits = exact or (
            f"{array_type(x)} vs {array_type(y)}"
            if x.dtype != y.dtype
            else "same values, other bits"
        )
        return bits, values

    def add(self, number: int, a: Step, b: Step) -> None:
        """Compares one step of each run, as step `number` (a verl recording's training step
        against verl's log: `TrainingSteps`), field by field; where either step is of
        scalars only (no policy batch), what both record there (not the other's batch),
        listing in `unshared` the scalars one records alone; reward_mean one a rollout
        (`rewards`)."""
        found: dict[DiffKind, list[FieldDifference]] = {kind: [] for kind in DIFF_KINDS}
        shared_only = a.is_scalar or b.is_scalar
        self.scalars_only += a.is_scalar != b.is_scalar
        self.batches_compared += not shared_only
        scalars_a = _compared_scalars(a, self.rewards[0], self.windows[0])
        scalars_b = _compared_scalars(b, self.rewards[1], self.windows[1])
        recorded = {"a": _recorded(a, scalars_a), "b": _recorded(b, scalars_b)}
        for name in recorded["a"] & recorded["b"]:
            self.shared[name] = self.shared.get(name, 0) + 1
        if shared_only:
            for side, step, rewards in (("a", a, self.rewards[0]), ("b", b, self.rewards[1])):
                alone = recorded[side] - recorded["b" if side == "a" else "a"]
                if rewards.inside(step.step):  # its reward is in its rollout's draw
                    alone.discard("reward_mean")
                self.unshared[side] |= alone
        for name in sorted(a.fields & b.fields if shared_only else a.fields | b.fields):
            bits, values = self._array(name, a, b)
            if bits is not None:
                found["arrays"].append(FieldDifference(field=name, what=bits))
                if _kind(name) == "arrays":
                    self.bits_only.add(name)
            if values is not None and _kind(name) != "arrays":
                found[_kind(name)].append(FieldDifference(field=name, what=values))
        for name in SCALAR_NAMES:
            x, y = scalars_a.get(name), scalars_b.get(name)
            if (x is None and y is None) or (shared_only and (x is None or y is None)):
                continue
            if x is None or y is None or not bitwise_equal(np.float64(x), np.float64(y)):
                bits = f"{scalar_text(x)} vs {scalar_text(y)}"
                found["arrays"].append(FieldDifference(field=name, what=bits))
            if name in RECORDING_SCALARS and (x is None or y is None):
                self.bits_only.add(name)  # recorded with an option one run did not use
                continue
            exact = name in COUNT_SCALARS
            atol, rtol = (0.0, 0.0) if exact else (self.atol, self.rtol)
            with past_float64():
                close = x is not None and y is not None and np.isclose(x, y, rtol, atol, True)
            if not close:
                what = scalars_text(x, y)
                found["scalars"].append(FieldDifference(field=name, what=what))
        for kind, differences in found.items():
            if differences and self.first[kind] is None:
                shown, more = differences[:FIELDS_SHOWN], len(differences) - FIELDS_SHOWN
                self.first[kind] = Parting(step=number, fields=shown, more=max(more, 0))
        self.compared += 1
