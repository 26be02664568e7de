"""The figures a gate compares: how each is measured from a policy's summary, the direction
in which it is worse, and the default slack of a written baseline."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from stabledrl_cli.replay import columns
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.result import PolicySummary
from stabledrl_cli.vocab import Worse

RUN_STEPS = ("first_reward_collapse", "collapse_warning_first_step")
"""Run-level steps of a baseline's `observed` entry: the observed collapse step and the
collapse warning's first step, each worse when lower, null meaning never."""
RUN_COUNTS = ("spike_steps", "nonfinite_steps")
"""Run-level counts of a baseline's `observed` entry, from the recorded series: steps whose
recorded grad_norm is a spike, and non-finite steps (a verl recording's training steps that
hold one, as verl's log counts them: `Observed.counted_nonfinite`); each worse when
higher."""
RUN_METRICS = (*RUN_STEPS, *RUN_COUNTS)
"""Every figure a baseline's `observed` entry may hold (each optional)."""
RUN_WORSE: dict[str, Worse] = {
    **dict.fromkeys(RUN_STEPS, "lower"),
    **dict.fromkeys(RUN_COUNTS, "higher"),
}


def run_figure(name: str, observed: Observed) -> float | None:
    """A run-level figure of the recorded run (None: never, i.e. infinity)."""
    if name == "spike_steps":
        return float(len(observed.recorded_spike_steps))
    if name == "nonfinite_steps":
        return float(len(observed.counted_nonfinite()[0]))
    step = (
        observed.first_reward_collapse
        if name == "first_reward_collapse"
        else observed.collapse_warning.first_step
    )
    return None if step is None else float(step)


def run_flagged_steps(name: str, observed: Observed) -> tuple[list[int], str]:
    """(the steps a run-level count of the recorded run counts, what they are: "step", or
    "training step" for a verl recording's non-finite ones); [] for a figure that is a step
    itself."""
    if name == "spike_steps":
        return list(observed.recorded_spike_steps), "step"
    if name == "nonfinite_steps":
        return observed.counted_nonfinite()
    return [], "step"


@dataclass(frozen=True, kw_only=True)
class MetricRule:
    """How a baseline metric is measured and its default tolerance."""

    worse: Worse
    """The direction in which a change is a regression."""
    abs_tol: float
    """Absolute slack, in the metric's unit."""
    rel_tol: float
    """Relative slack, a fraction of the baseline value."""
    measure: Callable[[PolicySummary], float | None]
    """The figure from a policy's summary (None: infinity)."""
    integer: bool = False
    """A count: a strict baseline compares it exactly."""
    flagged: Callable[[PolicySummary], list[int]] | None = None
    """The steps a count counts, in step order (None: not a count of steps)."""


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# Default tolerances. Replays are deterministic on one CPU; across machines float noise moves
# norms by ~1e-6 relative, so the slack below is for deliberate hand-loosening, not noise:
# counts may grow by 10% (a flagged step more on a run with 10), a discard fraction by
# 0.2 percentage points plus 5%, update norms by 5% (median) and 10% (max, a single step).
BUILTIN_METRICS: dict[str, MetricRule] = {
    "collapsed_steps": MetricRule(
        worse="higher",
        abs_tol=0.0,
        rel_tol=0.1,
        measure=lambda s: float(len(s.collapsed_steps)),
        integer=True,
        flagged=lambda s: s.collapsed_steps,
    ),
    "drift_steps": MetricRule(
        worse="higher",
        abs_tol=0.0,
        rel_tol=0.1,
        measure=lambda s: float(len(s.drift_steps)),
        integer=True,
        flagged=lambda s: s.drift_steps,
    ),
    "discard_frac": MetricRule(
        worse="higher", abs_tol=0.002, rel_tol=0.05, measure=lambda s: _finite(s.discard_frac)
    ),
    "update_norm_median": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.05, measure=lambda s: _finite(s.update_norm_median)
    ),
    "update_norm_max": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.1, measure=lambda s: _finite(s.update_norm_max)
    ),
}
STRICT_REL_TOL = 1e-4
"""A strict (golden) baseline: counts exact, floats to 1e-4 relative. CPU replays repeat bit
for bit, with any thread count; across CPUs norms move by ~1e-6 relative, well inside it."""


def _column_rule(figure: str, gate: columns.ColumnGate) -> MetricRule:
    return MetricRule(
        worse=gate.worse,
        abs_tol=gate.abs_tol,
        rel_tol=gate.rel_tol,
        measure=lambda s: _finite(s.column_figures.get(figure)),
        integer=gate.aggregate == "count",
    )


def policy_metrics() -> dict[str, MetricRule]:
    """Every per-policy figure a baseline may hold: the built-in ones, then the whole-run
    figures of gated columns (`columns.Column.gate`), in declaration order."""
    rules = dict(BUILTIN_METRICS)
    for column in columns.gated_columns():
        if column.figure is not None and column.gate is not None:
            rules[column.figure] = _column_rule(column.figure, column.gate)
    return rules
