"""Where two runs part: `diff_runs` aligns two runs by step number and finds the first step at
which they differ, per kind of difference (docs/diff.md).

The runs are compared step by step, one field of one step of each run in memory at a time, in
ascending order of the steps both hold, until every kind has parted (or the steps run out):

- `arrays`: every array of the step and its `SCALAR_NAMES`, bit for bit (a field only one of the two
  has differs);
- `inputs`: what training fed the loss (`INPUT_FIELDS`), exactly;
- `logprobs`: the log-probabilities (`LOGP_FIELDS`), within a tolerance;
- `scalars`: the step's training scalars (`SCALAR_NAMES`), within the same tolerance but the
  counts (`COUNT_SCALARS`), exactly.

`reward_mean` is compared at a rollout's first step as the observed-collapse rule reads it
(`detectors.reward_draws`, over the steps both runs hold): the mean of its steps' rewards, or
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

Two values a, b (a from run A, b from run B) agree within the tolerance when
|a - b| <= atol + rtol * |b|, or both are NaN, or both are the same infinity. The runs *part*
at the first step where inputs, log-probabilities or scalars differ; steps only one run holds
are listed, not counted as parting; where either step is of scalars only (an imported log,
the optimizer hooks' steps) only the scalars (and arrays) both record there are compared, and
those only one records are listed. Around the parting step the figures of each run are set
side by side: reward and grad norm as recorded, the rollout's reward as compared, discard
fraction and risk of the run's own policy replayed (`incremental.OwnReplay`, over the run's
steps up to the last one shown).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from stabledrl_cli.dump import Run, RunIntegrityWarning, Step
from stabledrl_cli.dump._schema import (
    DRAW_SCALARS,
    SCALAR_STEP_FIELDS,
    SERIES_SCALARS,
    STANDARD_SCALARS,
)
from stabledrl_cli.errors import ConfigError, InputError, counted
from stabledrl_cli.replay.alignment import (
    SERIES_READ,
    WINDOW_MEAN_SCALARS,
    RolloutRewards,
    WindowMeans,
    log_windows,
    training_steps,
)
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.observed import is_verl_recording
from stabledrl_cli.replay.run_facts import (
    SKIPPED_KINDS,
    in_flight_steps,
    is_scalar_run,
    own_spec,
    replayed_loss_norm,
    run_gaps,
    shown_reasons,
    whole_run_refusal,
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
GEOMETRY_SCALARS = ("grad_norm_covered",)
"""Scalars a run records with its gradient geometry: one only one run records (the other
recorded none) differs in bits only, as the geometry does; both record it: within the
tolerance."""
COUNT_SCALARS = ("inner_step", "nonfinite", "nonfinite_grads")
"""Scalars that count (whole numbers): compared exactly, whatever the tolerance (one more
non-finite value is a parting)."""
DEFAULT_ATOL = 1e-6
"""Absolute tolerance of log-probabilities and scalars."""
DEFAULT_RTOL = 1e-5
"""Relative tolerance of log-probabilities and scalars (float32 sums reordered, e.g. by another
thread count, move the example's values by about 1e-7 relative)."""
DEFAULT_CONTEXT = 3
"""Steps shown before and after the parting step."""
FIELDS_SHOWN = 6
"""Differing fields described per kind."""


@dataclass(frozen=True, kw_only=True)
class FieldDifference:
    """How one field (or scalar) differs at a step."""

    field: str
    what: str
    """In words: 'only in A', 'float32[64] vs float32[32]', '3 of 64 differ, first at 5, max
    |a-b| 0.01' (the index of the first differing entry in the flattened array), ', 2 NaN or
    inf against another value' after it when some are."""


@dataclass(frozen=True, kw_only=True)
class Parting:
    """The first step at which one kind of difference shows, and what differs there."""

    step: int
    fields: list[FieldDifference]
    more: int = 0
    """Fields that differ there too, past those described (`FIELDS_SHOWN`)."""


@dataclass(frozen=True, kw_only=True)
class SideBySide:
    """One step's figures in each run (None where a run lacks the step or the figure)."""

    step: int
    a: dict[str, float | bool | None]
    b: dict[str, float | bool | None]


FIGURES = ("reward_mean", "reward_draw", "grad_norm", "discard_frac", "risk", "risk_judged")
"""The figures set side by side: recorded reward, the rollout's reward as compared (at its
first step, `RolloutRewards`) and pre-clip grad norm, the own policy's replayed discard
fraction and risk (a spike or non-finite update; None, with `risk_judged` False, on a step the
spike rule had not judged: the `spike_judged` column)."""


@dataclass(frozen=True, kw_only=True)
class DiffResult:
    """Where two runs part (the `diff --format json` document, docs/diff.md)."""

    run_a: str
    run_b: str
    atol: float
    rtol: float
    steps_a: int
    steps_b: int
    common: int
    """Steps both runs hold."""
    compared: int
    """Common steps compared (the comparison stops once every kind has parted)."""
    scalars_only: int
    """Compared steps that one run holds as scalars only (no policy batch: an imported log,
    optimizer-hook steps): only what both record there was compared, not the other's batch."""
    batches_compared: int
    """Compared steps where both runs hold a policy batch: those `inputs` and `logprobs` were
    compared on (0: not compared, both runs or one holding scalars only)."""
    unshared: dict[str, list[str]]
    """Per run ("a", "b"), the scalars (and scalar-step arrays, `param_grad_norm`) it alone
    records at a compared step where either run holds scalars only: not compared there."""
    unshared_compared: dict[str, int]
    """Of the `unshared` names, those both runs record at other compared steps, each with the
    number of them: compared there (verl's imported `lr`, which its first step lacks)."""
    only_a: list[tuple[int, int]]
    """Steps only run A holds, as inclusive ranges [first, last]."""
    only_b: list[tuple[int, int]]
    first: dict[DiffKind, Parting | None]
    """Per kind, the first step where it differs (None: never, over the compared steps)."""
    parted_at: int | None
    """The first step where inputs, log-probabilities or scalars differ (None: they never do)."""
    own_policy: dict[str, str | None]
    """The own policy replayed for each run ("a", "b"), None when not in the catalogue."""
    around: list[SideBySide] = field(default_factory=list)
    unreadable_a: list[tuple[int, int]] = field(default_factory=list)
    """Steps run A has a file for but cannot read (torn, corrupt, a rank missing), as inclusive
    ranges: not among its steps, so not compared (one B holds is in `only_b`)."""
    unreadable_b: list[tuple[int, int]] = field(default_factory=list)
    bits_only: list[str] = field(default_factory=list)
    """The arrays no kind parts on (gradient geometry, `param_grad_norm`) whose bits differ at
    a compared step: no tolerance applies to them."""
    notes: list[str] = field(default_factory=list)
    """How the steps of a log written every k steps were compared (`WindowMeans`), or that a
    log's rows skip steps the other run holds without saying how it was written."""

    @property
    def identical(self) -> bool:
        """Every common step bit for bit equal (its arrays compared), no step in one run only,
        and none that either run cannot read."""
        return (
            self.first["arrays"] is None
            and not self.scalars_only
            and not any(self.unshared.values())
            and not self.only_a
            and not self.only_b
            and not self.unreadable_a
            and not self.unreadable_b
        )

    def parted_before(self, until: int | None) -> bool:
        """They part before step `until` (None: at any step)."""
        return self.parted_at is not None and (until is None or self.parted_at < until)

    def to_dict(self) -> dict[str, object]:
        """The JSON document (NaN still to be mapped to null)."""
        data = asdict(self)
        data["first"] = {kind: data["first"][kind] for kind in self.first}
        data["only_a"] = [list(r) for r in self.only_a]
        data["only_b"] = [list(r) for r in self.only_b]
        data["unreadable_a"] = [list(r) for r in self.unreadable_a]
        data["unreadable_b"] = [list(r) for r in self.unreadable_b]
        data["identical"] = self.identical
        return data


def _ranges(numbers: list[int]) -> list[tuple[int, int]]:
    """Ascending numbers as inclusive ranges of consecutive ones: [1,2,3,7] -> [(1,3), (7,7)]."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def _shape(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def _is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def _past_float64() -> np.errstate:
    """Inside: a gap or a tolerance past float64's largest number is infinite, as it should
    be, without a warning (the largest finite tolerances, 1e308, made one), and inf - inf is
    NaN (no gap), without one either."""
    return np.errstate(over="ignore", invalid="ignore")


def _entries(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> str | None:
    """None when a and b agree (exactly with atol = rtol = 0; NaN agrees with NaN), else how
    they differ, in words."""
    if a.shape != b.shape or _is_float(a) != _is_float(b):
        return f"{_shape(a)} vs {_shape(b)}"
    x, y = a.reshape(-1), b.reshape(-1)
    gaps: np.ndarray | None = None
    nonfinite = 0
    if _is_float(x):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        with _past_float64():
            bad = ~np.isclose(x64, y64, rtol=rtol, atol=atol, equal_nan=True)
            gaps = np.abs(x64 - y64)[bad]
        nonfinite = int(np.count_nonzero(~(np.isfinite(x64[bad]) & np.isfinite(y64[bad]))))
    else:
        bad = x != y
    count = int(np.count_nonzero(bad))
    if count == 0:
        return None
    detail = f"{count} of {x.size} differ, first at {int(np.flatnonzero(bad)[0])}"
    if gaps is not None and np.isfinite(gaps).any():
        detail += f", max |a-b| {float(gaps[np.isfinite(gaps)].max()):.4g}"
    if nonfinite:
        detail += f", {nonfinite} NaN or inf against another value"
    return detail


def _scalar_text(value: float | None, *, digits: int | None = None) -> str:
    """`digits` significant digits, or (None) as many as tell it from any other float."""
    if value is None:
        return "absent"
    return repr(float(value)) if digits is None else f"{value:.{digits}g}"


def _scalars_text(x: float | None, y: float | None) -> str:
    """'x vs y' with 6 significant digits, or the fewest more that tell the two apart."""
    for digits in range(6, 17):
        texts = _scalar_text(x, digits=digits), _scalar_text(y, digits=digits)
        if texts[0] != texts[1]:
            return " vs ".join(texts)
    return f"{_scalar_text(x)} vs {_scalar_text(y)}"


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


def _compared_reward(
    step: int,
    scalars: Mapping[str, float],
    rewards: RolloutRewards,
    means: Mapping[str, float] | None,
) -> float | None:
    """The reward_mean compared at `step` (`_compared_scalars`), as the side-by-side table
    shows it: the mean over the other run's row's window (`means`), else the draw of the
    rollout that starts there, else the step's own where no rollout draw among the compared
    steps holds it (a rollout whose first step the other run lacks); None inside a rollout,
    whose reward its first step shows."""
    if means is not None:
        return means.get("reward_mean")
    draw = rewards.at(step)
    if draw is not None or rewards.inside(step):
        return draw
    return scalars.get("reward_mean")


def _recorded(step: Step, scalars: dict[str, float]) -> set[str]:
    """What a step records that a step of scalars only may: its compared `scalars` and
    `SCALAR_STEP_FIELDS`."""
    return set(scalars) | (step.fields & set(SCALAR_STEP_FIELDS))


@dataclass
class _Comparison:
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
        if _bitwise_equal(x, y):
            return None, None
        tolerant = _kind(name) == "logprobs"
        values = _entries(x, y, self.atol if tolerant else 0.0, self.rtol if tolerant else 0.0)
        exact = _entries(x, y, 0.0, 0.0) if tolerant else values
        bits = exact or (
            f"{_shape(x)} vs {_shape(y)}" if x.dtype != y.dtype else "same values, other bits"
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
            if x is None or y is None or not _bitwise_equal(np.float64(x), np.float64(y)):
                bits = f"{_scalar_text(x)} vs {_scalar_text(y)}"
                found["arrays"].append(FieldDifference(field=name, what=bits))
            if name in GEOMETRY_SCALARS and (x is None or y is None):
                self.bits_only.add(name)  # recorded with geometry one run did not record
                continue
            exact = name in COUNT_SCALARS
            atol, rtol = (0.0, 0.0) if exact else (self.atol, self.rtol)
            with _past_float64():
                close = x is not None and y is not None and np.isclose(x, y, rtol, atol, True)
            if not close:
                what = _scalars_text(x, y)
                found["scalars"].append(FieldDifference(field=name, what=what))
        for kind, differences in found.items():
            if differences and self.first[kind] is None:
                shown, more = differences[:FIELDS_SHOWN], len(differences) - FIELDS_SHOWN
                self.first[kind] = Parting(step=number, fields=shown, more=max(more, 0))
        self.compared += 1


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


def _figures(
    run: Run,
    numbers: list[int],
    config: ReplayConfig,
    rewards: RolloutRewards,
    window: WindowMeans | None,
    reads: dict[int, int],
) -> dict[int, dict[str, float | bool | None]]:
    """compared number -> FIGURES of `run` at `numbers`, each at the run's step `reads` gives
    for it (the number itself where it gives none: `_pairs`) (its own policy replayed over
    the run's steps up to the last of them; its figures None, with a warning, when its steps
    lack a field it needs), with its reward draws `rewards`, or its means over the other
    run's rows (`window`) where it has them."""
    numbered = {reads.get(n, n): n for n in numbers}
    steps = sorted(numbered)
    series: dict[str, Any] = {}
    if any(not h.is_scalar for h in run.step_headers() if h.step <= steps[-1]):
        from stabledrl_cli.replay.incremental import OwnReplay  # torch: a policy batch to replay

        follower = OwnReplay(run, config)
        try:
            follower.extend([n for n in run.step_numbers if n <= steps[-1]])
            series = follower.series()
        except InputError as exc:
            message = f"{run.location}: its own policy is not replayed ({exc})"
            warnings.warn(message, RunIntegrityWarning, stacklevel=2)
    index = {int(n): i for i, n in enumerate(series.get("step", []))}
    wanted = set(steps)
    out: dict[int, dict[str, float | bool | None]] = {}
    for header in run.step_headers():
        if header.step not in wanted:
            continue
        i = index.get(header.step)
        risk = None if i is None else bool(series["collapsed"][i])
        means = None if window is None else window.at(header.step)
        out[numbered[header.step]] = {
            "reward_mean": header.scalars.get("reward_mean"),
            "reward_draw": _compared_reward(header.step, header.scalars, rewards, means),
            "grad_norm": {**header.scalars, **(means or {})}.get("grad_norm"),
            "discard_frac": None if i is None else float(series["discard_frac"][i]),
            "risk": risk if i is None or series["spike_judged"][i] else None,
            "risk_judged": None if i is None else bool(series["spike_judged"][i]),
        }
    return out


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
    comparison = _Comparison(atol=atol, rtol=rtol, rewards=rewards, windows=windows)
    unread = skipped
    for number, step_a, step_b in _pairs(a, b, common, unread, reads):
        comparison.add(number, step_a, step_b)
        if comparison.done:
            break
    if not comparison.compared:  # every common step unreadable in one run or the other
        raise share_none
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
            _figures(run, shown, config, rewards[i], windows[i], reads[i])
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
