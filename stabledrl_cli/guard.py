"""An in-process guard: skip or down-weight an optimizer step the detectors flag, before
`optimizer.step()` (docs/guard.md).

>>> guard = Guard(mode="skip", policy="grpo")           # off unless you make one
>>> norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
>>> decision = guard.before_step(grad_norm=norm, batch=batch)
>>> if not decision.skip:
...     decision.apply(params, applied=min(1.0, 1.0 / (norm + 1e-6)))
...     optimizer.step()
>>> recorder.log_step(step, ..., grad_norm=norm, scalars=guard.scalars(decision))

The rule, in order (every rule is fed on every step, so its statistics see the whole run):

1. The grad-norm rule (`rule`, a guard spec of `replay.guards`): `skip-step` (OLMo-core's: a
   norm more than `sigma` = 6 standard deviations above the mean of the previous `window` = 128
   steps, once half a window is seen) by default for mode `skip`; `zclip` (ZClip's EMA z-score
   clip) by default for mode `scale`. A non-finite grad norm (or loss) is always skipped.
2. The batch rule, when a `policy` and a `batch` are given: the policy's coefficients on the
   batch (its replayed update, `Policy.weights`) hold a NaN or inf on a scored entry: the update
   would be non-finite, a risk step (docs/collapse.md): skipped.

Mode `skip` skips a step any rule flags. Mode `scale` multiplies a clipped step's gradient by the
rule's scale (threshold / norm) and skips a step the rule skips.

Every decision is recorded when the integration logs `scalars(decision)` with the step:
`guard_action` (0 none, 1 scale, 2 skip), `guard_scale` (the factor on the pre-clip gradient:
1, in (0, 1), or 0) and `guard_z` (the rule's z-score, NaN while it gathers statistics); and
`manifest_note()` goes into the run's `meta.guard` (the mode, rules and codes).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from stabledrl_cli.errors import ConfigError, UsageError, counted, one_line
from stabledrl_cli.policies import Policy, PolicyBatch, get_policy, prepare
from stabledrl_cli.replay.guard_rules import SkipStep, ZClip
from stabledrl_cli.replay.guards import guard_spec, make_guard, step_action
from stabledrl_cli.vocab import GUARD_ACTION_CODES, GUARD_MODES, GuardMode, GuardStepAction

Action = GuardStepAction
"""What a guard did to one step."""
ACTION_CODES = GUARD_ACTION_CODES
"""`guard_action` as recorded (step scalars are numbers)."""
DEFAULT_RULES: dict[GuardMode, str] = {"skip": "skip-step", "scale": "zclip"}
"""The grad-norm rule of each mode when none is given."""
SCALARS = ("guard_action", "guard_scale", "guard_z", "guard_rule_action", "guard_loss")
"""The step scalars `Guard.scalars` records (`guard_loss` on a step given a loss only)."""


@dataclass(frozen=True)
class Decision:
    """What the guard asks of one step."""

    action: Action
    scale: float
    """The factor on the step's pre-clip gradient: 1 (none), in (0, 1) (scale), 0 (skip)."""
    reason: str
    """Why, in words ("" for none)."""
    z: float | None = None
    """The grad-norm rule's z-score (None while it gathers statistics)."""
    ruled: Action = "none"
    """What the grad-norm rule alone decided, before the batch rule (`action` unless the batch
    rule skipped the step)."""
    loss: float | None = None
    """The loss the grad-norm rule was given (None: none was)."""

    @property
    def skip(self) -> bool:
        """Do not call `optimizer.step()` for this step."""
        return self.action == "skip"

    def apply(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        *,
        applied: float | torch.Tensor = 1.0,
    ) -> float:
        """Scales the parameters' gradients (in place) to `scale` of their pre-clip size, given
        that they already carry the factor `applied` (e.g. clip_grad_norm_'s
        min(1, max_norm / norm); above 1, as max_norm / norm is where the clip did not act,
        it is 1); never scales up, and does nothing unless `action` is scale.
        Returns the factor it multiplied them by: 1.0 when it left them as they were (no
        scale, or a clip that had already cut them to `scale` or below).
        `parameters`: tensors, or one tensor, as clip_grad_norm_ takes them; UsageError naming
        it for anything else (a model: its `.parameters()` are), and on a step it scales for no
        tensor (a generator clip_grad_norm_ used up) or tensors none of which holds a `.grad`
        (their gradients, given in their place)."""
        applied = _number(applied, "applied")
        if not (math.isfinite(applied) and applied > 0):  # NaN would make every gradient NaN
            raise UsageError(f"applied must be a finite factor > 0, got {applied!r}")
        applied = min(applied, 1.0)  # clip_grad_norm_ never scales up: max_norm / norm > 1
        _refuse_non_tensors(parameters)
        if self.action != "scale" or self.scale >= applied:
            return 1.0
        factor = self.scale / applied
        if isinstance(parameters, torch.Tensor):  # iterating it would give its rows
            parameters = [parameters]
        tensors = list(parameters)
        _refuse_non_tensors(tensors)
        if not tensors:
            raise UsageError(
                "parameters: no tensor to scale (an iterator already used up, as "
                "model.parameters() is by clip_grad_norm_: give a list of them to both)"
            )
        if not any(p.grad is not None for p in tensors):  # their gradients, given in their place
            raise UsageError(
                f"parameters: none of the {len(tensors)} tensors holds a .grad to scale: give the "
                "parameters, as clip_grad_norm_ takes them, not their gradients"
            )
        with torch.no_grad():
            for p in tensors:
                if p.grad is not None:
                    p.grad.mul_(factor)
        return factor


