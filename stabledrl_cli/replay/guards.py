"""Adaptive grad-norm guards, replayed as a "what if" over a run's recorded grad norms.

A guard sees one optimizer step at a time (its pre-clip grad norm, and its loss) and decides
what it would have done to that step's gradient: nothing, scale it down (clip), or skip the
update. Replaying a guard over a recorded run says which steps it would have clipped or
skipped and by how much; `update` is also what an in-process guard calls before
`optimizer.step()`. Nothing here imports torch.

- `zclip` (ZClip, arXiv:2504.02507; bluorion-com/ZClip `zclip/zclip.py`): exponential moving
  averages of the norm's mean and variance, started from the first `warmup` norms. A norm whose
  z-score z = (g - mean) / (std + eps) exceeds `z_thresh` is clipped to
  mean + z_thresh std / (z / z_thresh) (`clip=adaptive`) or to the mean (`clip=mean`), times
  `clip_factor`; `max_norm` adds a fixed ceiling. The averages then take the clipped norm.
- `skip-step` (OLMo-core 3.0 `SkipStepOptimizer.get_step_factor`): over the previous `window`
  steps, a step whose loss or grad norm exceeds the window's mean by more than `sigma`
  standard deviations (unbiased) is skipped; no step is skipped before window // 2 steps
  (at least 2) have been seen, the current one included.

Two deviations from the sources, on purpose. A non-finite grad norm or loss is reported as
`nonfinite` (the recorder's trainers skip such steps) and is kept out of the statistics. In
the sources it would enter them and disable (ZClip: forever) or trip (OLMo: for a window) the
guard, which says nothing about the rule itself. And ZClip keeps a norm of 0 (a step without
gradient: every group's rewards equal, its advantages 0) out of its averages too: it has
nothing to clip, and in the source it decays the averages towards 0. A warmup of such steps
gives a threshold of 0, to which the source clips the first real norm and, its averages
taking that 0, every later one, for good; 300 such steps mid-run make it clip every later
step (to as little as 5e-4 of its norm) for the rest of the run.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from stabledrl_cli._repr import compact_repr
from stabledrl_cli.errors import ConfigError, UsageError, quoted, quoted_spec
from stabledrl_cli.policies._spec import finite_number
from stabledrl_cli.spec import (
    MAX_WINDOW,
    SPEC_SYNTAX,
    SpecError,
    format_spec,
    spec_int,
    split_spec,
)

GuardAction = Literal["none", "clip", "skip", "nonfinite"]
"""What a guard does to one step's gradient."""
GUARD_ACTIONS: tuple[GuardAction, ...] = get_args(GuardAction)

ZClipMode = Literal["adaptive", "mean"]
ZCLIP_MODES: tuple[ZClipMode, ...] = get_args(ZClipMode)

DEFAULT_GUARDS = ("zclip", "skip-step")
"""The guards a replay reports when none is named."""


@dataclass(frozen=True)
class GuardDecision:
    """One step, as a guard would have treated it."""

    action: GuardAction
    scale: float
    """Factor on the step's gradient: 1 (none), threshold / norm (clip), 0 (skip, nonfinite)."""
    z: float | None
    """The z-score the rule compared (for skip-step the larger of loss and norm, signed: only
    an excess counts); None while the guard is still collecting its statistics."""
    threshold: float | None
    """The norm a clip brings the gradient down to; None for other actions."""

    @property
    def judged(self) -> bool:
        """The rule decided the step (a z-score, or zclip's `max_norm`): False while it only
        collects its statistics (zclip's warmup, skip-step's first window // 2 steps), and for
        a non-finite step, which it drops unjudged."""
        return self.z is not None or self.action in ("clip", "skip")


_NONE = GuardDecision("none", 1.0, None, None)
_NONFINITE = GuardDecision("nonfinite", 0.0, None, None)


def _nonfinite(grad_norm: float, loss: float | None) -> bool:
    """A step either guard reports as `nonfinite` and keeps out of its statistics."""
    return not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss))


