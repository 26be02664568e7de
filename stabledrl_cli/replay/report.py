"""The human output of a replay: rich tables on stdout (the per-policy summary, the observed
run's lines of `report_observed`, and with `--detail` or `--steps` the per-step rows and the
flagged steps' sequences)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from stabledrl_cli.errors import counted
from stabledrl_cli.replay import columns
from stabledrl_cli.replay._format import LIST_LIMIT, format_number, format_steps
from stabledrl_cli.replay.columns import CellFormat
from stabledrl_cli.replay.config import SPIKE_MIN_HISTORY, format_step_range
from stabledrl_cli.replay.report_observed import print_observed
from stabledrl_cli.replay.result import PolicyResult, ReplayResult
from stabledrl_cli.spec import wrap_line
from stabledrl_cli.tables import (
    fold_specs,
    print_fitted,
    print_legend,
    print_whole,
    shortened,
    spec_room,
    stack_headers,
    stacked_width,
    table_parts,
    table_width,
    whole_widths,
)
from stabledrl_cli.vocab import MetricGroup, UnjoinedGeometry

if TYPE_CHECKING:
    from stabledrl_cli.replay.top_sequences import TopSequence

BEST_RULE = (
    "best: fewest bias steps, then the lowest discarded mass, among policies without risk "
    "steps; none when every policy has risk steps or one policy is replayed. risk = steps whose "
    "one-step update is non-finite or spikes; bias = steps where net_push's rolling mean is low"
)
"""The legend line stating the rule that picks `best`."""
FOOTER = (
    "A replay is a one-step counterfactual: each step's recorded batch and weights, scored by "
    "another policy. It does not simulate the trajectory that policy would have trained."
)
PROXY_REASONS: dict[UnjoinedGeometry | None, str] = {
    None: "the run recorded no gradient geometry",
    "per_rank_grams": "the run's ranks recorded Gram matrices (unit_grad_gram), which do not "
    "combine across ranks; record a sketch with the same seed on every rank (docs/geometry.md)",
    "partial_sketches": "only some of the run's ranks recorded a sketch (unit_grad_sketch); "
    "the step's sketch needs every rank's rows, with the same seed (docs/geometry.md)",
    "sketch_seeds_differ": "the run's ranks recorded sketches (unit_grad_sketch) with "
    "different seeds, which do not join; give every rank the same seed (docs/geometry.md)",
    "sketch_widths_differ": "the run's ranks recorded sketches (unit_grad_sketch) of "
    "different widths k, which do not join; give every rank the same k (docs/geometry.md)",
}
"""Why update norms are coefficient norms, by `Unjoined.kind`."""


def proxy_reason(result: ReplayResult) -> str | None:
    """Why some of the replay's update norms are coefficient norms (a proxy): with no
    geometry on any step (`coef`), or with steps of geometry the ranks' join left out; None
    when every step's norm is measured from its geometry, or some steps simply have none."""
    kind = result.unjoined.kind
    if result.geometry == "coef" or kind is not None:
        return PROXY_REASONS[kind]
    return None


def _caption(result: ReplayResult) -> str | None:
    """The line under the summary table, on the update norms that are a proxy; None when
    none is."""
    why = proxy_reason(result)
    if result.geometry == "coef":
        return f"* update norm = coefficient norm ||coef||, a proxy: {why}"
    if result.geometry != "mixed":
        return None
    return (
        f"* on the {1 - result.geometry_coverage:.0%} of steps without gradient geometry, "
        "update norm = coefficient norm ||coef||, a proxy in other units (spikes compare each "
        "step with steps of its own kind)" + (f"; {why}" if why else "")
    )


MARK_NOTES = {
    "own": "(own) marks the policy the run was trained with",
    "best": "(best) the one the rule below picks",
}
"""The policy column's legend, for the marks the table shows."""


def _marks(p: PolicyResult) -> list[str]:
    return [m for m, on in (("own", p.own), ("best", p.best)) if on]


