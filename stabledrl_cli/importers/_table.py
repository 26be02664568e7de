"""The steps of a log, gathered row by row from any reader, within fixed bounds.

A row is one logged record: a step and some named values. Rows with the same step merge, metric
by metric; when two rows give one metric at one step, the later row wins (a resumed run logs
the steps after its checkpoint again) and the replaced cells are counted. A table that
`preempts` (of a TensorBoard, JSON-lines or CSV log: a log that goes back in steps is a
restarted run appending to it) also drops, as TensorBoard shows a restarted run, a metric's
values at steps after the one a later row gives it: those steps of the earlier run are counted
`preempted`; a row below every step its metric has is no restart (a log newest first) and
drops nothing. A log that says where its run restarted (`restart`: TensorBoard's SessionLog
START) drops every metric's values from that step on. A value is a number (NaN and infinities
are kept: finding them is the point), missing (an empty cell, a JSON null), or not numeric (a
bool, a list, text that spells no number or a string of W&B's: dropped and counted). A row
whose step is not an integer in [0, 2**63 - 1] is skipped; so is a row left with no training
metric (an evaluation row, transformers' end-of-training summary, an empty row). Each bound
below is an InputError (exit 3) when a log passes it, as is an integer value past a double's
range (1.8e308: JSON allows it, no metric holds it).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from stabledrl_cli.dump._schema import STEP_LIMIT
from stabledrl_cli.errors import InputError, counted
from stabledrl_cli.importers._names import (
    NAME_LIMIT,
    Skip,
    is_profiling,
    listed,
    skip_reason,
)
from stabledrl_cli.spec import spec_float

STEP_COUNT_LIMIT = 100_000
"""Most steps one import writes (each is a durable file in the run directory)."""
METRIC_LIMIT = 1_000
"""Most distinct metric names in one log imported."""
LEFT_OUT_LIMIT = 20_000
"""Most distinct names left out (not imported, and, apart, with a value that is not a number):
an evaluation over many benchmarks logs many (verl: `val-core/<source>/<var>/<metric>@<n>`,
about a hundred a benchmark), each at most NAME_LIMIT characters (5 MB of names at most)."""
ROW_NAME_LIMIT = METRIC_LIMIT + LEFT_OUT_LIMIT
"""Most names one row may give (a CSV header's columns, a TensorBoard event's tags): the table
would refuse more, and a reader refuses them before it holds them."""
CELL_LIMIT = 2_000_000
"""Most values held at once (bounds memory: about 100 bytes each)."""
NUMBER_LIMIT = 1_100
"""Most characters of a number in text: every double written out exactly fits (the longest,
2.2e-308 in positional notation, is 1,076); longer text is not a number, never copied whole
to be parsed (a JSON string of 100 MB)."""


@dataclass
class StepTable:
    """The training metrics of a log by step, and what was left out and why."""

    where: str
    """The log's name, for messages."""
    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    """Step -> logged name -> value."""
    names: dict[str, None] = field(default_factory=dict)
    """Training metric names in first-seen order."""
    skipped_rows: Counter[str] = field(default_factory=Counter)
    """Reason -> rows skipped ("bad step", "eval", "summary", "profiling", "media", "no
    metrics")."""
    not_imported: dict[str, Skip] = field(default_factory=dict)
    """Logged names left out -> why (bookkeeping, eval, summary)."""
    non_numeric: Counter[str] = field(default_factory=Counter)
    """Logged name -> values dropped because they are not numbers."""
    replaced: int = 0
    """Values replaced by a later row of the same step."""
    preempts: bool = False
    """Whether a row drops its metrics' values at later steps (a restarted run's)."""
    preempted: int = 0
    """Values dropped because a later row gave their metric an earlier step."""
    cells: int = 0
    warnings: list[str] = field(default_factory=list)
    """Notes for the user (e.g. an unfinished last record ignored)."""
    typed: bool = False
    """Whether the log's values carry W&B's types (its run file, or its history exported as
    JSON: rows holding `_step`): a string there is text, digits or not (`"0.5"`, which W&B's
    charts leave unplotted), not a number. Any other log's value in text (a CSV cell, a
    console log's value, a JSON string such as `json.dumps(row, default=str)` writes numpy's
    float32) is read as a number where it spells one."""
    nonfinite_null: bool = False
    """Whether the log spells NaN and the infinities alike (verl's file log: orjson's `null`),
    read as NaN: a NaN of it may have been an infinity."""
    tracker_run: dict[str, str] = field(default_factory=dict)
    """The run as its tracker names it (a W&B run file's `id`, `name`, `project`)."""
    logging_steps: int | None = None
    """k of a log that says it was written every k steps (trainer_state.json's
    `logging_steps`): a row holds the means over the steps since the row before of the
    metrics the trainer averages (transformers' `loss`, TRL's); None where the log does not
    say."""
    _series: dict[str, deque[int]] = field(default_factory=dict)
    """When `preempts`: each metric's steps, increasing."""
    _made: list[int] = field(default_factory=list)
    """When `preempts`: the steps of the rows made, negated (a max-heap; a row's step may be
    there after the row is gone, or twice), for `restart`."""
    _rekeyed: bool = False
    """Whether `keyed_by` warned of a step key giving way."""

    def keyed_by(self, key: str | None, found: str, where: str) -> str:
        """`found`, a log's step key from the row at `where` on (`step_key_from`), `key` the
        rows' before; a warning when it first gives way after steps were kept: numbered by
        `key` (W&B's `_step`), they may share numbers with the steps after. Once: a W&B run
        file may declare another step metric at each row, each warning a line and a pass
        over the steps kept (quadratic time)."""
        if key is not None and found != key and self.steps and not self._rekeyed:
            self._rekeyed = True
            first, last = min(self.steps), max(self.steps)
            span = first if first == last else f"{first}..{last}"
            kept = f"{counted(len(self.steps), 'step')} ({span})"
            self.warnings.append(
                f"{where}: steps by {found} from here on, the {kept} before by {key}: they "
                "may share numbers"
            )
        return found

    def add(self, step: object, values: Mapping[str, object]) -> None:
        """Adds one logged row (its step as logged; its values as parsed by the reader)."""
        number = _step_number(step)
        if number is None:  # the row's content says why, when it holds no training metric (a
            # W&B export's column of the trainer's step is empty in the rows before its start)
            left = [(n, r) for n, v in values.items() if (r := _left_out_as(n, v)) is not None]
            whole = left and len(left) == len(values)
            self.skipped_rows[_row_reason(left) if whole else "bad step"] += 1
            return
        kept: dict[str, float] = {}
        left = []
        for name, raw in values.items():
            reason = _left_out_as(name, raw)
            if reason is not None:
                self.leave_out(name, reason)
                left.append((name, reason))
                continue
            if raw is None or raw == "":
                continue
            try:
                value = None if self.typed and isinstance(raw, str) else _number(raw)
            except OverflowError:
                raise InputError(
                    f"{self.where}: step {number}: {name} is an integer past a double's range "
                    "(1.8e308)"
                ) from None
            if value is None:
                self._bound(name, self.non_numeric, LEFT_OUT_LIMIT, "names left out")
                self.non_numeric[name] += 1
                continue
            kept[name] = value
        if not kept:
            self.skipped_rows[_row_reason(left)] += 1
            return
        self._merge(number, kept)

    def _merge(self, step: int, kept: dict[str, float]) -> None:
        row = self.steps.get(step)
        if row is None:
            if len(self.steps) >= STEP_COUNT_LIMIT:
                raise InputError(f"{self.where}: more than {STEP_COUNT_LIMIT} steps")
            row = self.steps[step] = {}
            if self.preempts:
                heapq.heappush(self._made, -step)
        for name in kept:
            self._bound(name, self.names, METRIC_LIMIT, "metric names")
            self.names.setdefault(name, None)
            if self.preempts:
                self._preempt(name, step)
            if name in row:
                self.replaced += 1
            else:
                self.cells += 1
        if self.cells > CELL_LIMIT:
            raise InputError(f"{self.where}: more than {CELL_LIMIT} values")
        row.update(kept)

    def leave_out(self, name: str, reason: Skip) -> None:
        """Notes a logged name that is not imported, and why (the first reason given)."""
        self._bound(name, self.not_imported, LEFT_OUT_LIMIT, "names left out")
        self.not_imported.setdefault(name, reason)

    def _bound(self, name: str, held: Mapping[str, object], limit: int, what: str) -> None:
        """Refuses a name new to `held` that is too long, or one name past `limit` for it."""
        if name in held:
            return
        if len(name) > NAME_LIMIT:
            raise InputError(f"{self.where}: a metric name longer than {NAME_LIMIT} characters")
        if len(held) >= limit:
            raise InputError(f"{self.where}: more than {limit:,} {what}")

    def _preempt(self, name: str, step: int) -> None:
        """Drops `name`'s values at steps after `step` (each dropped once: amortised O(1)),
        unless `step` is below all of them: a restart goes back into the steps its run logged,
        a log newest first (an export sorted so) goes below them, row after row."""
        series = self._series.setdefault(name, deque())
        if series and step < series[0]:
            series.appendleft(step)
            return
        while series and series[-1] > step:
            later = series.pop()
            del self.steps[later][name]
            self.cells -= 1
            self.preempted += 1
            if not self.steps[later]:
                del self.steps[later]
        if not series or series[-1] < step:
            series.append(step)

    def restart(self, step: int) -> None:
        """Drops every metric's values at `step` and after (counted `preempted`): a run that
        says it restarted there (TensorBoard's SessionLog START, which
        `SummaryWriter(purge_step=step)` writes), as TensorBoard drops them, the metrics the
        restarted run does not log again too. Each row dropped once: amortised O(1)."""
        while self._made and -self._made[0] >= step:
            row = self.steps.pop(-heapq.heappop(self._made), None)
            if row is None:  # gone already (emptied by `_preempt`, or made twice)
                continue
            for name in row:
                series = self._series[name]
                while series and series[-1] >= step:
                    series.pop()
            self.cells -= len(row)
            self.preempted += len(row)


