"""CI gates on a replay: absolute limits, regressions against a baseline file, JUnit XML.

A baseline is versioned JSON, written by `stabledrl check RUN --write-baseline FILE` and
editable by hand:

    {"schema": "stabledrl-baseline", "version": 1, "created": "...", "tool_version": "0.1.0",
     "strict": false,
     "run": {"path": "fixtures/demo", "steps": 120, "policy": "grpo", "unit": "sequence"},
     "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
     "observed": {"first_reward_collapse": {"value": 87, "worse": "lower", "abs_tol": 10,
                                            "rel_tol": 0.0}},
     "policies": {"grpo": {"collapsed_steps": {"value": 3, "worse": "higher",
                                               "abs_tol": 0, "rel_tol": 0.1}, ...}}}

Each metric trips when today's figure is worse than `value` by more than
`abs_tol + rel_tol * |value|` in the direction `worse` ("higher": a larger figure is worse;
"lower": a smaller one). `null` stands for infinity: no observed collapse (never), or no
finite update norm (every step non-finite). Other keys (e.g. `first`, the first flagged step)
are notes for the reader and are not compared.

A strict baseline (`"strict": true`, written by `--write-baseline FILE --strict`, for a
project's own deterministic golden runs) has float-noise tolerances (counts exact, floats to
1e-4 relative), and a figure beyond its tolerance in the better direction trips too: any shift
must be acknowledged by rewriting the baseline. `check --strict` applies that two-sided rule
to any baseline.

A policy in the baseline that the check did not replay (a `-p` list that leaves it out, or a
spec the catalogue renamed) is a tripped gate `baseline.present`: CI must not pass by
silently checking less than the baseline covers.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.detectors import collapse_window
from stabledrl_cli.replay.result import PolicyResult, ReplayResult

BASELINE_SCHEMA = "stabledrl-baseline"
BASELINE_VERSION = 1
WORSE = ("higher", "lower")
REPLAY_SETTINGS = ("spike_factor", "window", "drift_threshold")
RUN_CLASS = "stabledrl.run"  # JUnit classname of run-level gates


@dataclass(frozen=True, kw_only=True)
class MetricRule:
    """How a baseline metric is measured and its default tolerance."""

    worse: str
    """"higher" or "lower": the direction in which a change is a regression."""
    abs_tol: float
    """Absolute slack, in the metric's unit."""
    rel_tol: float
    """Relative slack, a fraction of the baseline value."""
    measure: Callable[[PolicyResult], float | None]
    """The figure from a policy's replay result (None: infinity)."""
    integer: bool = False


def _count(key: str) -> Callable[[PolicyResult], float]:
    return lambda p: float(len(p.summary[key]))


def _summary(key: str) -> Callable[[PolicyResult], float | None]:
    def measure(p: PolicyResult) -> float | None:
        value = p.summary.get(key)
        return None if value is None or not math.isfinite(value) else float(value)

    return measure


# Default tolerances. Replays are deterministic on one CPU; across machines float noise moves
# norms by ~1e-6 relative, so the slack below is for deliberate hand-loosening, not noise:
# counts may grow by 10% (a flagged step more on a run with 10), a discard fraction by
# 0.2 percentage points plus 5%, update norms by 5% (median) and 10% (max, a single step).
POLICY_METRICS: dict[str, MetricRule] = {
    "collapsed_steps": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.1, measure=_count("collapsed_steps"), integer=True
    ),
    "drift_steps": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.1, measure=_count("drift_steps"), integer=True
    ),
    "discard_frac": MetricRule(
        worse="higher", abs_tol=0.002, rel_tol=0.05, measure=_summary("discard_frac")
    ),
    "update_norm_median": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.05, measure=_summary("update_norm_median")
    ),
    "update_norm_max": MetricRule(
        worse="higher", abs_tol=0.0, rel_tol=0.1, measure=_summary("update_norm_max")
    ),
}
RUN_METRICS = ("first_reward_collapse",)
# A strict (golden) baseline: counts exact, floats to 1e-4 relative. CPU replays repeat
# bit for bit; across CPUs and thread counts norms move by ~1e-6 relative, well inside it.
STRICT_REL_TOL = 1e-4


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """One baseline metric: its value, the direction of harm and the allowed slack."""

    value: float | None
    """None: infinity (never collapsed; no finite update norm)."""
    worse: str
    abs_tol: float = 0.0
    rel_tol: float = 0.0

    def limit(self) -> float:
        """The worst figure that still passes."""
        value = math.inf if self.value is None else self.value
        if math.isinf(value):
            return value
        slack = self.abs_tol + self.rel_tol * abs(value)
        return value + slack if self.worse == "higher" else value - slack

    def tripped(self, figure: float | None) -> bool:
        """Worse than the limit (None: infinity; NaN always trips)."""
        current = math.inf if figure is None else figure
        if math.isnan(current):
            return True  # a figure that is not a number cannot be shown to be no worse
        limit = self.limit()
        return current > limit if self.worse == "higher" else current < limit

    def improved(self, figure: float | None) -> bool:
        """Better than `value` by more than the slack (what `--strict` also fails on)."""
        current = math.inf if figure is None else figure
        value = math.inf if self.value is None else self.value
        if math.isnan(current) or current == value:
            return False
        if math.isinf(value) or math.isinf(current):
            return True  # from or to infinity: a change in kind (a collapse gone, norms finite)
        slack = self.abs_tol + self.rel_tol * abs(value)
        return current < value - slack if self.worse == "higher" else current > value + slack

    def to_dict(self, **notes: Any) -> dict[str, Any]:
        data = asdict(self)
        if self.value is not None and float(self.value).is_integer():
            data["value"] = int(self.value)
        return {**data, **notes}