class Guard:
    """Flags a step before `optimizer.step()` (rule in the module docstring).

    mode: skip | scale. rule: a grad-norm guard spec (`skip-step`, `skip-step:window=64`,
    `zclip:z_thresh=3`; default per mode, `DEFAULT_RULES`). policy: the run's own policy (a
    spec or a Policy), for the batch rule; None: no batch rule.
    """

    def __init__(
        self, mode: GuardMode = "skip", rule: str | None = None, policy: str | Policy | None = None
    ) -> None:
        if mode not in GUARD_MODES:
            raise UsageError(f"unknown guard mode {mode!r}; valid: {', '.join(GUARD_MODES)}")
        if rule is not None and not isinstance(rule, str):
            raise UsageError(
                f"rule must be a guard spec (a string) or None, got {type(rule).__name__}"
            )
        self.mode: GuardMode = mode
        try:
            self.rule = make_guard(DEFAULT_RULES[mode] if rule is None else rule)
        except ConfigError as exc:
            raise ConfigError("rule", exc.problem) from None
        self.policy = None if policy is None else get_policy(policy)
        self.counts: dict[Action, int] = dict.fromkeys(ACTION_CODES, 0)
        self.judged = 0
        """Steps the grad-norm rule decided (`GuardDecision.judged`): 0 while it only gathers
        its statistics, when `counts` of 0 skipped and scaled say nothing."""

    def before_step(
        self,
        *,
        grad_norm: float | torch.Tensor,
        loss: float | torch.Tensor | None = None,
        batch: PolicyBatch | None = None,
    ) -> Decision:
        """The decision for the step whose pre-clip gradient norm is `grad_norm` (loss: its loss,
        which the skip-step rule also watches; batch: its batch, for the batch rule; a tensor
        still in the autograd graph is read detached). UsageError for a negative grad_norm, a
        batch without a field the policy needs or a batch given a guard without a policy,
        InputError for a malformed batch, before the rule sees the step (a NaN or inf grad
        norm is a non-finite step: skipped)."""
        norm = _number(grad_norm, "grad_norm")
        if norm < 0:
            raise UsageError(f"grad_norm must be >= 0 (a norm), got {norm!r}")
        policy, bad = self.policy, 0
        if batch is not None and policy is None:
            raise UsageError(
                "batch: the batch rule needs the run's policy: make the guard with "
                "Guard(..., policy=SPEC), or give no batch"
            )
        if batch is not None and policy is not None:
            bad = _nonfinite_coefficients(policy, batch)
        given = None if loss is None else _number(loss, "loss")
        ruled = self.rule.update(norm, given)
        self.judged += ruled.judged
        decision = Decision("none", 1.0, "", ruled.z)
        if ruled.action == "nonfinite":
            decision = Decision("skip", 0.0, "non-finite grad norm or loss", None)
        elif ruled.action == "skip":
            decision = Decision("skip", 0.0, _z_reason(self.rule, ruled.z), ruled.z)
        elif ruled.action == "clip":
            rule = self.rule  # a clip is ZClip's: its z-score past z_thresh, or max_norm
            by_z = isinstance(rule, ZClip) and ruled.z is not None and ruled.z > rule.z_thresh
            why = _z_reason(rule, ruled.z) if by_z else "ceiling"
            acted = step_action("clip", self.mode)
            decision = Decision(acted, ruled.scale if acted == "scale" else 0.0, why, ruled.z)
        decision = replace(decision, ruled=decision.action, loss=given)
        if policy is not None and bad and decision.action != "skip":
            why = f"{policy.spec}: {counted(bad, 'non-finite coefficient')}"
            decision = replace(decision, action="skip", scale=0.0, reason=why)
        self.counts[decision.action] += 1
        if decision.skip:
            _skipped_under_record()
        return decision

    @staticmethod
    def scalars(decision: Decision) -> dict[str, float]:
        """The step scalars that record `decision` (`SCALARS`): with the rule's own decision
        and the loss it was given, a replay of the rule sees what it saw (docs/guard.md)."""
        scalars = {
            "guard_action": float(ACTION_CODES[decision.action]),
            "guard_scale": decision.scale,
            "guard_z": math.nan if decision.z is None else decision.z,
            "guard_rule_action": float(ACTION_CODES[decision.ruled]),
        }
        if decision.loss is not None:
            scalars["guard_loss"] = decision.loss
        return scalars

    def manifest_note(self) -> dict[str, object]:
        """The run's `meta.guard`: mode, rules and what the recorded scalars mean."""
        return {
            "mode": self.mode,
            "rule": guard_spec(self.rule),
            "policy": None if self.policy is None else self.policy.spec,
            "scalars": list(SCALARS),
            "actions": {str(code): action for action, code in ACTION_CODES.items()},
        }


