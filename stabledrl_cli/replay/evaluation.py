"""Every gate of a check, evaluated in a stable order, passed or tripped: the absolute limits
(`gate.py`) and the regressions against a baseline (`baseline.py`).

A policy in the baseline that the check did not replay (a policy list that leaves it out, or
a spec the catalogue renamed) is a tripped gate `baseline.present`: CI must not pass by
silently checking less than the baseline covers. So is a recorded series the baseline gates
that the run did not record, and a baseline's `observed` figure whose rule judged no step of
the run (`Observed.unjudged`), or a policy figure whose rule judged no step of the policy
(`baseline.unjudged_metric`: collapsed_steps, drift_steps).
"""

from __future__ import annotations

import math

from stabledrl_cli.errors import key_shown, quoted
from stabledrl_cli.replay._format import format_figures, format_written
from stabledrl_cli.replay.baseline import (
    FINITE_UPDATE_METRICS,
    Baseline,
    Tolerance,
    no_finite_update,
    unjudged_metric,
)
from stabledrl_cli.replay.figures import RUN_STEPS, policy_metrics, run_figure, run_flagged_steps
from stabledrl_cli.replay.gate import (
    GateResult,
    Gates,
    LostSteps,
    absolute,
    run_absolute,
    steps_shown,
)
from stabledrl_cli.replay.recorded import NONFINITE, RecordedRun, observed_of
from stabledrl_cli.replay.result import ReplayResult


def _absent(policy: str | None, message: str, subject: str | None = None) -> GateResult:
    """`baseline.present`, tripped: the baseline gates what the check has no figure of
    (`subject`; None: the policy itself)."""
    return GateResult(
        policy=policy,
        gate="baseline.present",
        ok=False,
        figure=None,
        limit=None,
        message=message,
        subject=subject,
    )


def _recorded_regressions(
    recorded: RecordedRun | None, baseline: Baseline, *, strict: bool
) -> list[GateResult]:
    found = []
    series = recorded.series if recorded is not None else {}
    for name, stats in baseline.recorded.items():
        for stat, tol in stats.items():
            figure = series[name].stat(stat) if name in series else None
            # a crafted name of megabytes goes whole into the JSON's gate only: cut elsewhere
            key, label = f"recorded.{name}.{stat}", f"recorded.{key_shown(name)}.{stat}"
            if figure is None:
                found.append(
                    _absent(
                        None,
                        f"recorded series {quoted(name)} ({stat}) is in the baseline but the run "
                        + ("has no finite value of it" if name in series else "did not record it"),
                        label,
                    )
                )
                continue
            count = stat == NONFINITE
            found.append(
                _regression(None, key, tol, figure, strict=strict, count=count, label=label)
            )
    return found


def _passed_at(steps: list[int], limit: float, unit: str = "step") -> str:
    """Where a count of flagged `steps` (in step order; each a `unit`: a step, or a verl
    recording's training step) went past `limit`, and the steps."""
    if not steps or len(steps) <= limit:
        return ""
    past = steps[max(0, math.floor(limit))]
    return f"; past it at {unit} {past} ({steps_shown(steps, unit)})"


def _regression(
    policy: str | None,
    name: str,
    tol: Tolerance,
    figure: float | None,
    *,
    strict: bool,
    count: bool = False,
    flagged: list[int] | None = None,
    unit: str = "step",
    label: str | None = None,
) -> GateResult:
    """A baseline metric's gate; count: the figure counts steps or is a step (shown whole);
    flagged: the steps such a count counts (each a `unit`), named when it trips; label: `name`
    as a reader sees it, where it holds a value of an input (`errors.key_shown`; None: `name`)."""
    tripped = tol.tripped(figure)
    improved = strict and not tripped and tol.improved(figure)
    # null is infinity: for a run-level step (a collapse, a warning) it means "none", for a
    # figure worse when higher (a norm of NaN updates only) it is the worst there is.
    none = "none" if name.split(".")[-1] in RUN_STEPS else "inf"
    shown, base, limit = format_figures(figure, tol.value, tol.limit(), count=count)
    if figure is None:
        shown = "inf (no finite value)" if none == "inf" and tol.value is not None else none
    if tol.value is None:
        base = none
    side = "above" if tol.worse == "higher" else "below"
    slack = f"abs_tol {format_written(tol.abs_tol)}, rel_tol {format_written(tol.rel_tol)}"
    if improved:
        rule = f"better than the baseline beyond its tolerance ({slack}); --strict fails on it"
    elif tol.value is None:  # worse "lower": a baseline refuses a null worse when higher
        rule = f"any figure but {none} fails"
    elif tripped:
        rule = f"{side} the limit {limit} ({slack})" + _passed_at(flagged or [], tol.limit(), unit)
    else:
        rule = f"fails {side} {limit} ({slack})"
    label = name if label is None else label
    return GateResult(
        policy=policy,
        gate=f"baseline.{name}",
        ok=not (tripped or improved),
        figure=math.inf if figure is None else figure,
        limit=tol.limit(),
        count=count,
        message=f"{label} {shown}, baseline {base}: {rule}",
        shown_gate=None if label == name else f"baseline.{label}",
    )


