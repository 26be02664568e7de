"""Adaptive grad-norm guards, replayed as a "what if" over a run's recorded grad norms.

A guard's spec (`make_guard`, `guard_spec`: `zclip:z_thresh=3`, `skip-step:window=64`) and
its replay over a recorded run, in step order: which steps it would have clipped or skipped
and by how much (`GuardReplay`, `replay_guards`); the run's own guard rule (`own_guard`, from its
`meta.guard`) replayed as its guard was asked, and compared with the decisions it recorded
(`GuardAgreement`). The rules themselves (ZClip, OLMo-core's
skip-step) and where they deviate from their sources: `guard_rules`. Nothing here imports
torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from stabledrl_cli._repr import compact_repr
from stabledrl_cli.errors import ConfigError, UsageError, quoted, quoted_spec
from stabledrl_cli.policies._spec import finite_number
from stabledrl_cli.replay.guard_rules import (
    GUARD_ACTIONS,
    GUARD_COLLECTS,
    Guard,
    GuardAction,
    GuardDecision,
    SkipStep,
    ZClip,
)
from stabledrl_cli.spec import (
    SPEC_SYNTAX,
    SpecError,
    format_spec,
    spec_int,
    split_spec,
)
from stabledrl_cli.vocab import GUARD_ACTION_CODES, GuardStepAction

DEFAULT_GUARDS = ("zclip", "skip-step")
"""The guards a replay reports when none is named."""


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
    collected: int = 0
    """Steps whose grad norm its statistics took in (`collects`): both guards leave out norms
    of 0 and non-finite ones."""
    own: bool = False
    """The run's own guard rule (`meta.guard.rule`), replayed over the grad norms with the loss
    its guard was given (`guard_loss`), as the in-training guard saw the steps (`OwnGuard`)."""
    agreement: GuardAgreement | None = None
    """For the run's own rule: the decisions its guard recorded against the replayed ones."""

    def __repr__(self) -> str:
        """The fields, a long list of steps as its first items and its length."""
        return compact_repr(self)

    @property
    def collects(self) -> str:
        """The grad norms the guard's statistics take in (`nonzero finite`)."""
        return GUARD_COLLECTS[split_spec(self.spec)[0]]

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
            "own": self.own,
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
        }


AGREEMENT_LIMIT = 10
"""Steps of disagreement a `GuardAgreement` names (the first ones); it counts them all."""


@dataclass(frozen=True)
class GuardAgreement:
    """The run's own guard's recorded decisions (its rule's `guard_rule_action`, else
    `guard_action`) against its rule replayed over the same grad norms and losses: they differ
    only where the guard saw other numbers (a resume without the saved guard; in a run
    recorded before `guard_rule_action` and `guard_loss`, its batch rule or a loss)."""

    compared: int
    """Steps with a recorded grad norm and decision (`guard_rule_action` or `guard_action`)."""
    disagree: int
    """Those whose recorded action is not the replayed rule's."""
    steps: list[int] = field(default_factory=list)
    """The first `AGREEMENT_LIMIT` of them."""

    def to_dict(self) -> dict[str, object]:
        return {"compared": self.compared, "disagree": self.disagree, "steps": list(self.steps)}


@dataclass(frozen=True)
class OwnGuard:
    """The guard a run was recorded under (its `meta.guard`, `stabledrl_cli.guard`)."""

    spec: str
    """Its grad-norm rule's canonical spec."""
    mode: str
    """skip | scale: how a clip of the rule was recorded (`guard_action` 1 scale, 2 skip)."""

    def action_code(self, action: GuardAction) -> int:
        """The `guard_action` the guard records for the rule's `action` (`step_action`)."""
        return GUARD_ACTION_CODES[step_action(action, self.mode)]


def step_action(action: GuardAction, mode: str) -> GuardStepAction:
    """What an in-training guard in `mode` does to a step its rule decided `action` on: a
    clip scales it under mode scale and skips it under mode skip; a skip and a non-finite
    step are skipped."""
    if action == "none":
        return "none"
    return "scale" if action == "clip" and mode == "scale" else "skip"


def own_guard(meta: object) -> OwnGuard | None:
    """The run's own guard from its manifest's `meta` (`meta.guard`: `mode`, `rule`); None
    for a run without one, or with one this version cannot replay (not refused: the replay
    of the rest goes on)."""
    note = meta.get("guard") if isinstance(meta, Mapping) else None
    if not isinstance(note, Mapping):
        return None
    rule, mode = note.get("rule"), note.get("mode")
    if not isinstance(rule, str) or mode not in ("skip", "scale"):
        return None
    try:
        return OwnGuard(spec=guard_spec(make_guard(rule)), mode=mode)
    except ConfigError:
        return None


