"""What `stabledrl check` shows of its gates: a table of them on stdout (a row per gate, or
grouped by policy on a narrow terminal), today's figures when no gate is given (a replayed
run's per policy, a scalar run's recorded series), and the verdict on stderr."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from stabledrl_cli.cli._inspect_tables import series_table
from stabledrl_cli.cli._output import err, out
from stabledrl_cli.errors import counted
from stabledrl_cli.replay._format import format_figure
from stabledrl_cli.replay.baseline_write import baseline_figure
from stabledrl_cli.replay.figures import policy_metrics
from stabledrl_cli.replay.gate import GateResult
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.recorded import RecordedRun
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.spec import wrap_spec
from stabledrl_cli.tables import (
    fold_specs,
    print_fitted,
    print_legend,
    spec_room,
    stacked_width,
    table_width,
    whole_widths,
)

_CELL_PADDING = 3  # a column's padding and its right edge
_MIN_DETAIL = 12
_MIN_GATE = 12
"""The narrowest the gate column of a grouped table gets, its names folded: on a narrower
terminal the table overflows rather than lose them."""
_HEADERS = ("policy", "gate", "status", "figure", "limit")
"""The columns shown whole (the detail takes what is left of the width)."""
_BASELINE_PREFIX = "baseline."
_INDENT = "  "
Row = tuple[str, ...]
"""A gate's cells: policy, gate, status, figure, limit, detail."""


def _add_detail(table: Table, used: int) -> bool:
    """The detail column, in the width the `used` columns leave, its text wrapped onto the
    lines below (a word longer than the column folded): nothing of it is lost. Not added
    (False) when fewer than `_MIN_DETAIL` columns are left."""
    room = out.width - used - _CELL_PADDING
    if room < _MIN_DETAIL:
        return False
    table.add_column("detail", overflow="fold", max_width=room)
    return True


def _flat_table(rows: list[Row], widths: list[int]) -> Table:
    """A line per gate naming its policy, the columns `widths` wide, then the detail."""
    table = Table()
    for header, width in zip(_HEADERS, widths, strict=True):
        table.add_column(header, no_wrap=True, min_width=width)
    _add_detail(table, table_width(widths))
    for row in rows:
        table.add_row(*row)
    return table


def _grouped_table(rows: list[Row]) -> tuple[Table, list[str]]:
    """A line per policy, under it a line per gate of the policy (a baseline gate shown by
    its key in the baseline file), then the detail if at least `_MIN_DETAIL` columns are
    left; only a gate name too long for the terminal is folded (in `_MIN_GATE` columns at
    least). The table and the legend lines that say so."""
    by_policy: dict[str, list[Row]] = {}
    for policy, gate, *cells in rows:
        shown = _INDENT + gate.removeprefix(_BASELINE_PREFIX)
        by_policy.setdefault(policy, []).append((shown, *cells))
    widths = whole_widths(_HEADERS[1:], [line for group in by_policy.values() for line in group])
    widths[0] = max(widths[0], *map(len, by_policy))
    table = Table()
    table.add_column(_HEADERS[1], overflow="fold")
    for header, width in zip(_HEADERS[2:], widths[1:], strict=True):
        table.add_column(header, no_wrap=True, min_width=width)
    narrowest = table_width([min(widths[0], _MIN_GATE), *widths[1:]])
    if narrowest > out.width:  # else the gate column shrinks to nothing
        table.width = narrowest
    gate_width = max(out.width, narrowest) - table_width(widths[1:]) - _CELL_PADDING
    detailed = _add_detail(table, table_width(widths))
    for policy, group in by_policy.items():
        table.add_row("\n".join(wrap_spec(policy, gate_width)))
        for line in group:
            table.add_row(*(line if detailed else line[:-1]))
        table.add_section()
    legend = []
    if any(row[1].startswith(_BASELINE_PREFIX) for row in rows):
        legend.append(
            f"a baseline gate is shown by its key: {_BASELINE_PREFIX}KEY in JSON, JUnit and stderr"
        )
    if not detailed:
        legend.append("detail: each tripped gate's on stderr, every gate's in --format json")
    return table, legend


GATES_SHOWN = 100
"""Gates the table draws, and tripped gates stderr names, at most (a baseline may hold
thousands of series): past it, the tripped ones first, then a line counting the rest;
`--format json` and `--junit` have every gate."""


