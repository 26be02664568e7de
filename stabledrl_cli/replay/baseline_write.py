"""Writing a baseline file (`stabledrl check --write-baseline`): today's figures with default
or strict tolerances, as JSON whose every float reads back exactly."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from decimal import Decimal
from pathlib import Path

from stabledrl_cli._atomic import write_output
from stabledrl_cli._json import stand_in, unicode_text
from stabledrl_cli._version import __version__
from stabledrl_cli.replay.baseline import (
    BASELINE_SCHEMA,
    BASELINE_VERSION,
    FINITE_UPDATE_METRICS,
    ReplaySettings,
    Tolerance,
    no_finite_update,
    unjudged_metric,
)
from stabledrl_cli.replay.figures import (
    RUN_COUNTS,
    RUN_METRICS,
    STRICT_REL_TOL,
    policy_metrics,
    run_figure,
)
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.recorded import (
    NONFINITE,
    NONFINITE_RULE,
    SERIES_RULES,
    RecordedRun,
    observed_of,
)
from stabledrl_cli.replay.result import PolicyResult, ReplayResult


def _observed_entry(name: str, observed: Observed, *, window: int, strict: bool) -> Tolerance:
    """A run-level figure's entry: steps resolve to within W (the observed-collapse window),
    the collapse step to within the steps its W reward draws span (W rollouts of mu steps
    each: W mu); counts may grow by 10%."""
    figure = run_figure(name, observed)
    if name in RUN_COUNTS:
        return Tolerance(value=figure, worse="higher", rel_tol=0.0 if strict else 0.1)
    if name == "first_reward_collapse":
        window *= observed.reward_draw_steps
    return Tolerance(value=figure, worse="lower", abs_tol=0.0 if strict else float(window))


def _recorded_entries(recorded: RecordedRun, *, strict: bool) -> dict[str, object]:
    """The `recorded` section: each standard scalar the run recorded, its rule's statistics."""
    section: dict[str, object] = {}
    for name, rule in SERIES_RULES.items():
        stats = recorded.series.get(name)
        if stats is None:
            continue
        entries = {}
        gated = [(stat, rule) for stat in rule.stats]
        if rule.gates_nonfinite:
            gated.append((NONFINITE, NONFINITE_RULE))
        for stat, how in gated:
            value = stats.stat(stat)
            if value is None:
                continue
            count = stat == NONFINITE
            tolerance = Tolerance(
                value=value,
                worse=how.worse,
                abs_tol=0.0 if strict else how.abs_tol,
                rel_tol=(0.0 if count else STRICT_REL_TOL) if strict else how.rel_tol,
            )
            if tolerance.bounded():  # else a gate that could never trip, which a reader refuses
                entries[stat] = tolerance.to_dict()
        if entries:
            section[name] = entries
    return section


def baseline_figure(p: PolicyResult, name: str) -> float | None:
    """The figure of the policy metric `name` that `--write-baseline` records for `p`; None
    where it leaves it out: no finite value, or a figure that says nothing (every update
    non-finite, `no_finite_update`; a rule that judged no step, `unjudged_metric`)."""
    value = policy_metrics()[name].measure(p.summary)
    silent = name in FINITE_UPDATE_METRICS and no_finite_update(p) is not None
    if value is None or silent or unjudged_metric(p, name) is not None:
        return None
    return value


def baseline_dict(
    result: ReplayResult | None,
    settings: ReplaySettings,
    *,
    strict: bool = False,
    recorded: RecordedRun | None = None,
    loss_norm: str = "global",
) -> dict[str, object]:
    """Today's figures as a baseline, ready for `write_baseline`: default tolerances, or with
    `strict` a golden baseline (float-noise tolerances, and shifts either way trip).

    result: the replay (None for a run without a policy batch: no policy entries);
    recorded: the run's recorded series (None: no `recorded` section; required without a
    replay); loss_norm: what the replay normalised over (`run_facts.replayed_loss_norm`),
    written of a replay."""
    observed = observed_of(result, recorded)
    policies: dict[str, object] = {}
    for p in result.policies if result is not None else []:
        metrics: dict[str, object] = {}
        for name, rule in policy_metrics().items():
            if strict:
                abs_tol, rel_tol = 0.0, 0.0 if rule.integer else STRICT_REL_TOL
            else:
                abs_tol, rel_tol = rule.abs_tol, rule.rel_tol
            value = baseline_figure(p, name)
            if value is None:
                continue  # no finite value, or a figure that says nothing: nothing to gate
            tolerance = Tolerance(value=value, worse=rule.worse, abs_tol=abs_tol, rel_tol=rel_tol)
            if not tolerance.bounded():
                continue  # a gate that could never trip, which a reader refuses
            entry = tolerance.to_dict(integer=rule.integer)
            steps = {
                "collapsed_steps": p.summary.collapsed_steps,
                "drift_steps": p.summary.drift_steps,
            }
            if name in steps:
                entry["first"] = steps[name][0] if steps[name] else None
            metrics[name] = entry
        policies[p.spec] = metrics
    if result is not None:
        path, count, policy = result.run, result.steps, result.run_policy_spec
    else:
        assert recorded is not None
        path, count, policy = recorded.run, recorded.steps, recorded.policy
    # A path's bytes that are not UTF-8 as \xNN, not the lone surrogates no reader takes back.
    run = {"path": unicode_text(path), "steps": count, "policy": policy}
    if recorded is not None and recorded.training_steps is not None:
        run["training_steps"] = recorded.training_steps  # a verl recording's, as verl logs them
    if result is not None:
        run["loss_norm"] = loss_norm
    return {
        "schema": BASELINE_SCHEMA,
        "version": BASELINE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "strict": strict,
        "run": run,
        "replay": settings.to_dict(),
        "observed": {
            name: _observed_entry(
                name, observed, window=settings.collapse_window, strict=strict
            ).to_dict(integer=True)
            for name in RUN_METRICS
            if observed.unjudged(name) is None  # else a gate that could never trip
        },
        **({"recorded": _recorded_entries(recorded, strict=strict)} if recorded else {}),
        "policies": policies,
    }


EXPONENT_FROM = 1e6
"""Floats of this magnitude or more are written with an exponent (8.68e+12)."""


def _float_text(value: float) -> str:
    """The shortest text of `value` that reads back exactly, with an exponent from 1e6 on."""
    if abs(value) < EXPONENT_FROM:
        return repr(value)
    return f"{Decimal(repr(value)).normalize():e}"


def baseline_text(data: dict[str, object]) -> str:
    """A baseline as JSON text: integers plainly, every float as a float (a large one with an
    exponent, never a 30-digit integer)."""
    floats: list[float] = []
    float_mark = stand_in(data, "float")

    def mark(value: object) -> object:
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, float):
            floats.append(value)
            return float_mark.format(len(floats) - 1)
        return value

    text = json.dumps(mark(data), indent=2, allow_nan=False)
    for i, value in enumerate(floats):
        if not math.isfinite(value):
            raise ValueError(f"a baseline cannot hold {value!r}")
        text = text.replace(json.dumps(float_mark.format(i)), _float_text(value), 1)
    return text + "\n"


def write_baseline(data: dict[str, object], path: str | os.PathLike[str]) -> Path:
    """Writes a baseline (`baseline_dict`) atomically, or in place (`_atomic.write_output`);
    WriteError when it cannot."""
    return write_output(path, baseline_text(data).encode())