class ZClip:
    """ZClip's EMA z-score clip of the grad norm (see the module docstring)."""

    name = "zclip"

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        clip: ZClipMode = "adaptive",
        clip_factor: float = 1.0,
        max_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        _check(0.0 < alpha < 1.0, f"alpha must be in (0, 1), got {alpha!r}")
        _check(
            z_thresh > 0.0 and math.isfinite(z_thresh),
            f"z_thresh must be a finite number > 0, got {z_thresh!r}",
        )
        _check(
            1 <= warmup <= MAX_WINDOW,
            f"warmup must be an integer in [1, {MAX_WINDOW:.0e}], got {warmup!r}",
        )
        _check(clip in ZCLIP_MODES, f"clip must be one of {', '.join(ZCLIP_MODES)}: {clip!r}")
        _check(clip_factor > 0.0, f"clip_factor must be > 0, got {clip_factor!r}")
        _check(max_norm is None or max_norm > 0.0, f"max_norm must be > 0, got {max_norm!r}")
        self.alpha, self.z_thresh, self.warmup = alpha, z_thresh, warmup
        self.clip, self.clip_factor, self.max_norm, self.eps = clip, clip_factor, max_norm, eps
        self._buffer: list[float] = []
        self._unit = 1.0
        """The power of two the statistics are in: 1 unless a norm passed SCALE_ABOVE."""
        self.mean: float | None = None
        self.var: float | None = None

    def update(self, grad_norm: float, loss: float | None = None) -> GuardDecision:
        """The decision for the next step (ZClip's rule does not use the loss; a non-finite
        one makes the step non-finite, as for skip-step)."""
        if _nonfinite(grad_norm, loss):
            return _NONFINITE
        if grad_norm == 0.0:  # nothing to clip; in the averages it only decays them to 0
            return _NONE
        if abs(grad_norm) > SCALE_ABOVE * self._unit:
            self._rescale(unit_of(grad_norm))
        norm = grad_norm / self._unit  # the statistics are in units of self._unit
        if self.mean is None or self.var is None:
            self._buffer.append(norm)
            if len(self._buffer) >= self.warmup:
                self.mean = sum(self._buffer) / len(self._buffer)
                self.var = sum((x - self.mean) ** 2 for x in self._buffer) / len(self._buffer)
                self._buffer = []
            return self._ceiling(grad_norm, None, None)
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + self.eps / self._unit)
        clip_to: float | None = None
        if z > self.z_thresh:
            if self.clip == "adaptive":
                clip_to = (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor
            else:
                clip_to = self.mean
        effective = clip_to if clip_to is not None else norm
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * effective
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (effective - self.mean) ** 2
        return self._ceiling(grad_norm, None if clip_to is None else clip_to * self._unit, z)

    def _rescale(self, unit: float) -> None:
        """Takes the statistics into units of `unit` (a larger power of two: exact)."""
        factor = self._unit / unit
        self._buffer = [x * factor for x in self._buffer]
        if self.mean is not None and self.var is not None:
            self.mean, self.var = self.mean * factor, self.var * factor * factor
        self._unit = unit

    def _ceiling(self, grad_norm: float, clip_to: float | None, z: float | None) -> GuardDecision:
        limit = clip_to if clip_to is not None else math.inf
        if self.max_norm is not None:
            limit = min(limit, self.max_norm)
        if grad_norm > limit:
            return GuardDecision("clip", limit / grad_norm, z, limit)
        return GuardDecision("none", 1.0, z, None)


class SkipStep:
    """OLMo-core's skip-step rule on the loss and the grad norm (see the module docstring)."""

    name = "skip-step"

    def __init__(self, *, window: int = 128, sigma: float = 6.0) -> None:
        _check(
            6 <= window <= MAX_WINDOW,
            f"window must be an integer in [6, {MAX_WINDOW:.0e}], got {window!r}",
        )
        _check(
            sigma > 0.0 and math.isfinite(sigma),
            f"sigma must be a finite number > 0, got {sigma!r}",
        )
        self.window, self.sigma = window, sigma
        self.min_history = max(2, window // 2)
        self._norms: deque[float] = deque(maxlen=window)
        self._losses: deque[float] = deque(maxlen=window)

    def update(self, grad_norm: float, loss: float | None = None) -> GuardDecision:
        """The decision for the next step; without a loss, the grad norm alone decides."""
        if _nonfinite(grad_norm, loss):
            return _NONFINITE
        scores = [_z(grad_norm, self._norms, self.min_history)]
        if loss is not None:
            scores.append(_z(loss, self._losses, self.min_history))
            self._losses.append(loss)
        self._norms.append(grad_norm)
        known = [z for z in scores if z is not None]
        if not known:
            return _NONE
        worst = max(known)
        if worst > self.sigma:
            return GuardDecision("skip", 0.0, worst, None)
        return GuardDecision("none", 1.0, worst, None)


def _z(value: float, history: Iterable[float], min_history: int) -> float | None:
    """(value - mean) / std over the history (unbiased std), None while it is too short; a
    constant history gives +-inf for any excess or shortfall (OLMo compares value - mean with
    sigma std = 0)."""
    past = list(history)
    if len(past) + 1 < min_history:
        return None
    largest = max(abs(value), *map(abs, past))
    if largest > SCALE_ABOVE:  # a z-score is scale-free: taken in units where squares fit
        unit = unit_of(largest)
        value, past = value / unit, [x / unit for x in past]
    # Float sums (math.fsum), not statistics.stdev's exact fractions: a replay takes a z-score
    # a step, and those fractions cost a millisecond each on a 128-step window.
    mean = math.fsum(past) / len(past)
    spread = min(past) != max(past)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in past) / (len(past) - 1)) if spread else 0.0
    if std == 0.0:
        return 0.0 if value == mean else math.copysign(math.inf, value - mean)
    return (value - mean) / std