def _policy_cell(p: PolicyResult) -> str:
    marks = _marks(p)
    if p.summary.update_norm_approximate:
        marks.append("approx. norm")
    return p.spec + (f" ({', '.join(marks)})" if marks else "")


def percent(value: float | None) -> str:
    """A share as replay's table shows it: one decimal (0.3%), n/a for None or NaN."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.1%}"


@dataclass(frozen=True, kw_only=True)
class SummaryColumn:
    """One column of the per-policy summary table: its header, how its cell is made from a
    policy's result, and its legend line: `how` applied to the per-step columns `sources`,
    whose meanings come from their declarations in `columns.COLUMNS` (one source for the
    table, its legend and docs/replay-json.md)."""

    header: str
    cell: Callable[[PolicyResult], str]
    how: str
    """What the cell holds of its sources, e.g. "median over steps"."""
    sources: tuple[str, ...] = ()
    compact: bool = False
    """Shown in the default view (the rest with `wide`)."""
    numeric: bool = True
    """Never wrapped (a number or step list is shown whole or shortened, never broken)."""
    requested: bool = False
    """An on-request (`--metrics`) column."""

    def legend(self) -> str:
        """`header: how (source: its meaning; ...)`."""
        meanings = "; ".join(f"{name}: {_clause(_MEANINGS[name])}" for name in self.sources)
        return f"{self.header}: {self.how}" + (f" ({meanings})" if meanings else "")


_MEANINGS = {c.name: c.meaning for c in columns.COLUMNS}


def _clause(meaning: str) -> str:
    """A declared meaning inside a legend line: no final period, a lower-case start (unless
    the first word is an acronym such as "IS")."""
    text = meaning.rstrip(".")
    first = text.split(" ", 1)[0]
    return text if len(first) > 1 and first.isupper() else text[:1].lower() + text[1:]


def _first(steps: list[int]) -> str:
    return str(steps[0]) if steps else "-"


SUMMARY_COLUMNS: tuple[SummaryColumn, ...] = (
    SummaryColumn(header="policy", cell=_policy_cell, how="the policy spec",
                  compact=True, numeric=False),
    SummaryColumn(header="discard", cell=lambda p: percent(p.summary.discard_frac),
                  how="over the run", sources=("discard_frac",), compact=True),
    SummaryColumn(header="+A/-A",
                  cell=lambda p: f"{p.summary.discarded_pos}/{p.summary.discarded_neg}",
                  how="run totals, A > 0 / A < 0", sources=("discarded_pos", "discarded_neg")),
    SummaryColumn(header="mass", cell=lambda p: percent(p.summary.discarded_mass_frac),
                  how="median over steps", sources=("discarded_mass_frac",)),
    SummaryColumn(header="clipped", cell=lambda p: str(p.summary.clipped),
                  how="run total", sources=("clipped",)),
    SummaryColumn(header="norm med", cell=lambda p: format_number(p.summary.update_norm_median),
                  how="median over the finite steps", sources=("update_norm",)),
    SummaryColumn(header="norm max", cell=lambda p: format_number(p.summary.update_norm_max),
                  how="the largest finite value", sources=("update_norm",)),
    SummaryColumn(header="cos own",
                  cell=lambda p: format_number(p.summary.cosine_to_own_median),
                  how="median over steps", sources=("cosine_to_own",)),
    SummaryColumn(header="spikes", cell=lambda p: format_steps(p.summary.spike_steps, LIST_LIMIT),
                  how=f"the steps flagged (first {LIST_LIMIT})", sources=("spike",)),
    SummaryColumn(header="bias", cell=lambda p: str(len(p.summary.drift_steps)),
                  how="how many steps are flagged", sources=("drift",), compact=True),
    SummaryColumn(header="risk", cell=lambda p: str(len(p.summary.collapsed_steps)),
                  how="how many steps are flagged", sources=("collapsed",), compact=True),
    SummaryColumn(header="first risk", cell=lambda p: _first(p.summary.collapsed_steps),
                  how="the first step flagged", sources=("collapsed",), compact=True),
    SummaryColumn(header="risk steps",
                  cell=lambda p: format_steps(p.summary.collapsed_steps, LIST_LIMIT),
                  how=f"the steps flagged (first {LIST_LIMIT})", sources=("collapsed",)),
)  # fmt: skip
"""The summary table's built-in columns, in order (gated and on-request columns follow)."""


