"""The baseline file of `stabledrl check`: reading, validating and writing it, and the replay
settings a check against it uses.

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
under `replay` is refused (`BASELINE_KEYS`).

A strict baseline (`"strict": true`, written with `strict`, for a project's own deterministic
golden runs) has float-noise tolerances (counts exact, floats to 1e-4 relative), and a figure
beyond its tolerance in the better direction trips too: any shift must be acknowledged by
rewriting the baseline.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from decimal import Context, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli._atomic import write_output
from stabledrl_cli._json import parse_strict, stand_in, unicode_text
from stabledrl_cli._regular import NotRegularFile, open_regular, read_pipe
from stabledrl_cli._version import __version__
from stabledrl_cli.errors import (
    QUOTE_LIMIT,
    ConfigError,
    InputError,
    UsageError,
    counted,
    quoted,
    quoted_spec,
    shown,
)
from stabledrl_cli.policies import MAX_POLICIES, get_policy
from stabledrl_cli.replay.config import (
    DEFAULT_COLLAPSE_WINDOW,
    DEFAULT_DRIFT_THRESHOLD,
    DEFAULT_SPIKE_FACTOR,
    DEFAULT_WINDOW,
    ReplayConfig,
)
from stabledrl_cli.replay.figures import (
    RUN_COUNTS,
    RUN_METRICS,
    RUN_WORSE,
    STRICT_REL_TOL,
    policy_metrics,
    run_figure,
)
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.recorded import SERIES_RULES, RecordedRun, observed_of
from stabledrl_cli.replay.result import PolicyResult, ReplayResult
from stabledrl_cli.spec import MAX_WINDOW, reads_as_zero
from stabledrl_cli.vocab import LOSS_NORMS, SERIES_STATS, WORSE, SeriesStat, Worse

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
            f"{where}: value {value:g} with abs_tol {abs_tol:g} and rel_tol {rel_tol:g} puts "
            "the limit past the largest float, a gate that could never trip"
        )
    return tolerance


BASELINE_LIMIT = 16 * 1024 * 1024
"""Bytes a baseline file may have (a real one is a few KB): a larger file is refused unread."""
PIPE_SECONDS = 60.0
"""How long a baseline given as a pipe (`-b <(git show main:b.json)`) may take to arrive."""


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The baseline file's bytes: a regular file (a symlink to one too) of at most
    `BASELINE_LIMIT` bytes, read in one bounded read, or a pipe (a FIFO, a shell's `<(...)`)
    read to its end within `PIPE_SECONDS`. A device or socket is refused, never read (it
    could never end: /dev/zero); InputError naming the file."""
    where = str(path)
    try:
        handle, info = open_regular(path)
    except FileNotFoundError:
        raise InputError(f"no such baseline: {where}") from None
    except NotRegularFile:
        return _read_pipe(path)
    except OSError as exc:
        raise InputError(f"{where}: cannot read the baseline ({exc})") from None
    raw = b""
    with handle:
        size = info.st_size
        if size <= BASELINE_LIMIT:  # else refused unread
            try:
                raw = handle.read(BASELINE_LIMIT + 1)  # bounded: the file may have grown
            except OSError as exc:
                raise InputError(f"{where}: cannot read the baseline ({exc})") from None
            size = max(size, len(raw))
    if size > BASELINE_LIMIT:
        raise InputError(f"{where}: baseline of {size} bytes is larger than {BASELINE_LIMIT}")
    return raw


def _read_pipe(path: str | os.PathLike[str]) -> bytes:
    """The baseline given as a pipe (`_read_bytes`); InputError when it is no pipe, gives no
    end in `PIPE_SECONDS` or more than `BASELINE_LIMIT` bytes."""
    where = str(path)
    try:
        raw = read_pipe(path, BASELINE_LIMIT, PIPE_SECONDS)
    except NotRegularFile:
        raise InputError(f"{where}: the baseline is not a file or a pipe") from None
    except (OSError, TimeoutError) as exc:
        raise InputError(f"{where}: cannot read the baseline ({exc})") from None
    if not raw:
        raise InputError(f"{where}: the baseline pipe gave nothing (no process wrote to it)")
    if len(raw) > BASELINE_LIMIT:
        raise InputError(f"{where}: baseline of more than {BASELINE_LIMIT} bytes")
    return raw


def _read(path: str | os.PathLike[str]) -> dict[str, object]:
    where = str(path)
    data = parse_strict(_read_bytes(path), where, "baseline", parse_float=_baseline_float)
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


def _key(name: str) -> str:
    """A key of the baseline in an error line: as it is, or quoted (and cut) when it is long
    or holds a character that is not printable (a newline would split the line)."""
    return name if name.isprintable() and len(name) <= QUOTE_LIMIT else quoted(name)


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
            canonical = get_policy(spec).spec
        except UsageError as exc:
            raise InputError(f"{where}: policy {quoted_spec(spec)}: {exc}") from None
        if not isinstance(metrics, dict):
            raise InputError(
                f"{where}: policies.{_key(spec)} must be an object of metric -> tolerance"
            )
        entry = {}
        for name, tol in metrics.items():
            rule = rules.get(name)
            if rule is None:
                raise InputError(
                    f"{where}: policies.{_key(spec)}: unknown metric {quoted(name)} "
                    f"(known: {', '.join(rules)})"
                )
            entry[name] = _tolerance(tol, f"{where}: policies.{_key(spec)}.{name}", rule.worse)
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
                f"{where}: recorded.{_key(name)} must be an object of statistic -> tolerance"
            )
        rule = SERIES_RULES.get(name)
        entry: dict[SeriesStat, Tolerance] = {}
        for stat, tol in stats.items():
            known = next((s for s in SERIES_STATS if s == stat), None)
            if known is None:
                raise InputError(
                    f"{where}: recorded.{_key(name)}: unknown statistic {quoted(stat)} "
                    f"(known: {', '.join(SERIES_STATS)})"
                )
            worse = rule.worse if rule is not None else None
            entry[known] = _tolerance(tol, f"{where}: recorded.{_key(name)}.{stat}", worse)
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
    if run.get("steps") is not None:
        steps = _number(run, "steps", f"{where}: run")
        if not steps.is_integer() or steps < 0:
            raise InputError(f"{where}: run.steps must be a whole number >= 0, got {steps:g}")
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
        for stat in rule.stats:
            value = stats.stat(stat)
            if value is None:
                continue
            tolerance = Tolerance(
                value=value,
                worse=rule.worse,
                abs_tol=0.0 if strict else rule.abs_tol,
                rel_tol=STRICT_REL_TOL if strict else rule.rel_tol,
            )
            if tolerance.bounded():  # else a gate that could never trip, which a reader refuses
                entries[stat] = tolerance.to_dict()
        if entries:
            section[name] = entries
    return section


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