def guard_agreement(
    own: OwnGuard, report: GuardReport, normed: Iterable[int], recorded: Mapping[int, float]
) -> GuardAgreement:
    """`own`'s rule's `report` (replayed over the steps `normed`, those with a grad norm)
    against the decision its guard recorded of each step (`recorded`: step -> code, its
    rule's own `guard_rule_action` where the guard recorded it, else its `guard_action`,
    which a skip of the batch rule may have replaced)."""
    replayed = {s.step: own.action_code(s.action) for s in report.acted}
    compared = sorted({int(n) for n in normed} & recorded.keys())
    differ = [n for n in compared if recorded[n] != replayed.get(n, 0)]
    return GuardAgreement(len(compared), len(differ), differ[:AGREEMENT_LIMIT])


GuardInput = tuple[int, float, float | None, float | None]
"""One recorded step as a guard sees it: (step, grad_norm, loss or None, the loss the run's
own guard was given, `guard_loss`, or None)."""


class GuardReplay:
    """Guards replayed over a recorded series as it grows: each step is fed once, in step
    order, and `reports` are those `replay_guards` gives over the series fed so far."""

    def __init__(self, specs: Iterable[str] = DEFAULT_GUARDS, own: str | None = None) -> None:
        """`own`: the run's own rule (`OwnGuard.spec`), replayed too unless no guard is, given
        the loss its guard was given (`guard_loss`; none where it had none), where it is named
        among `specs` too."""
        # A guard given twice, or two spellings of one, is replayed once, where first given.
        made: dict[str, Guard] = {}
        for guard in (make_guard(spec) for spec in specs):
            made.setdefault(guard_spec(guard), guard)
        if own is not None and made:
            made.setdefault(own, make_guard(own))
        self._own = [spec == own for spec in made]
        self._guards = list(made.values())
        self._acted: list[list[GuardedStep]] = [[] for _ in self._guards]
        self._judged = [0 for _ in self._guards]
        self._steps = 0

    def extend(self, series: Iterable[GuardInput]) -> None:
        """Feeds the next steps, in step order, to every guard."""
        self._steps += _feed(self._guards, self._own, self._acted, self._judged, series)

    def reports(self, pending: Iterable[GuardInput] = ()) -> list[GuardReport]:
        """One report a guard over the steps fed so far, then `pending` (steps that may still
        change: fed to copies of the guards, not kept)."""
        guards = copy.deepcopy(self._guards)
        later: list[list[GuardedStep]] = [[] for _ in guards]
        judged = list(self._judged)
        steps = self._steps + _feed(guards, self._own, later, judged, pending)
        return [
            GuardReport(
                spec=guard_spec(guard),
                steps_seen=steps,
                acted=acted + more,
                judged=count,
                collected=guard.collected,
                own=own,
            )
            for guard, own, acted, more, count in zip(
                guards, self._own, self._acted, later, judged, strict=True
            )
        ]


def _feed(
    guards: list[Guard],
    own: list[bool],
    acted: list[list[GuardedStep]],
    judged: list[int],
    series: Iterable[GuardInput],
) -> int:
    """Feeds `series` to each guard, appending the steps it acts on to its `acted` list and
    counting in `judged` those its rule decided (`GuardReport.judged`); the run's `own` rule
    is given the loss its guard was, the others the recorded loss. -> the steps fed."""
    fed = 0
    for step, norm, loss, guard_loss in series:
        fed += 1
        for i, (guard, found) in enumerate(zip(guards, acted, strict=True)):
            given = guard_loss if own[i] else loss
            decision = guard.update(float(norm), None if given is None else float(given))
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
    own: str | None = None,
    guard_losses: Mapping[int, float] | None = None,
) -> list[GuardReport]:
    """Runs each guard over the recorded (step, grad_norm) series in step order; `losses`
    (step -> loss) feeds skip-step where a step has one (a non-finite one makes the step
    `nonfinite` for every guard), but for the run's `own` rule, fed `guard_losses` (step ->
    the loss its guard was given, `GuardReplay`). -> one report a guard."""
    replay = GuardReplay(specs, own)
    replay.extend(
        (
            step,
            norm,
            None if losses is None else losses.get(step),
            None if guard_losses is None else guard_losses.get(step),
        )
        for step, norm in sorted(zip(steps, grad_norms, strict=True))
    )
    return replay.reports()


__all__ = [
    "DEFAULT_GUARDS",
    "GUARD_ACTIONS",
    "SPEC_SYNTAX",
    "GuardAgreement",
    "GuardDecision",
    "GuardInput",
    "GuardReplay",
    "GuardReport",
    "GuardedStep",
    "OwnGuard",
    "SkipStep",
    "ZClip",
    "guard_agreement",
    "make_guard",
    "own_guard",
    "replay_guards",
    "step_action",
]