def _left_out_as(name: str, raw: object) -> Skip | None:
    """Why a logged value is left out (`skip_reason`, or a JSON object, W&B's media, as not a
    scalar); None for a training metric's."""
    reason = skip_reason(name)
    return "not a scalar" if reason is None and isinstance(raw, dict) else reason


def _row_reason(left: list[tuple[str, Skip]]) -> str:
    """Why a row that keeps no training metric is skipped, from its names left out and why:
    `eval`, `summary`, `profiling` (TRL logs each profiled call's seconds to W&B in a row of
    its own, several a step), `media` (a W&B table or image logged alone), else `no
    metrics`."""
    reasons = {reason for _, reason in left}
    for reason in ("eval", "summary"):
        if reason in reasons:
            return reason
    if any(is_profiling(name) for name, _ in left):
        return "profiling"
    return "media" if "not a scalar" in reasons else "no metrics"


def skipped_text(skipped: Mapping[str, int]) -> str:
    """`skipped rows: 2 bad step, 1 eval`, for a message."""
    return "skipped rows: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def dropped_text(non_numeric: Mapping[str, int]) -> str:
    """`dropped 3 non-numeric values of loss, reward`, for a message."""
    values = counted(sum(non_numeric.values()), "non-numeric value")
    return f"dropped {values} of {listed(sorted(non_numeric))}"


def _step_number(step: object) -> int | None:
    """An integer step in [0, STEP_LIMIT] (an integral float or numeric text is fine)."""
    if isinstance(step, bool):
        return None
    if isinstance(step, str):
        try:
            step = _number(step)
        except OverflowError:  # past every step
            return None
    if isinstance(step, float):
        if not (math.isfinite(step) and step.is_integer()):
            return None
        step = int(step)
    if isinstance(step, int) and 0 <= step <= STEP_LIMIT:
        return step
    return None


def _number(raw: object) -> float | None:
    """A logged value as a float, None when it is not a number; OverflowError for an integer
    past a double's range (a JSON integer has no bound; nor has text, up to NUMBER_LIMIT)."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return float(raw)
    if not isinstance(raw, str) or len(raw) > NUMBER_LIMIT:
        return None
    text = raw.strip()
    try:
        value = spec_float(text)  # not float(): it reads "1_0" and other digits
    except ValueError:
        return None
    if math.isinf(value) and text.lstrip("+-").isdigit():
        raise OverflowError(text)
    return value