SCALE_ABOVE = 2.0**400
"""Norms (and losses, rewards) up to this take their statistics as they are. Past it (the
square of 1e155 overflows float64, and Python raises OverflowError on `x ** 2`; a sum of values
near 1e308 overflows too) they are taken in units of a power of two (exact): the decisions,
z-scores and collapse rules are scale-free."""


def unit_of(value: float) -> float:
    """The power of two that brings |value| into [1, 2) (never 2**1024, which overflows)."""
    return math.ldexp(1.0, math.frexp(abs(value))[1] - 1)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


Guard = ZClip | SkipStep

_PARAMS: dict[str, dict[str, type]] = {
    "zclip": {
        "alpha": float,
        "z_thresh": float,
        "warmup": int,
        "clip": str,
        "clip_factor": float,
        "max_norm": float,
    },
    "skip-step": {"window": int, "sigma": float},
}

_PARSERS: dict[type, Callable[[str], int | str]] = {int: spec_int}
"""A guard key's type -> how its spec text reads (ASCII digits only, as a policy's); a float
reads as a policy's (`finite_number`)."""


def make_guard(spec: str) -> Guard:
    """`zclip`, `zclip:z_thresh=3`, `skip-step:window=64,sigma=4` -> a fresh guard;
    `ConfigError` of the setting `guard` naming the spec and what is wrong with it (a bad
    name, key or value), so that a front end names the option it was given with."""
    try:
        return _parsed_guard(spec)
    except UsageError as exc:
        reason = exc.reason if isinstance(exc, SpecError) else str(exc)
        raise ConfigError("guard", f"{quoted_spec(spec)}: {reason}") from None


def _parsed_guard(spec: str) -> Guard:
    """`make_guard`'s guard; UsageError saying what is wrong (the spec named by the caller)."""
    name, raw = split_spec(spec, kind="guard")
    keys = _PARAMS.get(name)
    if keys is None:
        raise UsageError(f"unknown guard {quoted(name)}; valid: {', '.join(_PARAMS)}")
    params: dict[str, float | int | str] = {}
    for key, text in raw.items():
        kind = keys.get(key)
        if kind is None:
            raise UsageError(f"unknown key {quoted(key)}; valid: {', '.join(keys)}")
        if kind is float:  # finite and not too small, as a policy's number
            params[key] = finite_number(key, text)
            continue
        try:
            params[key] = _PARSERS.get(kind, kind)(text)
        except ValueError:
            raise UsageError(f"{key} must be {kind.__name__}, got {quoted(text)}") from None
    if name == "zclip":
        return ZClip(**params)  # type: ignore[arg-type]
    return SkipStep(**params)  # type: ignore[arg-type]


def guard_spec(guard: Guard) -> str:
    """The canonical spec of a guard: its name and every parameter that is not the default."""
    defaults = make_guard(guard.name)
    given = {
        key: getattr(guard, key)
        for key in _PARAMS[guard.name]
        if getattr(guard, key) != getattr(defaults, key)
    }
    return format_spec(guard.name, given)


