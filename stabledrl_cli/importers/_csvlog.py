"""CSV as experiment trackers export it: a header, a step column, one column per metric, empty
cells where a metric was not logged at that step.

The delimiter is a tab in a `.tsv` file, else the header's most frequent of `,`, tab and `;`.
The step column is the first of `STEP_KEYS` in the header (or the one given). W&B's chart
export (`<run> - <metric>` columns, with `__MIN`/`__MAX` envelope columns) loses the
`<run> - ` part (up to the last ` - `: a run's name may hold one, no framework's metric name
does) when every metric column has the same one (a chart of several runs is refused: one
import is one run); its envelope is left out, and a row where it is not the line's value (a
point for a bucket of steps or for grouped runs) refused. TensorBoard's per-tag export (`Wall
time,Step,Value`) names its one metric after the file, which holds the tag with `_` for `/`: a
leading `train_` is read as `train/` (`run-X-tag-train_loss.csv` -> `train/loss`), a leading
evaluation prefix as that prefix (`val-core_` -> verl's `val-core/`, left out), and a name that
maps to a standard scalar is read as that metric (`critic_score_mean` -> `critic/score/mean`).
A row holding the step column's name and another of the header's is a header again (a restarted
writer appending to the file writes its own, its columns maybe others or in another order):
the rows after it are read under it. A row with more cells than its header is an InputError
naming its line; a short row has empty trailing cells, but for a last one with no newline: a
writer stopped as it wrote it, its last cell maybe cut too, it is ignored with a warning.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from pathlib import Path

from stabledrl_cli.errors import InputError, key_shown, quoted
from stabledrl_cli.importers._files import text_lines
from stabledrl_cli.importers._names import (
    EVAL_PREFIXES,
    STANDARD_SOURCES,
    STEP_KEYS,
    TRACKER_PREFIXES,
    listed,
    skip_reason,
)
from stabledrl_cli.importers._table import ROW_NAME_LIMIT, StepTable
from stabledrl_cli.spec import spec_float

_DELIMITERS = (",", "\t", ";")
_ENVELOPE = ("__MIN", "__MAX")
_TENSORBOARD_HEADER = ["Wall time", "Step", "Value"]


def read_csv(path: Path, step_key: str | None = None) -> StepTable:
    """The steps of a CSV log (InputError when it is not one)."""
    lines = text_lines(path)
    first = next(lines, None)
    if first is None:
        raise InputError(f"{path}: empty file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(_DELIMITERS, key=first[1].count)
    ended = [True]  # whether the line read last ended in a newline
    rows = csv.reader(_joined(first, lines, ended), delimiter=delimiter, strict=True)
    table = StepTable(str(path), preempts=True)
    try:
        names = _metric_names(_header(next(rows), path), path)
        key = step_key if step_key is not None else next((k for k in STEP_KEYS if k in names), None)
        if step_key is not None and key not in names:
            given = quoted(step_key)
            raise InputError(f"{path}: the header has no step column {given} (--step-key)")
        if key is None or key not in names:
            raise InputError(
                f"{path}: no step column (one of {', '.join(STEP_KEYS)}; or pass --step-key)"
            )
        column, named = _columns(names, key, table), set(names)
        envelope = _envelope(names, table)
        for cells in rows:
            if _header_again(cells, column, key, named):  # a writer that restarted appending to
                # the file, its columns maybe others, in another order
                names = _metric_names(_header(cells, path), path)
                if key not in names:
                    raise InputError(
                        f"{path}: line {rows.line_num}: a header without the step column {key}"
                    )
                column, named = _columns(names, key, table), set(names)
                envelope = _envelope(names, table)
                continue
            if not ended[0] and len(cells) < len(names):  # a writer stopped as it wrote it:
                # its last cell may be cut short too (`0.6` of `0.61`)
                table.warnings.append(f"{path}: line {rows.line_num}: unfinished last row ignored")
                break
            if len(cells) > len(names):
                raise InputError(
                    f"{path}: line {rows.line_num}: {len(cells)} cells, the header has {len(names)}"
                )
            # the filled cells only: a wide export is mostly empty cells, each one a metric
            # not logged at the step, which would cost a lookup every row
            values = {names[i]: text for i, cell in enumerate(cells)
                      if cell and i != column and (text := cell.strip())}  # fmt: skip
            for bound, line in envelope.items():
                _within(values, bound, line, f"{path}: line {rows.line_num}")
            step = cells[column].strip() if column < len(cells) else ""
            if values or step:
                table.add(step or None, values)
    except csv.Error as exc:
        raise InputError(f"{path}: line {rows.line_num}: not CSV ({exc})") from None
    return table


def _envelope(names: list[str], table: StepTable) -> dict[str, str]:
    """A W&B chart export's envelope columns (`<metric>__MIN`, `<metric>__MAX`) -> their
    metric's, left out as bookkeeping in `table`."""
    held = set(names)
    found = {n: n[: -len(e)] for n in names for e in _ENVELOPE if n.endswith(e)}
    found = {n: line for n, line in found.items() if line in held}
    for name in found:
        table.leave_out(name, "bookkeeping")
    return found