def evaluate(
    result: ReplayResult | None,
    gates: Gates,
    baseline: Baseline | None,
    *,
    strict: bool = False,
    recorded: RecordedRun | None = None,
    lost: LostSteps | None = None,
    short_of_baseline: str | None = None,
) -> list[GateResult]:
    """Every gate, passed or tripped, in a stable order: the run's, then each policy's.

    result: the replay (None for a run without a policy batch: no policy is checked, and a
    policy the baseline names trips `baseline.present`); recorded: the run's recorded series
    and observed behaviour (None: the replay's observed behaviour, and no recorded series).
    strict: a baseline figure that moved beyond its tolerance in either direction trips (for
    a project's own golden runs, where any shift must be acknowledged by a new baseline).
    lost: the steps the run lacks, for --max-lost-steps (None: none). short_of_baseline: why
    the run has too few steps for the baseline (its run's), a tripped `baseline.present`."""
    observed = observed_of(result, recorded)
    found: list[GateResult] = []
    if short_of_baseline is not None:
        found.append(_absent(None, short_of_baseline, "run.steps"))
    if baseline is not None:
        for name, tol in baseline.observed.items():
            why = observed.unjudged(name)
            if why is not None:
                found.append(
                    _absent(
                        None, f"observed.{name} is in the baseline, but {why}", f"observed.{name}"
                    )
                )
                continue
            figure = run_figure(name, observed)
            flagged, unit = run_flagged_steps(name, observed)
            found.append(
                _regression(
                    None,
                    f"observed.{name}",
                    tol,
                    figure,
                    strict=strict,
                    count=True,
                    flagged=flagged,
                    unit=unit,
                )
            )
    found.extend(run_absolute(observed, gates, lost or LostSteps()))
    if baseline is not None:
        found.extend(_recorded_regressions(recorded, baseline, strict=strict))
    policies = result.policies if result is not None else []
    rules = policy_metrics()
    for p in policies:
        found.extend(absolute(p, gates))
        if baseline is None:
            continue
        unjudged = no_finite_update(p, named=True)
        for name, tol in baseline.policies.get(p.spec, {}).items():
            if unjudged is not None and name in FINITE_UPDATE_METRICS:
                found.append(_absent(p.spec, f"{name} is in the baseline, but {unjudged}", name))
                continue
            figure = rules[name].measure(p.summary)
            why = unjudged_metric(p, name)
            if why is not None and not tol.tripped(figure):  # beyond it, judged: a trip
                found.append(
                    _absent(
                        p.spec,
                        f"{name} is in the baseline, but for {p.spec!r} it is not judged: {why}",
                        name,
                    )
                )
                continue
            if figure is None and tol.worse == "lower":  # none read as infinity would pass
                found.append(
                    _absent(
                        p.spec,
                        f"{name} is in the baseline, but {p.spec!r} has no finite value of it",
                        name,
                    )
                )
                continue
            rule = rules[name]
            steps = rule.flagged(p.summary) if rule.flagged is not None else None
            found.append(
                _regression(
                    p.spec, name, tol, figure, strict=strict, count=rule.integer, flagged=steps
                )
            )
    if baseline is not None:
        replayed = {p.spec for p in policies}
        for spec in baseline.policies:
            if spec not in replayed:
                found.append(
                    _absent(spec, f"policy {spec!r} is in the baseline but was not checked")
                )
    return found
