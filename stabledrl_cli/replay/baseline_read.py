"""Reading a baseline file (`load_baseline`): every key and tolerance checked, the first
problem named (the format: `baseline`)."""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import fields

from stabledrl_cli._json import parse_strict
from stabledrl_cli._version import __version__
from stabledrl_cli.errors import InputError, UsageError, key_shown, quoted, quoted_spec, shown
from stabledrl_cli.policies import MAX_POLICIES
from stabledrl_cli.policies._registry import resolve_spec
from stabledrl_cli.replay._format import format_written
from stabledrl_cli.replay.baseline import (
    BASELINE_SCHEMA,
    BASELINE_VERSION,
    Baseline,
    ReplaySettings,
    Tolerance,
)
from stabledrl_cli.replay.baseline_file import read_bytes
from stabledrl_cli.replay.config import DEFAULT_COLLAPSE_WINDOW
from stabledrl_cli.replay.figures import RUN_METRICS, RUN_WORSE, policy_metrics
from stabledrl_cli.replay.recorded import NONFINITE, NONFINITE_RULE, SERIES_RULES
from stabledrl_cli.spec import MAX_WINDOW, reads_as_zero
from stabledrl_cli.vocab import LOSS_NORMS, SERIES_STATS, WORSE, SeriesStat, Worse


class _Underflow(float):
    """A baseline number that names a nonzero value too small for a float (`1e-400`): it reads
    as 0.0, which `_number` refuses rather than compare against 0."""

    text: str
    """The number as the file writes it."""

    def __new__(cls, text: str) -> _Underflow:
        number = super().__new__(cls, 0.0)
        number.text = text
        return number


def _baseline_float(text: str) -> float:
    """A JSON number of the baseline with a fraction or exponent; `_Underflow` when it reads as
    0 but names a nonzero value (`spec.reads_as_zero`)."""
    value = float(text)
    return _Underflow(text) if reads_as_zero(text, value) else value


def _number(data: dict[str, object], key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, _Underflow):
        raise InputError(
            f"{where}.{key}: {quoted(value.text)} is too small for a float: it reads as 0"
        )
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # JSON integers have no bound
        raise InputError(f"{where}.{key} must be a finite number, got an integer past 1.8e308")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}.{key} must be a finite number, got {shown(value)}")
    return float(value)


def _tolerance(data: object, where: str, default_worse: Worse | None) -> Tolerance:
    if not isinstance(data, dict):
        raise InputError(f"{where} must be an object with value, worse, abs_tol, rel_tol")
    if "value" not in data:
        raise InputError(f"{where} has no 'value'")
    if default_worse is None and "worse" not in data:
        raise InputError(
            f'{where} has no \'worse\' ("higher" or "lower": which way is a regression)'
        )
    worse = data.get("worse", default_worse)
    if worse not in WORSE:
        raise InputError(f"{where}.worse must be 'higher' or 'lower', got {shown(worse)}")
    abs_tol = _number(data, "abs_tol", where) if "abs_tol" in data else 0.0
    rel_tol = _number(data, "rel_tol", where) if "rel_tol" in data else 0.0
    if abs_tol < 0 or rel_tol < 0:
        raise InputError(f"{where}: abs_tol and rel_tol must be >= 0")
    value = None if data["value"] is None else _number(data, "value", where)
    if value is None and worse == "higher":
        raise InputError(
            f"{where}: a null value (infinity) with worse 'higher' passes any figure, a gate "
            "that could never trip: give a finite value, or leave the entry out"
        )
    tolerance = Tolerance(
        value=value,
        worse="higher" if worse == "higher" else "lower",
        abs_tol=abs_tol,
        rel_tol=rel_tol,
    )
    if value is not None and not tolerance.bounded():
        raise InputError(
            f"{where}: value {format_written(value)} with abs_tol {format_written(abs_tol)} "
            f"and rel_tol {format_written(rel_tol)} puts "
            "the limit past the largest float, a gate that could never trip"
        )
    return tolerance