def _skipped_under_record() -> None:
    """Under `stabledrl record -- CMD`, whose optimizer hooks number the run's steps by the
    optimizer's step() calls: the skipped step, which makes none, is theirs all the same
    (`optimizer_hooks.skipped_by_guard`), else every later batch would pair with the next
    step's optimizer step. Nothing when the hooks are not loaded (never imported here)."""
    hooks: Any = sys.modules.get("stabledrl_cli.capture.optimizer_hooks")
    if hooks is not None:
        hooks.skipped_by_guard()


def _z_reason(rule: ZClip | SkipStep, z: float | None) -> str:
    """`rule: z Z`, Z shown to 3 digits, or to as many as it takes to read past the rule's
    limit (a z of 6.0004 against sigma 6 is not written 'z 6')."""
    if z is None:
        return rule.name
    limit = rule.sigma if isinstance(rule, SkipStep) else rule.z_thresh
    shown = f"{z:.3g}"
    for digits in (6, 9, 17):
        if not math.isfinite(z) or float(shown) > limit:
            break
        shown = f"{z:.{digits}g}"
    return f"{rule.name}: z {shown}"


def _refuse_non_tensors(parameters: object) -> None:
    """UsageError naming `parameters` (Decision.apply's) unless it is one tensor or an
    iterable of them (a list's items checked; a generator's are once it is listed)."""
    expected = "parameters must be a tensor or an iterable of tensors, as clip_grad_norm_ takes"
    if isinstance(parameters, torch.Tensor):
        return
    # A ParameterList is a Module, and the iterable of its parameters that the clip takes.
    plist = isinstance(parameters, torch.nn.ParameterList)
    if isinstance(parameters, torch.nn.Module) and not plist:
        raise UsageError(
            f"{expected}: got a {type(parameters).__name__} model, not its .parameters()"
        )
    if not isinstance(parameters, Iterable) or isinstance(parameters, (str, bytes, Mapping)):
        raise UsageError(f"{expected}, got {type(parameters).__name__}")
    if isinstance(parameters, list | tuple):
        for item in parameters:
            if not isinstance(item, torch.Tensor):
                raise UsageError(f"{expected}, got an item of type {type(item).__name__}")


def _number(value: float | torch.Tensor, name: str) -> float:
    """`value`, the argument `name`, as a float: a real number, a numpy array of one (as the
    Recorder takes it), or a one-element tensor read detached (one that requires grad would
    make torch warn 'Converting a tensor with requires_grad=True to a scalar' into the
    training's log); UsageError naming `name` for anything else (a tensor or array of several
    values, of complex numbers or of bools, one with no data on the meta device, a string,
    None). An
    integer past float's range is infinite."""
    expected = f"{name} must be a number or a one-element tensor"
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise UsageError(f"{expected}, got an array of {value.size} elements")
        value = value.reshape(-1)[0]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise UsageError(f"{expected}, got a tensor of {value.numel()} elements")
        if value.is_complex() or value.dtype == torch.bool:
            raise UsageError(
                f"{expected}, got a {'complex' if value.is_complex() else 'bool'} tensor"
            )
        try:
            return float(value.detach())
        except (RuntimeError, NotImplementedError) as exc:  # no data (meta), ...
            raise UsageError(f"{name}: cannot be read as a number ({one_line(exc)})") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) past float's range is, as a float, infinite
        return math.inf if value > 0 else -math.inf


def _nonfinite_coefficients(policy: Policy, batch: PolicyBatch) -> int:
    """Scored units whose coefficient under `policy` is NaN or inf."""
    with torch.no_grad():
        prepared = prepare(batch)
        coef = policy.weights(prepared).coef.reshape(-1)
        return int((~torch.isfinite(coef) & prepared.mask.reshape(-1)).sum())