def _figure_column(column: columns.Column) -> SummaryColumn:
    """A gated column's whole-run figure (`Column.figure`), shown with `wide`."""
    figure, gate = column.figure, column.gate
    assert figure is not None and gate is not None

    def cell(p: PolicyResult) -> str:
        return format_number(p.summary.column_figures.get(figure))

    return SummaryColumn(header=figure, cell=cell, how=f"{gate.aggregate} over steps",
                         sources=(column.name,))  # fmt: skip


def _extra_column(column: columns.Column) -> SummaryColumn:
    """An on-request (`--metrics`) column's whole-run figure, shown in either view."""
    assert column.table is not None
    how_cell: CellFormat = column.table.format

    def cell(p: PolicyResult) -> str:
        return _cell(p.summary.column_figures.get(column.name), how_cell)

    return SummaryColumn(header=column.table.header, cell=cell, compact=True, requested=True,
                         how=f"{column.summary} over steps", sources=(column.name,))  # fmt: skip


def summary_columns(
    metrics: Sequence[MetricGroup] = (), *, wide: bool = False
) -> list[SummaryColumn]:
    """The summary table's columns: the compact view (which policy, how much discarded, did it
    blow up and when) or, with `wide`, every one; then the `metrics` groups' columns."""
    shown = [c for c in SUMMARY_COLUMNS if wide or c.compact]
    if wide:
        shown += [_figure_column(c) for c in columns.gated_columns() if c.figure is not None]
    extra = [c for c in columns.summary_columns() if c.group in metrics and c.table is not None]
    return shown + [_extra_column(c) for c in extra]


_UNJUDGED_COLUMNS = {
    "drift": ("bias", "not judged", "its 0 says nothing"),
    "spike": ("risk", "spikes not judged", "it counts non-finite updates only"),
}
"""Each rule a policy's summary may say judged no step: the column it counts into, what was
not judged, and what that column then shows."""


def unjudged_lines(
    result: ReplayResult,
    names: Mapping[str, tuple[str, str, str]] = _UNJUDGED_COLUMNS,
) -> list[str]:
    """A line for each rule that judged no step of some policy (`PolicySummary.unjudged`),
    naming the policies unless it is all of them: a count of 0 there is not a clean bill.
    names: as `_UNJUDGED_COLUMNS`, for a table whose columns are named otherwise."""
    lines = []
    for rule, (column, judged, meaning) in names.items():
        reasons: dict[str, list[str]] = {}
        for p in result.policies:
            if rule in p.summary.unjudged:
                reasons.setdefault(p.summary.unjudged[rule], []).append(p.spec)
        for why, specs in reasons.items():
            which = "" if len(specs) == len(result.policies) else f" for {', '.join(specs)}"
            lines.append(f"{column}: {judged}{which} ({why}): {meaning}")
    return lines