@dataclass(frozen=True)
class GuardedStep:
    """A step a guard would have acted on."""

    step: int
    action: GuardAction
    grad_norm: float
    scale: float
    z: float | None
    threshold: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "step": self.step,
            "action": self.action,
            "grad_norm": self.grad_norm if math.isfinite(self.grad_norm) else None,
            "scale": self.scale,
            "z": self.z if self.z is None or math.isfinite(self.z) else None,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class GuardReport:
    """What one guard would have done over a run."""

    spec: str
    steps_seen: int
    acted: list[GuardedStep] = field(default_factory=list)
    judged: int = 0
    """Steps the guard decided by its rule (a z-score, or zclip's `max_norm`); 0 while it only
    collects its statistics (zclip's warmup, skip-step's first window // 2 steps), when its
    clipped and skipped counts of 0 say nothing."""

    def __repr__(self) -> str:
        """The fields, a long list of steps as its first items and its length."""
        return compact_repr(self)

    def count(self, action: GuardAction) -> int:
        """Steps the guard would have treated with `action`."""
        return sum(1 for s in self.acted if s.action == action)

    @property
    def removed_norm(self) -> float:
        """sum over clipped and skipped finite steps of grad_norm (1 - scale): how much update
        norm the guard takes away (before the optimizer's own clip)."""
        return sum(
            (s.grad_norm * (1.0 - s.scale) for s in self.acted if s.action in ("clip", "skip")),
            0.0,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "guard": self.spec,
            "steps": self.steps_seen,
            "clipped": self.count("clip"),
            "skipped": self.count("skip"),
            "nonfinite": self.count("nonfinite"),
            "removed_norm": self.removed_norm,
            "acted": [s.to_dict() for s in self.acted],
            "judged": self.judged,
        }


GuardInput = tuple[int, float, float | None]
"""One recorded step as a guard sees it: (step, grad_norm, loss or None)."""


class GuardReplay:
    """Guards replayed over a recorded series as it grows: each step is fed once, in step
    order, and `reports` are those `replay_guards` gives over the series fed so far."""

    def __init__(self, specs: Iterable[str] = DEFAULT_GUARDS) -> None:
        # A guard given twice, or two spellings of one, is replayed once, where first given.
        made: dict[str, Guard] = {}
        for guard in (make_guard(spec) for spec in specs):
            made.setdefault(guard_spec(guard), guard)
        self._guards = list(made.values())
        self._acted: list[list[GuardedStep]] = [[] for _ in self._guards]
        self._judged = [0 for _ in self._guards]
        self._steps = 0

    def extend(self, series: Iterable[GuardInput]) -> None:
        """Feeds the next steps, in step order, to every guard."""
        self._steps += _feed(self._guards, self._acted, self._judged, series)

    def reports(self, pending: Iterable[GuardInput] = ()) -> list[GuardReport]:
        """One report a guard over the steps fed so far, then `pending` (steps that may still
        change: fed to copies of the guards, not kept)."""
        guards = copy.deepcopy(self._guards)
        later: list[list[GuardedStep]] = [[] for _ in guards]
        judged = list(self._judged)
        steps = self._steps + _feed(guards, later, judged, pending)
        return [
            GuardReport(spec=guard_spec(guard), steps_seen=steps, acted=acted + more, judged=count)
            for guard, acted, more, count in zip(guards, self._acted, later, judged, strict=True)
        ]


def _feed(
    guards: list[Guard],
    acted: list[list[GuardedStep]],
    judged: list[int],
    series: Iterable[GuardInput],
) -> int:
    """Feeds `series` to each guard, appending the steps it acts on to its `acted` list and
    counting in `judged` those its rule decided (`GuardReport.judged`); -> the steps fed."""
    fed = 0
    for step, norm, loss in series:
        fed += 1
        for i, (guard, found) in enumerate(zip(guards, acted, strict=True)):
            decision = guard.update(float(norm), None if loss is None else float(loss))
            judged[i] += decision.judged
            if decision.action != "none":
                found.append(
                    GuardedStep(
                        step=int(step),
                        action=decision.action,
                        grad_norm=float(norm),
                        scale=decision.scale,
                        z=decision.z,
                        threshold=decision.threshold,
                    )
                )
    return fed


def replay_guards(
    steps: Iterable[int],
    grad_norms: Iterable[float],
    losses: Mapping[int, float] | None,
    specs: Iterable[str] = DEFAULT_GUARDS,
) -> list[GuardReport]:
    """Runs each guard over the recorded (step, grad_norm) series in step order; `losses`
    (step -> loss) feeds skip-step where a step has one (a non-finite one makes the step
    `nonfinite` for every guard). -> one report a guard."""
    replay = GuardReplay(specs)
    replay.extend(
        (step, norm, None if losses is None else losses.get(step))
        for step, norm in sorted(zip(steps, grad_norms, strict=True))
    )
    return replay.reports()


__all__ = [
    "DEFAULT_GUARDS",
    "GUARD_ACTIONS",
    "SPEC_SYNTAX",
    "GuardDecision",
    "GuardInput",
    "GuardReplay",
    "GuardReport",
    "GuardedStep",
    "SkipStep",
    "ZClip",
    "make_guard",
    "replay_guards",
]