def _read(path: str | os.PathLike[str]) -> dict[str, object]:
    where = str(path)
    data = parse_strict(read_bytes(path), where, "baseline", parse_float=_baseline_float)
    if not isinstance(data, dict) or data.get("schema") != BASELINE_SCHEMA:
        raise InputError(f"{where}: not a stabledrl baseline (schema is not {BASELINE_SCHEMA!r})")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputError(f"{where}: baseline version must be an integer, got {shown(version)}")
    if version > BASELINE_VERSION:
        raise InputError(
            f"{where}: baseline version {shown(version)} is newer than this tool reads "
            f"({BASELINE_VERSION}); upgrade stabledrl"
        )
    if version < 1:
        raise InputError(f"{where}: baseline version {shown(version)} is not supported")
    return data


BASELINE_KEYS = (
    "schema",
    "version",
    "created",
    "tool_version",
    "strict",
    "run",
    "replay",
    "observed",
    "recorded",
    "policies",
)
"""The keys of a baseline: another (a misspelt `recorded`) is refused, not left out with the
gates under it. A metric's tolerance may hold notes of its own (`first`)."""


def _known_keys(data: dict[str, object], known: Sequence[str], where: str) -> None:
    """InputError naming the first key of `data` not in `known`."""
    unknown = [key for key in data if key not in known]
    if unknown:
        raise InputError(
            f"{where}: unknown key {quoted(unknown[0])} (known: {', '.join(known)}); a "
            "misspelt key would leave its gates or settings out"
        )


def _settings(replay: object, where: str) -> ReplaySettings:
    if not isinstance(replay, dict):
        raise InputError(f"{where}: 'replay' (the replay settings) must be an object")
    _known_keys(replay, [f.name for f in fields(ReplaySettings)], f"{where}: replay")
    for key in ("spike_factor", "window", "drift_threshold"):
        if key not in replay:
            raise InputError(f"{where}: replay.{key} is missing")
    windows = {
        key: _window(replay, key, where)
        for key in ("window", "collapse_window")
        if key in replay or key == "window"
    }
    spike_factor = _number(replay, "spike_factor", f"{where}: replay")
    if not spike_factor > 1:  # else the replay's own check names --spike-factor, exit 2
        raise InputError(
            f"{where}: replay.spike_factor must be a finite number > 1, got {spike_factor:g}"
        )
    return ReplaySettings(
        spike_factor=spike_factor,
        window=windows["window"],
        drift_threshold=_number(replay, "drift_threshold", f"{where}: replay"),
        collapse_window=windows.get("collapse_window", DEFAULT_COLLAPSE_WINDOW),
    )


def _window(replay: dict[str, object], key: str, where: str) -> int:
    value = _number(replay, key, f"{where}: replay")
    if not value.is_integer() or not 1 <= value <= MAX_WINDOW:
        raise InputError(f"{where}: replay.{key} must be an integer in [1, {MAX_WINDOW:.0e}]")
    return int(value)


def _policies(data: object, where: str) -> dict[str, dict[str, Tolerance]]:
    if not isinstance(data, dict):
        raise InputError(f"{where}: 'policies' must be an object of spec -> metrics")
    if len(data) > MAX_POLICIES:  # each is replayed: refused before any spec is read
        raise InputError(
            f"{where}: the baseline names {len(data)} policies; a check replays at most "
            f"{MAX_POLICIES}"
        )
    rules = policy_metrics()
    policies: dict[str, dict[str, Tolerance]] = {}
    for spec, metrics in data.items():
        try:
            found, config = resolve_spec(spec)  # not get_policy: its module loads torch
        except UsageError as exc:
            raise InputError(f"{where}: policy {quoted_spec(spec)}: {exc}") from None
        canonical = found.spec_of(config)
        if not isinstance(metrics, dict):
            raise InputError(
                f"{where}: policies.{key_shown(spec)} must be an object of metric -> tolerance"
            )
        entry = {}
        for name, tol in metrics.items():
            rule = rules.get(name)
            if rule is None:
                raise InputError(
                    f"{where}: policies.{key_shown(spec)}: unknown metric {quoted(name)} "
                    f"(known: {', '.join(rules)})"
                )
            entry[name] = _tolerance(tol, f"{where}: policies.{key_shown(spec)}.{name}", rule.worse)
        if canonical in policies:
            raise InputError(
                f"{where}: policy {quoted_spec(spec)} appears twice (as {canonical!r})"
            )
        policies[canonical] = entry
    return policies


