"""The baseline file of `stabledrl check`: its tolerances, the replay settings a check against
it uses, and the policy figures that say nothing; `baseline_read` reads and validates one,
`baseline_write` writes one.

A baseline is versioned JSON, written by `stabledrl check RUN --write-baseline FILE` and
editable by hand:

    {"schema": "stabledrl-baseline", "version": 1, "created": "...", "tool_version": "0.1.0",
     "strict": false,
     "run": {"path": "fixtures/demo", "steps": 120, "policy": "grpo", "loss_norm": "global"},
     "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1,
                "collapse_window": 10},
     "observed": {"first_reward_collapse": {"value": 87, "worse": "lower", "abs_tol": 10,
                                            "rel_tol": 0.0},
                  "spike_steps": {"value": 2, "worse": "higher", "abs_tol": 0, "rel_tol": 0.1}},
     "recorded": {"clip_frac": {"mean": {"value": 0.12, "worse": "higher", "abs_tol": 0.01,
                                         "rel_tol": 0.1}}},
     "policies": {"grpo": {"collapsed_steps": {"value": 3, "worse": "higher",
                                               "abs_tol": 0, "rel_tol": 0.1}, ...}}}

`run` notes the run the figures came from; its `loss_norm` (of a replay: what it normalised
over, "global" for a run of one rank) must be the checked run's when the baseline gates a
policy, whose figures are of another loss else (`check` refuses, exit 3).

`observed` holds run-level figures of the recorded run: the steps `first_reward_collapse` and
`collapse_warning_first_step` (worse lower) and the counts `spike_steps` (recorded grad-norm
spikes) and `nonfinite_steps` (worse higher; of a verl recording, its training steps that
hold one, as verl's log counts them); a figure whose rule judged no step of the run
(`Observed.unjudged`: no reward to judge, say) is not written, and a check on such a run trips
`baseline.present` for it. `recorded` (optional) gates the run's recorded
scalar series, any of them: name -> statistic (first, last, min, max, mean, median over the
finite values, tail: the mean of the last 10) -> tolerance; `worse` may be left out for the
standard scalars that have a direction (`recorded.SERIES_RULES`) and must be given for any
other. A series the baseline names that the run did not record (or recorded with no finite
value) trips. `policies` must be there but may be empty (`{}`): a run without a policy batch
(an imported log) is gated on `observed` and `recorded` alone. A baseline with no tolerance at
all (no observed figure, recorded statistic or policy metric) is refused: it gates nothing; so
is one naming more policies than `policies.MAX_POLICIES` (a check replays each).

Each metric trips when today's figure is worse than `value` by more than
`abs_tol + rel_tol * |value|` in the direction `worse` ("higher": a larger figure is worse;
"lower": a smaller one), summed in decimal (`Tolerance.limit`: a figure exactly on the bound
passes). `null` stands for infinity: no observed collapse (never); with worse
"higher" it is refused, a gate that could never trip (`--write-baseline` leaves out a figure
it would be: no finite update norm, and `FINITE_UPDATE_METRICS` of a policy whose every update
is non-finite), as is a figure whose slack puts its limit past the largest float (refused on
reading: `Tolerance.bounded`). Other keys of a metric's entry (e.g. `first`, the
first flagged step) are notes for the reader and are not compared; another key at the top or
under `replay` is refused (`baseline_read.BASELINE_KEYS`).

A strict baseline (`"strict": true`, written with `strict`, for a project's own deterministic
golden runs) has float-noise tolerances (counts exact, floats to 1e-4 relative), and a figure
beyond its tolerance in the better direction trips too: any shift must be acknowledged by
rewriting the baseline.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from decimal import Context, Decimal
from typing import Any

import numpy as np

from stabledrl_cli.errors import ConfigError, counted
from stabledrl_cli.replay.config import (
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_SPIKE_FACTOR,
    DEFAULT_WINDOW,
    ReplayConfig,
)
from stabledrl_cli.replay.result import PolicyResult
from stabledrl_cli.vocab import SeriesStat, Worse

BASELINE_SCHEMA = "stabledrl-baseline"
BASELINE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ReplaySettings:
    """The replay settings a baseline records: a check replays with them."""

    spike_factor: float = DEFAULT_SPIKE_FACTOR
    window: int = DEFAULT_WINDOW
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD
    collapse_window: int = DEFAULT_COLLAPSE_WINDOW
    """W of the observed-collapse rule (a baseline without it was written with 10)."""

    def to_dict(self) -> dict[str, float | int]:
        """The baseline's `replay` entry."""
        return asdict(self)