@dataclass(frozen=True, kw_only=True)
class Baseline:
    path: str
    run: dict[str, Any]
    replay: dict[str, Any]
    observed: dict[str, Tolerance]
    policies: dict[str, dict[str, Tolerance]]
    """canonical spec -> metric -> tolerance."""
    strict: bool = False
    """A golden baseline: a figure beyond its tolerance in either direction trips."""


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """One gate of one policy (policy None: a run-level gate)."""

    policy: str | None
    gate: str
    ok: bool
    figure: float | None
    limit: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("figure", "limit"):
            value = data[key]
            data[key] = value if value is None or math.isfinite(value) else None
        return data


@dataclass(frozen=True, kw_only=True)
class Gates:
    """The absolute gates; None: not checked."""

    max_collapsed: int | None = None
    """Collapsed steps (non-finite or spike) allowed per policy."""
    max_discard_frac: float | None = None
    """Largest discard fraction allowed per policy."""
    max_nonfinite: int | None = None
    """Steps with a non-finite replayed update allowed per policy."""

    def __post_init__(self) -> None:
        for name in ("max_collapsed", "max_nonfinite"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        frac = self.max_discard_frac
        if frac is not None and not (0.0 <= frac <= 1.0):
            raise UsageError(f"--max-discard-frac must be in [0, 1], got {frac}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


# --- the baseline file ------------------------------------------------------------------------
def format_figure(value: float | None) -> str:
    """A gate's figure for people: integers plain, floats to 4 digits, None as "never"."""
    if value is None or math.isinf(value):
        return "never" if value is None else ("inf" if value > 0 else "-inf")
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def _number(data: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> Any:
    value = data.get(key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _tolerance(data: Any, where: str, default_worse: str) -> Tolerance:
    if not isinstance(data, dict):
        raise InputError(f"{where} must be an object with value, worse, abs_tol, rel_tol")
    if "value" not in data:
        raise InputError(f"{where} has no 'value'")
    worse = data.get("worse", default_worse)
    if worse not in WORSE:
        raise InputError(f"{where}.worse must be 'higher' or 'lower', got {worse!r}")
    abs_tol = _number(data, "abs_tol", where) if "abs_tol" in data else 0.0
    rel_tol = _number(data, "rel_tol", where) if "rel_tol" in data else 0.0
    if abs_tol < 0 or rel_tol < 0:
        raise InputError(f"{where}: abs_tol and rel_tol must be >= 0")
    return Tolerance(
        value=_number(data, "value", where, nullable=True),
        worse=worse,
        abs_tol=abs_tol,
        rel_tol=rel_tol,
    )


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Reads and validates a baseline file; InputError (exit 3) names the first problem."""
    where = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no such baseline: {where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: cannot read the baseline ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: the baseline is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise InputError(f"{where}: not a stabledrl baseline (schema is not {BASELINE_SCHEMA!r})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(f"{where}: baseline version must be an integer, got {version!r}")
    if version > BASELINE_VERSION:
        raise InputError(
            f"{where}: baseline version {version} is newer than this tool reads "
            f"({BASELINE_VERSION}); upgrade stabledrl"
        )
    if version < 1:
        raise InputError(f"{where}: baseline version {version} is not supported")
    replay = data.get("replay")
    if not isinstance(replay, dict):
        raise InputError(f"{where}: 'replay' (the replay settings) must be an object")
    settings: dict[str, Any] = {}
    for key in REPLAY_SETTINGS:
        if key not in replay:
            raise InputError(f"{where}: replay.{key} is missing")
        settings[key] = _number(replay, key, f"{where}: replay")
    if not settings["window"].is_integer():
        raise InputError(f"{where}: replay.window must be an integer")
    settings["window"] = int(settings["window"])
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise InputError(f"{where}: 'run' must be an object")
    observed_data = data.get("observed", {})
    if not isinstance(observed_data, dict):
        raise InputError(f"{where}: 'observed' must be an object")
    observed = {}
    for name, entry in observed_data.items():
        if name not in RUN_METRICS:
            raise InputError(f"{where}: unknown observed metric {name!r} (known: {RUN_METRICS})")
        observed[name] = _tolerance(entry, f"{where}: observed.{name}", "lower")
    policies_data = data.get("policies")
    if not isinstance(policies_data, dict):
        raise InputError(f"{where}: 'policies' must be an object of spec -> metrics")
    policies: dict[str, dict[str, Tolerance]] = {}
    for spec, metrics in policies_data.items():
        try:
            canonical = get_policy(spec).spec
        except UsageError as exc:
            raise InputError(f"{where}: policy {spec!r}: {exc}") from None
        if not isinstance(metrics, dict):
            raise InputError(f"{where}: policies.{spec} must be an object of metric -> tolerance")
        entry = {}
        for name, tol in metrics.items():
            rule = POLICY_METRICS.get(name)
            if rule is None:
                raise InputError(
                    f"{where}: policies.{spec}: unknown metric {name!r} "
                    f"(known: {', '.join(POLICY_METRICS)})"
                )
            entry[name] = _tolerance(tol, f"{where}: policies.{spec}.{name}", rule.worse)
        if canonical in policies:
            raise InputError(f"{where}: policy {spec!r} appears twice (as {canonical!r})")
        policies[canonical] = entry
    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise InputError(f"{where}: 'strict' must be true or false, got {strict!r}")
    return Baseline(
        path=where,
        run=run,
        replay=settings,
        observed=observed,
        policies=policies,
        strict=strict,
    )


def baseline_dict(
    result: ReplayResult, settings: dict[str, Any], *, strict: bool = False
) -> dict[str, Any]:
    """Today's figures as a baseline, ready for `write_json`: default tolerances, or with
    `strict` a golden baseline (float-noise tolerances, and shifts either way trip)."""
    from stabledrl_cli import __version__

    collapse = result.observed.get("first_reward_collapse")
    policies = {}
    for p in result.policies:
        metrics = {}
        for name, rule in POLICY_METRICS.items():
            if strict:
                abs_tol, rel_tol = 0.0, 0.0 if rule.integer else STRICT_REL_TOL
            else:
                abs_tol, rel_tol = rule.abs_tol, rule.rel_tol
            tol = Tolerance(
                value=rule.measure(p), worse=rule.worse, abs_tol=abs_tol, rel_tol=rel_tol
            )
            steps = p.summary[name] if name.endswith("_steps") else None
            notes = {"first": steps[0] if steps else None} if steps is not None else {}
            metrics[name] = tol.to_dict(**notes)
        policies[p.spec] = metrics
    return {
        "schema": BASELINE_SCHEMA,
        "version": BASELINE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "strict": strict,
        "run": {"path": result.run, "steps": result.steps, "policy": result.run_policy_spec},
        "replay": {key: settings[key] for key in REPLAY_SETTINGS},
        "observed": {
            # The observed-collapse rule resolves a collapse to within its window W.
            "first_reward_collapse": Tolerance(
                value=None if collapse is None else float(collapse),
                worse="lower",
                abs_tol=0.0 if strict else float(collapse_window(result.steps)),
            ).to_dict()
        },
        "policies": policies,
    }


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Writes JSON to a temporary name and renames it (a reader never sees half a file)."""
    return _write_atomic(Path(path), (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def _write_atomic(target: Path, payload: bytes) -> Path:
    if not target.parent.is_dir():
        raise UsageError(f"{target}: directory {target.parent} does not exist")
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        temp.write_bytes(payload)
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise UsageError(f"{target}: cannot write it ({exc.strerror or exc})") from None
    return target


# --- evaluating the gates ----------------------------------------------------------------------
def _absolute(p: PolicyResult, gates: Gates) -> list[GateResult]:
    found = []
    if gates.max_collapsed is not None:
        steps = p.summary["collapsed_steps"]
        ok = len(steps) <= gates.max_collapsed
        shown = ", ".join(str(s) for s in steps[:10]) + (", ..." if len(steps) > 10 else "")
        found.append(
            GateResult(
                policy=p.spec,
                gate="max_collapsed",
                ok=ok,
                figure=float(len(steps)),
                limit=float(gates.max_collapsed),
                message=f"{len(steps)} collapsed steps, limit {gates.max_collapsed}"
                + (f" (steps {shown})" if steps else ""),
            )
        )
    if gates.max_discard_frac is not None:
        frac = float(p.summary["discard_frac"])
        found.append(
            GateResult(
                policy=p.spec,
                gate="max_discard_frac",
                ok=frac <= gates.max_discard_frac,
                figure=frac,
                limit=gates.max_discard_frac,
                message=f"discard_frac {frac:.4g}, limit {gates.max_discard_frac:g}",
            )
        )
    if gates.max_nonfinite is not None:
        flags = np.asarray(p.series["nonfinite"], dtype=bool)
        count = int(flags.sum())
        found.append(
            GateResult(
                policy=p.spec,
                gate="max_nonfinite",
                ok=count <= gates.max_nonfinite,
                figure=float(count),
                limit=float(gates.max_nonfinite),
                message=f"{count} steps with a non-finite update, limit {gates.max_nonfinite}",
            )
        )
    return found


def _regression(
    policy: str | None, name: str, tol: Tolerance, figure: float | None, *, strict: bool
) -> GateResult:
    tripped = tol.tripped(figure)
    improved = strict and not tripped and tol.improved(figure)
    # null is infinity: for the observed collapse it means "no collapse".
    none = "none" if name.endswith("first_reward_collapse") else "inf"
    shown = none if figure is None else format_figure(figure)
    base = none if tol.value is None else format_figure(tol.value)
    side = "above" if tol.worse == "higher" else "below"
    slack = f"abs_tol {tol.abs_tol:g}, rel_tol {tol.rel_tol:g}"
    if tol.value is None:
        rule = "any figure passes" if tol.worse == "higher" else f"any figure but {none} fails"
    elif tripped:
        rule = f"{side} the limit {format_figure(tol.limit())} ({slack})"
    elif improved:
        rule = f"better than the baseline beyond its tolerance ({slack}); --strict fails on it"
    else:
        rule = f"fails {side} {format_figure(tol.limit())} ({slack})"
    return GateResult(
        policy=policy,
        gate=f"baseline.{name}",
        ok=not (tripped or improved),
        figure=math.inf if figure is None else figure,
        limit=tol.limit(),
        message=f"{name} {shown}, baseline {base}: {rule}",
    )


def evaluate(
    result: ReplayResult, gates: Gates, baseline: Baseline | None, *, strict: bool = False
) -> list[GateResult]:
    """Every gate of every policy, passed or tripped, in a stable order.

    strict: a baseline figure that moved beyond its tolerance in either direction trips (for
    a project's own golden runs, where any shift must be acknowledged by a new baseline)."""
    found: list[GateResult] = []
    if baseline is not None:
        collapse = result.observed.get("first_reward_collapse")
        for name, tol in baseline.observed.items():
            figure = None if collapse is None else float(collapse)
            found.append(_regression(None, f"observed.{name}", tol, figure, strict=strict))
    for p in result.policies:
        found.extend(_absolute(p, gates))
        if baseline is None:
            continue
        for name, tol in baseline.policies.get(p.spec, {}).items():
            figure = POLICY_METRICS[name].measure(p)
            found.append(_regression(p.spec, name, tol, figure, strict=strict))
    if baseline is not None:
        replayed = {p.spec for p in result.policies}
        for spec in baseline.policies:
            if spec not in replayed:
                found.append(
                    GateResult(
                        policy=spec,
                        gate="baseline.present",
                        ok=False,
                        figure=None,
                        limit=None,
                        message=f"policy {spec!r} is in the baseline but was not checked",
                    )
                )
    return found


# --- JUnit XML ---------------------------------------------------------------------------------
def junit_xml(results: list[GateResult], run: str, *, seconds: float = 0.0) -> bytes:
    """One testsuite, one testcase per policy and gate (classname stabledrl.POLICY)."""
    failures = sum(not r.ok for r in results)
    suites = ET.Element(
        "testsuites",
        name="stabledrl check",
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        time=f"{seconds:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"stabledrl check {run}",
        tests=str(len(results)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{seconds:.3f}",
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    for r in results:
        classname = RUN_CLASS if r.policy is None else f"stabledrl.{r.policy}"
        case = ET.SubElement(suite, "testcase", classname=classname, name=r.gate, time="0")
        if not r.ok:
            failure = ET.SubElement(case, "failure", message=r.message, type="GateFailed")
            failure.text = (
                f"figure {format_figure(r.figure)}, limit {format_figure(r.limit)}: {r.message}"
            )
        else:
            ET.SubElement(case, "system-out").text = r.message
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(
    results: list[GateResult], run: str, path: str | os.PathLike[str], *, seconds: float = 0.0
) -> Path:
    return _write_atomic(Path(path), junit_xml(results, run, seconds=seconds))