def _recorded(data: object, where: str) -> dict[str, dict[SeriesStat, Tolerance]]:
    if not isinstance(data, dict):
        raise InputError(f"{where}: 'recorded' must be an object of scalar -> statistics")
    recorded: dict[str, dict[SeriesStat, Tolerance]] = {}
    for name, stats in data.items():
        if not isinstance(stats, dict):
            raise InputError(
                f"{where}: recorded.{key_shown(name)} must be an object of statistic -> tolerance"
            )
        rule = SERIES_RULES.get(name)
        entry: dict[SeriesStat, Tolerance] = {}
        for stat, tol in stats.items():
            known = next((s for s in SERIES_STATS if s == stat), None)
            if known is None:
                raise InputError(
                    f"{where}: recorded.{key_shown(name)}: unknown statistic {quoted(stat)} "
                    f"(known: {', '.join(SERIES_STATS)})"
                )
            how = NONFINITE_RULE if known == NONFINITE else rule
            worse = how.worse if how is not None else None
            entry[known] = _tolerance(tol, f"{where}: recorded.{key_shown(name)}.{stat}", worse)
        recorded[name] = entry
    return recorded


_RELEASE_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})")
"""A release's MAJOR.MINOR.MICRO at the start of a `tool_version` (a suffix such as `.dev1`
after it is not compared)."""


def _newer_tool(data: dict[str, object]) -> str | None:
    """The baseline's `tool_version` when it names a newer release than this one, else None."""
    written = data.get("tool_version")
    mine = _RELEASE_RE.match(__version__)
    theirs = _RELEASE_RE.match(written) if isinstance(written, str) else None
    if mine is None or theirs is None:
        return None
    newer = tuple(map(int, theirs.groups())) > tuple(map(int, mine.groups()))
    return theirs.group(0) if newer else None


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Reads and validates a baseline file; InputError (exit 3) names the first problem, and
    the newer stabledrl that wrote the baseline, if one did (its new keys are unknown here)."""
    data = _read(path)
    try:
        return _baseline(data, str(path))
    except InputError as exc:
        newer = _newer_tool(data)
        if newer is None:
            raise
        raise InputError(
            f"{exc}; the baseline was written by stabledrl {newer}, newer than this one "
            f"({__version__}): upgrade stabledrl"
        ) from None


def _baseline(data: dict[str, object], where: str) -> Baseline:
    """`load_baseline` of a baseline read (`_read`)."""
    _known_keys(data, BASELINE_KEYS, where)
    settings = _settings(data.get("replay"), where)
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise InputError(f"{where}: 'run' must be an object")
    if run.get("loss_norm", "global") not in LOSS_NORMS:
        raise InputError(
            f"{where}: run.loss_norm must be {' or '.join(LOSS_NORMS)}, "
            f"got {shown(run['loss_norm'])}"
        )
    for key in ("steps", "training_steps"):
        if run.get(key) is not None:
            count = _number(run, key, f"{where}: run")
            if not count.is_integer() or count < 0:
                raise InputError(f"{where}: run.{key} must be a whole number >= 0, got {count:g}")
    observed_data = data.get("observed", {})
    if not isinstance(observed_data, dict):
        raise InputError(f"{where}: 'observed' must be an object")
    observed = {}
    for name, entry in observed_data.items():
        if name not in RUN_METRICS:
            raise InputError(
                f"{where}: unknown observed metric {quoted(name)} (known: {', '.join(RUN_METRICS)})"
            )
        observed[name] = _tolerance(entry, f"{where}: observed.{name}", RUN_WORSE[name])
    if "policies" not in data:
        raise InputError(
            f"{where}: 'policies' is missing (policy spec -> metrics; {{}} when it gates no policy)"
        )
    strict = data.get("strict", False)
    if not isinstance(strict, bool):
        raise InputError(f"{where}: 'strict' must be true or false, got {shown(strict)}")
    policies = _policies(data.get("policies"), where)
    recorded = _recorded(data.get("recorded", {}), where)
    if not observed and not any(recorded.values()) and not any(policies.values()):
        raise InputError(
            f"{where}: the baseline gates nothing (no observed figure, recorded statistic or "
            "policy metric): a check against it could never fail"
        )
    return Baseline(
        path=where,
        run=run,
        replay=settings,
        observed=observed,
        policies=policies,
        recorded=recorded,
        strict=strict,
    )
