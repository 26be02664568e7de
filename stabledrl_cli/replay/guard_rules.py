"""Adaptive grad-norm guards, the rules: what a guard does to one optimizer step.

A guard sees one optimizer step at a time (its pre-clip grad norm, and its loss) and decides
what it would have done to that step's gradient: nothing, scale it down (clip), or skip the
update. `update` is what an in-process guard calls before `optimizer.step()`; `guards`
replays a guard over a recorded run. Nothing here imports torch.

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
guard, which says nothing about the rule itself. And both keep a norm of 0 (a step without
gradient: every group's rewards equal, its advantages 0) out of their statistics too: it has
nothing to clip or skip. In ZClip's source it decays the averages towards 0. A warmup of such
steps gives a threshold of 0, to which the source clips the first real norm and, its averages
taking that 0, every later one, for good; 300 such steps mid-run make it clip every later
step (to as little as 5e-4 of its norm) for the rest of the run. In OLMo's, half a window of
them (a sparse-reward start that earned no reward) makes the first real norms after them
outliers (their standard deviation 0, then tiny): it skips the first 2 to 4 steps that learn.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from stabledrl_cli.errors import UsageError, counted
from stabledrl_cli.spec import MAX_WINDOW

GuardAction = Literal["none", "clip", "skip", "nonfinite"]
"""What a guard does to one step's gradient."""
GUARD_ACTIONS: tuple[GuardAction, ...] = get_args(GuardAction)

ZClipMode = Literal["adaptive", "mean"]
ZCLIP_MODES: tuple[ZClipMode, ...] = get_args(ZClipMode)


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
    collects = "nonzero finite"
    """The grad norms its statistics take in."""

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
        self.collected = 0
        """Grad norms its statistics took in."""

    def update(self, grad_norm: float, loss: float | None = None) -> GuardDecision:
        """The decision for the next step (ZClip's rule does not use the loss; a non-finite
        one makes the step non-finite, as for skip-step)."""
        if _nonfinite(grad_norm, loss):
            return _NONFINITE
        if grad_norm == 0.0:  # nothing to clip; in the averages it only decays them to 0
            return _NONE
        self.collected += 1
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
    collects = "nonzero finite"
    """The grad norms its statistics take in."""

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
        self.collected = 0
        """Grad norms its statistics took in."""

    def update(self, grad_norm: float, loss: float | None = None) -> GuardDecision:
        """The decision for the next step; without a loss, the grad norm alone decides."""
        if _nonfinite(grad_norm, loss):
            return _NONFINITE
        if grad_norm == 0.0:  # nothing to skip; in the window it makes the next norms outliers
            return _NONE
        scores = [_z(grad_norm, self._norms, self.min_history)]
        if loss is not None:
            scores.append(_z(loss, self._losses, self.min_history))
            self._losses.append(loss)
        self._norms.append(grad_norm)
        self.collected += 1
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


GUARD_COLLECTS = {rule.name: rule.collects for rule in (ZClip, SkipStep)}
"""Guard name -> the grad norms its statistics take in."""


def too_few_norms(collected: int, collects: str, given: int, source: str) -> str:
    """Why a guard that was `given` grad norms judged none: 'its statistics need more than the
    30 grad norms recorded', or, where it left some out, 'the 10 nonzero finite grad norms of
    the 40 recorded' (`source`: 'recorded', 'it was given')."""
    if collected == given:
        return f"its statistics need more than the {counted(given, 'grad norm')} {source}"
    return (
        f"its statistics need more than the {collected} {collects} grad norms of the {given} "
        + source
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


Guard = ZClip | SkipStep