def print_summary(
    result: ReplayResult,
    console: Console,
    metrics: Sequence[MetricGroup] = (),
    *,
    wide: bool = False,
    legend: bool = True,
) -> None:
    """One line per policy, the run's own policy and the best one marked (`wide`: every
    column; `metrics`: the groups of on-request columns to add, in tables of their own where
    they would not fit the console beside the rest: `table_parts`); under it, unless `legend`
    is False, one legend line per column shown and the rule that picks `best`."""
    caption = _caption(result)
    star = "*" if caption else ""
    title = (
        f"Replay of {result.run}: {counted(result.steps, 'step')}, geometry {result.geometry} "
        f"(coverage {result.geometry_coverage:.0%})"
    )
    shown = summary_columns(metrics, wide=wide)
    headers = [c.header + (star if "update_norm" in c.sources else "") for c in shown]
    rows = [[column.cell(p) for column in shown] for p in result.policies]
    widths = whole_widths(headers, rows)
    requested = [c.requested for c in shown]
    stacked = False  # the headers a word a line, where a key=value needs the room
    if not wide:  # with `wide`, a spec on one line: the table overflows the terminal on purpose
        beside = [w for w, c in zip(widths[1:], shown[1:], strict=True) if not c.requested]
        room = spec_room(beside, console.width)
        cells, folded = fold_specs([row[0] for row in rows], room)
        stacked = folded > room  # a key=value wider than the room: stacked headers leave more
        if stacked:
            for i in range(1, len(shown)):
                widths[i] = stacked_width(headers[i], (row[i] for row in rows))
            beside = [w for w, c in zip(widths[1:], shown[1:], strict=True) if not c.requested]
            cells, folded = fold_specs([row[0] for row in rows], spec_room(beside, console.width))
        for row, cell in zip(rows, cells, strict=True):
            row[0] = cell
        widths[0] = max(len(headers[0]), folded)
    for n, part in enumerate(table_parts(requested, widths, console.width, wide=wide)):
        table = Table(title=title if n == 0 else None, title_justify="left")
        for i in part:
            if shown[i].numeric:  # never narrower than its widest cell: a number is never cut
                table.add_column(headers[i], no_wrap=True, min_width=widths[i], justify="right")
            else:  # the policy, its lines whole
                table.add_column(headers[i], no_wrap=True, min_width=widths[i])
        for row in rows:
            table.add_row(*(row[i] for i in part))
        if stacked:
            stack_headers(table, console)
        print_whole(table, console)
    if caption is not None:  # text under the table, wrapped to the console like the legend
        print_legend([caption], console)
    for line in unjudged_lines(result):
        console.print(line, highlight=False, soft_wrap=False)
    if legend:
        marks = {m for p in result.policies for m in _marks(p)}
        notes = "; ".join(note for mark, note in MARK_NOTES.items() if mark in marks)
        lines = [
            c.legend() + (f"; {notes}" if c.header == "policy" and notes else "") for c in shown
        ]
        print_legend([*lines, BEST_RULE], console)
    print_observed(result, console)
    own = result.own
    if own is None:
        note = (
            f"the run's own policy ({shortened(result.run_policy_spec or 'not recorded')}) is "
            "not among the replayed policies"
        )
    else:
        s = own.summary
        note = (
            f"own policy {own.spec}: loss parity {format_number(s.loss_parity)} ("
            + (
                result.loss_parity_gap
                if s.loss_parity is None
                else "median relative error of -J vs the recorded loss"
            )
            + f"), fidelity {format_number(s.fidelity)}"
            + (f" ({result.fidelity_gap})" if s.fidelity is None else "")
        )
    hidden = "" if wide else "  More columns: --wide."
    for line in (*wrap_line(note, console.width), FOOTER + hidden):  # a spec never split in a pair
        console.print(line, highlight=False, soft_wrap=False)


def _unflagged(row: Mapping[str, object]) -> str:
    """A step row's flags cell when no flag is set: "n/j" when the spike rule did not judge
    the step (`spike_judged`: no history yet), else "-"."""
    return "-" if row["spike_judged"] else "n/j"


def _cell(value: object, how: CellFormat) -> str:
    if how == "int":
        return "n/a" if value is None else str(value)
    number = value if isinstance(value, (int, float)) else None
    if how == "percent":
        return "n/a" if number is None or math.isnan(number) else f"{number:.1%}"
    return format_number(number, 4 if how == "number4" else 3)


def detail_legend(shown: Sequence[columns.Column], flags: Sequence[str]) -> list[str]:
    """The per-step table's legend: one line per column shown, from its declaration."""
    lines = [
        (c.table.header if c.table.header == c.name else f"{c.table.header} ({c.name})")
        + f": {_clause(c.meaning)}"
        for c in shown
        if c.table is not None
    ]
    flagged = "; ".join(f"{name}: {_clause(_MEANINGS[name])}" for name in flags)
    unjudged = (
        f"n/j: none, and the spike rule did not judge the step (the first {SPIKE_MIN_HISTORY} "
        "finite, non-zero update norms of a kind have no history to compare with)"
    )
    return [*lines, f"flags: {flagged}; {unjudged}"]