def _within(values: dict[str, str], bound: str, line: str, where: str) -> None:
    """Takes envelope column `bound` out of a row's `values`; InputError where it is not its
    metric's value: the chart's point then stands for several values (a bucket of steps, of
    which W&B's full fidelity draws the last; grouped runs), not one the run logged alone."""
    edge = values.pop(bound, None)
    if edge is None or line not in values or _same(edge, values[line]):
        return
    raise InputError(  # a cell may be 128 KB (csv's field limit): cut
        f"{where}: {line} is {key_shown(values[line])} but its {bound[len(line) :]} is "
        f"{key_shown(edge)}: the W&B chart drew one point for a bucket of steps or for grouped "
        "runs, not the run's values; export run.scan_history() or import the run's .wandb file"
    )


def _same(a: str, b: str) -> bool:
    """Two cells of one number (text alike, or equal as numbers; NaN as NaN)."""
    if a == b:
        return True
    try:
        x, y = spec_float(a), spec_float(b)
    except ValueError:
        return False
    return x == y or (x != x and y != y)


def _header_again(cells: list[str], column: int, key: str, names: set[str]) -> bool:
    """Whether a row is a header (of the step column `key` and another of the header before,
    `names`: no row of values holds those names), wherever its step column is. A row whose
    cell in the step `column` is a number is none (a wide row's cells are not all looked at).
    The row's cells are looked up among the names, not the names among its cells: a row of
    one cell under a header of 20,000 columns cost 20,000 lookups."""
    step = cells[column].strip() if column < len(cells) else ""
    if not step:  # a row without a step: no header either
        return False
    try:
        spec_float(step)
    except ValueError:
        given = {cell.strip() for cell in cells}
        return key in given and any(cell in names for cell in given if cell != key)
    return False


def _header(cells: list[str], path: Path) -> list[str]:
    """A header row's names, refused past the columns a log holds."""
    if len(cells) > ROW_NAME_LIMIT:
        raise InputError(f"{path}: {len(cells)} columns, more than a log holds")
    return [name.strip() for name in cells]


def _columns(names: list[str], key: str, table: StepTable) -> int:
    """The step column of a header's `names`; its names that are not imported noted in
    `table` (once a header, not once a row)."""
    column = names.index(key)
    for name in names[:column] + names[column + 1 :]:
        reason = skip_reason(name)
        if reason is not None:
            table.leave_out(name, reason)
    return column


def _joined(
    first: tuple[int, str, bool], rest: Iterator[tuple[int, str, bool]], ended: list[bool]
) -> Iterator[str]:
    """Lines for the csv module, newline kept (a quoted cell may span lines); `ended[0]` says
    whether the line given last ended in one."""
    for _, text, done in itertools.chain([first], rest):
        ended[0] = done
        yield text + "\n"


def per_tag_metric(path: Path) -> str:
    """The metric of TensorBoard's per-tag export at `path` (CSV or JSON), from its name
    (`run-X-tag-TAG.csv`, else the whole stem). The tag follows the last `-tag-`: a run's name
    may hold one (`exp-tag-v1`), a tag's (a metric name, its `/` saved as `_`) hardly."""
    stem = path.stem
    return _tag(stem.rsplit("-tag-", 1)[1] if "-tag-" in stem else stem)


def _tag(saved: str) -> str:
    """A tag as a file name holds it (its `/` saved as `_`): a tracker or evaluation prefix
    restored (`val-core_x` is verl's `val-core/x`, left out as in the event file), then a
    metric that maps to a standard scalar (`critic_score_mean` is `critic/score/mean`)."""
    prefix = next(
        (p for p in _SAVED_PREFIXES if saved.startswith(_flat(p)) and len(saved) > len(p)), ""
    )
    name = saved[len(prefix) :]
    return prefix + _STANDARD_FLAT.get(name, name)


def _flat(name: str) -> str:
    return name.replace("/", "_")


_SAVED_PREFIXES = (*TRACKER_PREFIXES, *(p for p in EVAL_PREFIXES if p.endswith("/")))
"""The prefixes a per-tag file name restores."""

_STANDARD_FLAT = {_flat(s): s for sources in STANDARD_SOURCES.values() for s in sources}
"""A standard scalar's source as a TensorBoard per-tag file name holds it -> the source."""


def _metric_names(header: list[str], path: Path) -> list[str]:
    """The header's names: W&B's `<run> - ` prefix dropped; TensorBoard's Value named."""
    if header == _TENSORBOARD_HEADER:
        return ["Wall time", "Step", per_tag_metric(path)]
    if len(set(header)) != len(header):
        raise InputError(f"{path}: the header repeats a column name")
    metrics = [n for n in header if n not in STEP_KEYS]
    prefixes = {n.rpartition(" - ")[0] for n in metrics if " - " in n}
    if not prefixes or not all(" - " in n for n in metrics):
        return header
    if len(prefixes) > 1:
        raise InputError(
            f"{path}: the columns of {len(prefixes)} runs ({listed(sorted(prefixes))}), as a "
            "W&B chart of several exports them: an import is of one run; export each alone"
        )
    return [n.rpartition(" - ")[2] if " - " in n else n for n in header]