_EXACT = Context(prec=80)
"""Decimal arithmetic for a tolerance's bounds: two 17-digit numbers' sum and product exact
(but for a sum across 60 orders of magnitude, rounded far below a float's precision)."""


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """One baseline metric: its value, the direction of harm and the allowed slack."""

    value: float | None
    """None: infinity (never collapsed). A baseline file refuses it where worse is "higher":
    no figure is above infinity, so the gate could never trip."""
    worse: Worse
    abs_tol: float = 0.0
    rel_tol: float = 0.0

    def _bound(self, *, worse: bool) -> float:
        """`value` moved by the slack towards worse (or better), summed in decimal: the bound of
        the numbers as the file writes them (0.1 and abs_tol 0.7: 0.8), where a float sum may
        miss it by a rounding (0.7999999999999999) and trip a figure exactly on it."""
        assert self.value is not None
        value = Decimal(repr(self.value))
        slack = _EXACT.add(
            Decimal(repr(self.abs_tol)), _EXACT.multiply(Decimal(repr(self.rel_tol)), abs(value))
        )
        up = worse == (self.worse == "higher")
        return float(_EXACT.add(value, slack) if up else _EXACT.subtract(value, slack))

    def limit(self) -> float:
        """The worst figure that still passes."""
        if self.value is None or math.isinf(self.value):
            return math.inf
        return self._bound(worse=True)

    def bounded(self) -> bool:
        """The limit is a float: a finite value whose slack puts it past the largest float
        (1.7e308 with rel_tol 0.25) is a gate no figure could cross."""
        return math.isfinite(self.limit())

    def tripped(self, figure: float | None) -> bool:
        """Worse than the limit (None: infinity; NaN always trips)."""
        current = math.inf if figure is None else figure
        if math.isnan(current):
            return True  # a figure that is not a number cannot be shown to be no worse
        limit = self.limit()
        return current > limit if self.worse == "higher" else current < limit

    def improved(self, figure: float | None) -> bool:
        """Better than `value` by more than the slack (what a strict check also fails on)."""
        current = math.inf if figure is None else figure
        value = math.inf if self.value is None else self.value
        if math.isnan(current) or current == value:
            return False
        if math.isinf(value) or math.isinf(current):
            return True  # from or to infinity: a change in kind (a collapse gone, norms finite)
        better = self._bound(worse=False)
        return current < better if self.worse == "higher" else current > better

    def to_dict(self, *, integer: bool = False) -> dict[str, object]:
        """The baseline file's entry; `integer`: the value is a count or a step, written as an
        integer (any other value stays a float, however whole: 8.68e12, never 13 digits)."""
        data: dict[str, object] = asdict(self)
        if integer and self.value is not None and float(self.value).is_integer():
            data["value"] = int(self.value)
        return data


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """A parsed baseline file."""

    path: str
    run: dict[str, object]
    """Notes on the run it was written from (path, steps, policy)."""
    replay: ReplaySettings
    observed: dict[str, Tolerance]
    """Run-level metric -> tolerance."""
    policies: dict[str, dict[str, Tolerance]]
    """canonical spec -> metric -> tolerance."""
    recorded: dict[str, dict[SeriesStat, Tolerance]] = field(default_factory=dict)
    """recorded scalar -> statistic -> tolerance."""
    strict: bool = False
    """A golden baseline: a figure beyond its tolerance in either direction trips."""


def check_settings(
    baseline: Baseline | None,
    *,
    spike_factor: float | None = None,
    window: int | None = None,
    drift_threshold: float | None = None,
    collapse_window: int | None = None,
) -> ReplaySettings:
    """The settings a check replays with: the baseline's (so it compares like with like),
    else the defaults, each overridden by a given value. A given value out of its range
    (`ReplayConfig`'s checks), or one that contradicts the baseline, is a `ConfigError`
    naming the setting."""
    given = {
        "spike_factor": spike_factor,
        "window": window,
        "drift_threshold": drift_threshold,
        "collapse_window": collapse_window,
    }
    overridden: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    ReplayConfig(**overridden)  # its checks, as a replay's
    if baseline is None:
        return ReplaySettings(
            spike_factor=DEFAULT_SPIKE_FACTOR if spike_factor is None else spike_factor,
            window=DEFAULT_WINDOW if window is None else window,
            drift_threshold=DEFAULT_DRIFT_THRESHOLD if drift_threshold is None else drift_threshold,
            collapse_window=DEFAULT_COLLAPSE_WINDOW if collapse_window is None else collapse_window,
        )
    recorded = baseline.replay.to_dict()
    for key, value in given.items():
        if value is not None and value != recorded[key]:
            raise ConfigError(
                key,
                f"{value!r} differs from the baseline's {recorded[key]!r} ({baseline.path}); a "
                "check compares like with like: drop it, or write a new baseline with it",
            )
    return baseline.replay


FINITE_UPDATE_METRICS = ("discard_frac", "drift_steps")
"""Policy figures measured on the steps whose replayed update is finite (a NaN ratio is never
clipped, a NaN push never drifts): of a policy with none, they say nothing."""


METRIC_RULES = {"collapsed_steps": "spike", "drift_steps": "drift"}
"""Policy figures that count the steps a rule flags, by the rule (`PolicySummary.unjudged`'s
key): where it judged no step of the policy, the count says nothing (non-finite updates only,
for collapsed_steps; always 0, for drift_steps)."""


def unjudged_metric(p: PolicyResult, name: str) -> str | None:
    """Why the rule counted by the policy figure `name` judged no step of the policy; None when
    it judged some, when every update is non-finite (every step is counted: nothing is left
    for the rule), or when `name` counts no rule's steps."""
    rule = METRIC_RULES.get(name)
    if rule is None or no_finite_update(p) is not None:
        return None
    return p.summary.unjudged.get(rule)


def no_finite_update(p: PolicyResult, *, named: bool = False) -> str | None:
    """Why `FINITE_UPDATE_METRICS` say nothing of the policy (`named`: naming it): every
    replayed step's update is non-finite; None when some is finite."""
    nonfinite = np.asarray(p.series["nonfinite"], dtype=bool)
    if not (nonfinite.size and nonfinite.all()):
        return None
    of = f" of {p.spec!r}" if named else ""
    return f"every replayed step's update{of} is non-finite ({counted(nonfinite.size, 'step')})"
