"""Rank tuned settings: discarded gradient against risk steps, the Pareto front, and one
recommendation with its evidence.

Per setting, from its replay summary (docs/replay-json.md):
- risk steps: the steps where the setting's replayed update is non-finite, spikes, or drifts
  (bias): the union of `collapsed_steps` (non-finite or spike) and `drift_steps`;
- discarded gradient: `discarded_mass_frac`, the median over steps of the share of the plain
  importance-sampling update the setting's rule throws away.
A setting is on the front when no other has at most as many risk steps and at most as much
discarded gradient, one of them strictly fewer. Two discarded gradients within `result.MASS_RTOL`
of each other are the same figure: the replay computes each token's term in float32, so a setting
that only rescales the loss (`agg=constant,max_len=L`) gives the same share a few float32 steps
apart. The recommendation is the front's setting with the fewest risk steps, then the least
discarded gradient, then the first given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stabledrl_cli.dump._live import LiveRead
from stabledrl_cli.replay.report import unjudged_lines
from stabledrl_cli.replay.result import PolicyResult, ReplayResult, same_mass


@dataclass(frozen=True, kw_only=True)
class SettingFigures:
    """One setting of a tune, summarized."""

    spec: str
    risk_steps: list[int]
    nonfinite_steps: int
    spike_steps: int
    drift_steps: int
    discarded_mass: float | None
    """Median per-step discarded_mass_frac; None when no step had a finite one."""
    discard_frac: float
    """Discarded / eligible tokens over the run."""
    on_front: bool = False
    tuned: bool = True
    """False for the run's own policy when it is shown only as a reference."""
    unjudged: dict[str, str] = field(default_factory=dict)
    """The rules (`spike`, `drift`) that judged no step of the setting, each with why
    (`PolicySummary.unjudged`): its count of them says nothing."""

    @property
    def mass_key(self) -> float:
        mass = self.discarded_mass
        return mass if mass is not None and math.isfinite(mass) else math.inf

    def to_dict(self) -> dict[str, object]:
        return {
            "spec": self.spec,
            "risk_steps": len(self.risk_steps),
            "nonfinite_steps": self.nonfinite_steps,
            "spike_steps": self.spike_steps,
            "drift_steps": self.drift_steps,
            "discarded_mass_frac": self.discarded_mass,
            "discard_frac": self.discard_frac,
            "on_front": self.on_front,
            "tuned": self.tuned,
            "first_risk_steps": self.risk_steps[:10],
            "unjudged": dict(self.unjudged),
        }


def figures_of(policy: PolicyResult, *, tuned: bool) -> SettingFigures:
    """A setting's figures from its replay summary."""
    summary = policy.summary
    collapsed, spikes = set(summary.collapsed_steps), set(summary.spike_steps)
    return SettingFigures(
        spec=policy.spec,
        risk_steps=sorted(collapsed | set(summary.drift_steps)),
        nonfinite_steps=len(collapsed - spikes),
        spike_steps=len(spikes),
        drift_steps=len(summary.drift_steps),
        discarded_mass=summary.discarded_mass_frac,
        discard_frac=summary.discard_frac,
        tuned=tuned,
        unjudged=dict(summary.unjudged),
    )


def _less_mass(a: float, b: float) -> bool:
    """Whether discarded gradient `a` is below `b` by more than rounding."""
    return a < b and not same_mass(a, b)


def _dominates(a: SettingFigures, b: SettingFigures) -> bool:
    no_worse = len(a.risk_steps) <= len(b.risk_steps) and not _less_mass(b.mass_key, a.mass_key)
    better = len(a.risk_steps) < len(b.risk_steps) or _less_mass(a.mass_key, b.mass_key)
    return no_worse and better


@dataclass(frozen=True)
class TuneReport:
    """Every setting (the tuned ones in the order given, then the own policy's reference),
    the recommended one and why."""

    run: str
    steps: int
    settings: list[SettingFigures]
    recommended: SettingFigures | None
    evidence: str
    threads: int
    """CPU threads the replay computed with (`ReplayConfig.threads`; the figures do not depend
    on it)."""
    unjudged: list[str] = field(default_factory=list)
    """A line for each rule that judged no step of some setting (`report.unjudged_lines`)."""
    live: LiveRead | None = None
    """The run was being recorded when replayed (`ReplayResult.live`)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "run": self.run,
            "steps": self.steps,
            "threads": self.threads,
            "settings": [s.to_dict() for s in self.settings],
            "front": [s.spec for s in self.settings if s.on_front],
            "recommended": None if self.recommended is None else self.recommended.spec,
            "evidence": self.evidence,
            "live": None if self.live is None else self.live.to_dict(),
        }


def rank(result: ReplayResult, tuned: list[str]) -> TuneReport:
    """The front and the recommendation over the settings `tuned` (canonical specs) of a
    replay; other replayed policies (the own one) are shown as references."""
    wanted = set(tuned)
    figures = [figures_of(p, tuned=p.spec in wanted) for p in result.policies]
    candidates = [f for f in figures if f.tuned]
    front = {
        f.spec for f in candidates if not any(_dominates(o, f) for o in candidates if o is not f)
    }
    order = {spec: i for i, spec in enumerate(tuned)}
    settings = sorted(
        (SettingFigures(**{**f.__dict__, "on_front": f.spec in front}) for f in figures),
        key=lambda f: (not f.tuned, order.get(f.spec, len(order))),
    )
    on_front = [f for f in settings if f.on_front]
    best: SettingFigures | None = None
    evidence = "no setting was replayed"
    if on_front:  # the front's settings at one count of risk steps discard the same gradient
        best = min(on_front, key=lambda f: (len(f.risk_steps), order[f.spec]))
        evidence = _evidence(best, candidates)
    return TuneReport(
        result.run,
        result.steps,
        settings,
        best,
        evidence,
        result.threads,
        unjudged_lines(result),
        result.live,
    )


def percent(mass: float | None) -> str:
    return "n/a" if mass is None or not math.isfinite(mass) else f"{100 * mass:.1f}%"


def _evidence(best: SettingFigures, candidates: list[SettingFigures]) -> str:
    safe = [f for f in candidates if not f.risk_steps]
    count = len(candidates)
    if not best.risk_steps:
        unjudged = ""
        if best.unjudged:
            rules = " and ".join(sorted(best.unjudged, reverse=True))
            unjudged = (
                f"; but the {rules} {'rule' if len(best.unjudged) == 1 else 'rules'} judged no "
                "step of it, so its 0 risk steps say nothing"
            )
        return (
            f"no risk step over the run ({len(safe)} of {count} settings have none), and the "
            f"least discarded gradient among them ({percent(best.discarded_mass)} median "
            f"per step){unjudged}"
        )
    fewest = len(best.risk_steps)
    return (
        f"every setting has risk steps; {best.spec} has the fewest ({fewest}: "
        f"{best.nonfinite_steps} non-finite, {best.spike_steps} spike, {best.drift_steps} "
        f"bias), then the least discarded gradient ({percent(best.discarded_mass)})"
    )