def _shown(results: list[GateResult]) -> tuple[list[GateResult], str | None]:
    """The gates the table draws (the tripped first when they are more than GATES_SHOWN), and
    the line counting the others (None when it draws them all)."""
    if len(results) <= GATES_SHOWN:
        return results, None
    ordered = [r for r in results if not r.ok] + [r for r in results if r.ok]
    hidden = ordered[GATES_SHOWN:]
    failed = sum(not r.ok for r in hidden)
    return ordered[:GATES_SHOWN], (
        f"... and {counted(len(hidden), 'more gate')} ({failed} tripped): "
        "--format json and --junit have every gate"
    )


def print_table(results: list[GateResult], run: str) -> None:
    """A row per gate at any width, at most GATES_SHOWN (`_shown`): naming its policy when the
    policy, gate, status, figure and limit fit whole on a line (the detail takes what is left,
    wrapped onto the row's next lines); else `_grouped_table`."""
    shown, more = _shown(results)
    rows: list[Row] = [
        (r.policy or "(run)", r.label, "ok" if r.ok else "FAILED", *r.shown(), r.message)
        for r in shown
    ]
    # The title is text, wrapped to the width: a long run path never widens the table.
    out.print(f"stabledrl check {run}", highlight=False, soft_wrap=False)
    widths = whole_widths(_HEADERS, rows)
    if table_width([*widths, _MIN_DETAIL]) <= out.width:
        out.print(_flat_table(rows, widths))
    else:
        table, legend = _grouped_table(rows)
        out.print(table)
        print_legend(legend, out)
    if more is not None:
        out.print(more, highlight=False)


def print_recorded(recorded: RecordedRun) -> None:
    """A scalar run's figures (what --write-baseline records): the observed behaviour, then
    the recorded series."""
    observed = recorded.observed
    spikes = _flagged_count(observed, "spike_steps", observed.recorded_spike_steps)
    nonfinite = _flagged_count(observed, "nonfinite_steps", observed.nonfinite_steps)
    out.print(
        f"observed collapse: {_collapse_text(observed)}; grad-norm spikes: {spikes}; "
        f"non-finite steps: {nonfinite}",
        highlight=False,
    )
    print_fitted(series_table(recorded.series, f"recorded series of {recorded.run}"), out)


def print_figures(result: ReplayResult) -> None:
    """Today's figures per policy (what --write-baseline records), a column per metric headed
    by its baseline key; where they do not fit the width beside each other, each key's
    words stacked (`update_norm_max` on three lines); `n/a` where it records none."""
    table = Table(
        title=f"figures of {result.run} (observed collapse: {_collapse_text(result.observed)})",
        title_justify="left",
    )
    rules = policy_metrics()
    names = list(rules)
    figures = [[baseline_figure(p, name) for name in names] for p in result.policies]
    rows = [
        [format_figure(f, count=rules[n].integer) for f, n in zip(row, names, strict=True)]
        for row in figures
    ]
    # a spec is folded only where the table does not fit with its headers stacked
    beside = [stacked_width(name, (row[i] for row in rows)) for i, name in enumerate(names)]
    specs, widest = fold_specs([p.spec for p in result.policies], spec_room(beside, out.width))
    table.add_column("policy", no_wrap=True, min_width=widest)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for spec, row in zip(specs, rows, strict=True):
        table.add_row(spec, *row)
    print_fitted(table, out)


def _collapse_text(observed: Observed) -> str:
    """The observed collapse as the figures show it: its step, none, or not judged (what
    `--write-baseline` then leaves out)."""
    if observed.unjudged("first_reward_collapse") is not None:
        return "not judged"
    collapse = observed.first_reward_collapse
    return "none" if collapse is None else f"step {collapse}"


def _flagged_count(observed: Observed, name: str, steps: Sequence[int]) -> str:
    """How many steps the run-level rule of `name` flagged, or not judged."""
    return "not judged" if observed.unjudged(name) is not None else str(len(steps))


def print_verdict(results: list[GateResult]) -> None:
    """The verdict on stderr: the gates tripped, each named with its figure (at most
    GATES_SHOWN, then a line counting the rest), or that every gate holds; nothing without a
    gate."""
    tripped = [r for r in results if not r.ok]
    if tripped:
        err.print(
            f"check failed: {len(tripped)} of {counted(len(results), 'gate')} tripped",
            highlight=False,
        )
        for r in tripped[:GATES_SHOWN]:
            err.print(f"  {r.policy or '(run)'} {r.label}: {r.message}", highlight=False)
        if len(tripped) > GATES_SHOWN:
            hidden = counted(len(tripped) - GATES_SHOWN, "more tripped gate")
            err.print(f"  ... and {hidden}: --format json and --junit have them all")
    elif results:
        hold = "holds" if len(results) == 1 else "hold"
        err.print(f"check passed: {counted(len(results), 'gate')} {hold}", highlight=False)