COMPACT_STEP_COLUMNS = ("step", "discard_frac", "update_norm", "net_push")
"""The per-step table's columns without `wide` (then the on-request ones, and the flags)."""


TOP_HEADERS = ("seq id", "group", "reward", "advantage", "log ratio", "contribution")
"""The columns of a flagged step's top sequences (`--detail`)."""


def _print_top(title: str, seqs: Sequence[TopSequence], console: Console) -> None:
    """A flagged step's top sequences, a row each, each column as wide as its widest cell;
    where that table is wider than the console, `print_fitted`'s stacked headers or a block a
    sequence (never a figure cut, nor the terminal overflowed; the title wrapped to it)."""
    rows = [
        (
            str(seq.seq_id),
            "-" if seq.group is None else str(seq.group),
            format_number(seq.reward),
            format_number(seq.advantage),
            format_number(seq.log_ratio),
            format_number(seq.contribution),
        )
        for seq in seqs
    ]
    widths = whole_widths(TOP_HEADERS, rows)
    fits = table_width(widths) <= console.width  # then rich measures no cell (a fixed width)
    top = Table(title=title, title_justify="left")
    for header, width in zip(TOP_HEADERS, widths, strict=True):
        top.add_column(header, no_wrap=True, width=width if fits else None)
    for row in rows:
        top.add_row(*row)
    if fits:  # one measure of the table, not print_fitted's three: 478 tables on a fixture
        print_whole(top, console)
    else:
        print_fitted(top, console, named=True)


def print_detail(
    result: ReplayResult,
    console: Console,
    metrics: Sequence[MetricGroup] = (),
    *,
    wide: bool = False,
    legend: bool = True,
) -> None:
    """Per-step rows of the reported range, one table a policy (cells and flags as declared
    in `columns.COLUMNS`: `COMPACT_STEP_COLUMNS`, or every one with `wide`, and the on-request
    columns of `metrics`, split off as the summary's are; numbers never wrapped; none for a
    policy without a step in the range), then the flagged steps' top sequences; unless
    `legend` is False, the columns' legend."""
    shown = [
        c
        for c in columns.table_columns(tuple(metrics))
        if c.table is not None and (wide or c.group is not None or c.name in COMPACT_STEP_COLUMNS)
    ]
    flags = [c.name for c in columns.reported_columns() if c.flag]
    span = (
        "every step"
        if result.step_range == (None, None)
        else f"steps {format_step_range(result.step_range)}"
    )
    headers = [c.table.header for c in shown if c.table is not None] + ["flags"]
    requested = [c.group is not None for c in shown] + [False]
    flags_at = len(shown)
    for p in result.policies:
        if not len(p.series):  # `--steps` selected no step: a warning says so, not empty tables
            continue
        marks = _marks(p)
        title = f"{p.spec}{' (' + ', '.join(marks) + ')' if marks else ''}: {span}"
        rows = [
            [_cell(row[c.name], c.table.format) for c in shown if c.table is not None]
            + [",".join(name for name in flags if row[name]) or _unflagged(row)]
            for row in p.series.iter_rows()
        ]
        widths = whole_widths(headers, rows)
        for n, part in enumerate(table_parts(requested, widths, console.width, wide=wide)):
            table = Table(title=title if n == 0 else None, title_justify="left")
            for i in part:
                table.add_column(
                    headers[i],
                    no_wrap=True,
                    justify="left" if i == flags_at else "right",
                    width=widths[i],
                )
            for row in rows:
                table.add_row(*(row[i] for i in part))
            print_whole(table, console)
        for number, seqs in sorted((p.detail or {}).items()):
            _print_top(f"{p.spec} step {number}: sequences contributing most", seqs, console)
    if legend and any(len(p.series) for p in result.policies):
        print_legend(detail_legend(shown, flags), console)
