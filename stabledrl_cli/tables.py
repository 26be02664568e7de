"""How a rich table meets an 80-column terminal: split into tables that fit, cells wrapped at
their spaces or a spec at its commas, headers stacked a word a line, and where nothing fits,
one block of `header: cell` pairs a row. Never a figure cut or a word broken."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from stabledrl_cli.errors import cut
from stabledrl_cli.spec import wrap_line, wrap_spec

META_SHOWN = 200
"""Characters of a value of an input (a meta key or value, a policy spec) that a
table or a note shows (`--format json` has it whole)."""


def shortened(value: object, limit: int = META_SHOWN) -> str:
    """A value of an input for a table or a note (a meta key or value, a manifest's policy spec,
    estimator or source; a scalar's name, `limit` NAME_SHOWN) as text, cut at `limit`
    characters: a multi-MB one never prints whole, nor is wrapped or padded to its width."""
    text = value if isinstance(value, str) else json.dumps(value)
    return cut(text, limit, "; --format json has it whole")


def table_parts(
    requested: Sequence[bool], widths: Sequence[int], width: int, *, wide: bool
) -> list[list[int]]:
    """A table's columns (indices; the widest cell of each is `widths`, the on-request ones
    `requested`) table by table: all in one, unless the on-request columns would take it past
    `width` (and not `wide`, which overflows the terminal on purpose); then the built-in
    columns, and the on-request ones in as few tables as fit, each led by the first column
    (the policy, or the step)."""
    everything = list(range(len(requested)))
    if wide or _table_width(everything, widths) <= width:
        return [everything]
    parts = [[i for i in everything if not requested[i]]]
    for i in everything:
        if requested[i]:
            if len(parts) == 1 or _table_width([*parts[-1], i], widths) > width:
                parts.append([0])
            parts[-1].append(i)
    return parts


def _table_width(part: Sequence[int], widths: Sequence[int]) -> int:
    """The width of a table of the columns `part` (`table_width`)."""
    return table_width([widths[i] for i in part])


def table_width(widths: Sequence[int]) -> int:
    """The width of a table whose columns are `widths` wide: each a space either side and a
    border after it, and the first border."""
    return 1 + sum(width + 3 for width in widths)


def whole_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """The width of each of a table's first columns (one a header) with every cell on one
    line. Given to rich as a column's `width`, rich measures none of its cells as it renders
    the table (a third of `replay --detail`'s time)."""
    return [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]


def spec_room(widths: Sequence[int], width: int) -> int:
    """The columns a spec column has in a table `width` wide beside columns whose widest cells
    are `widths` wide."""
    return width - _table_width(range(len(widths) + 1), [*widths, 0])


def shared_widths(narrowest: Sequence[int], natural: Sequence[int], room: int) -> list[int]:
    """Widths of wrapping columns beside a spec column in a table whose spec column has `room`
    columns to spare (`spec_room` of `narrowest`, less the spec column's width): each column
    its `narrowest` (its longest word) and a share of the spare, one a column in turn, up to
    its `natural` width (its cells on a line each). Never under the narrowest, where rich's
    own shrinking breaks words: a table too narrow overflows the terminal instead."""
    widths = list(narrowest)
    wanting = [i for i, want in enumerate(natural) if want > widths[i]]
    while room > 0 and wanting:
        for i in wanting[:room]:
            widths[i] += 1
        room -= len(wanting[:room])
        wanting = [i for i in wanting if natural[i] > widths[i]]
    return widths


def fold_specs(specs: Sequence[str], room: int) -> tuple[list[str], int]:
    """`specs` (each a spec, maybe tagged after it) as the cells of a column `room` wide, each
    broken at its commas onto the lines below (`wrap_spec`), never inside a key=value (one wider
    than `room` is a line of its own: the table overflows rather than break it); and their
    widest line's width, the min_width of the no_wrap column that shows each whole."""
    cells = ["\n".join(wrap_spec(spec, room, whole=True)) for spec in specs]
    return cells, max((len(line) for cell in cells for line in cell.splitlines()), default=0)


def print_title(table: Table, console: Console) -> None:
    """Prints `table`'s title as lines of text wrapped to the console, a spec too long for a
    line broken at its commas (`wrap_line`), and takes it off the table: a title as long as a
    run's path must never widen the table it names."""
    if table.title is not None:
        for line in wrap_line(str(table.title), console.width):
            console.print(line, highlight=False, soft_wrap=False)
        table.title = None


def print_whole(table: Table, console: Console) -> None:
    """`table` at the console's width when it fits whole, else at its natural width (a table
    too wide for the terminal overflows it rather than cut or break a cell). Its title is text:
    printed above it, wrapped to the console, so a long run path never widens the table."""
    _print_at_least(table, console, _natural_width(table, console))


def print_unbroken(table: Table, console: Console) -> None:
    """`table` at the console's width, the cells of its wrapping columns wrapped at their
    spaces; where that is not enough, at the narrowest width that breaks no word (the table
    overflows the terminal rather than cut or break a cell). A no_wrap column needs a
    min_width of its widest cell. Its title is printed as print_whole's."""
    _print_at_least(table, console, narrowest_width(table, console))


def _print_at_least(table: Table, console: Console, width: int) -> None:
    """`table` under its title (`print_title`), at the console's width or `width`, the wider."""
    print_title(table, console)
    if width > console.width:
        table.width = width
    console.print(table, crop=False)


def stack_headers(table: Table, console: Console) -> None:
    """Where `table` is wider than the console, each column's header a word a line (broken at
    its spaces and underscores), so a header is never what makes a table overflow."""
    if _natural_width(table, console) > console.width:
        for column in table.columns:
            if isinstance(column.header, str):
                column.header = column.header.translate(_HEADER_BREAKS)


def print_fitted(table: Table, console: Console, *, lead: int = 1, named: bool = False) -> None:
    """`table` with its headers stacked (`stack_headers`) as `print_unbroken` prints it where
    that fits the console; else one block a row, as `policies` does: the row's first `lead`
    cells (each `header: cell` when `named`), then each other column's `header: cell`, as many
    on a line as fit and never one split. A figure is never cut, nor the terminal overflowed
    (only by a pair wider than it). Its title above, its caption below, as lines of text."""
    headers = [" ".join(str(column.header).split()) for column in table.columns]
    stack_headers(table, console)
    if narrowest_width(table, console) <= console.width:
        print_unbroken(table, console)
        return
    print_title(table, console)
    cells = [[_plain(cell) for cell in column.cells] for column in table.columns]
    for row in zip(*cells, strict=True):
        heads = [_unfolded(c) for c in row[:lead]]
        if named:
            heads = [f"{h}: {c}" for h, c in zip(headers, heads, strict=False)]
        for line in _heading([h for h in heads if h], console.width):
            console.print(line, highlight=False, soft_wrap=True)
        pairs = [
            f"{h}: {' '.join(c.split())}" for h, c in zip(headers[lead:], row[lead:], strict=True)
        ]
        for line in _packed(pairs, console.width - 2):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
    if table.caption is not None:
        for line in wrap_line(str(table.caption), console.width):
            console.print(line, highlight=False, soft_wrap=True)


def _heading(heads: Sequence[str], width: int) -> list[str]:
    """A block's heading: its last head (a spec, a series' name) wrapped to `width`
    (`wrap_line`), the heads before it (a tune setting's mark) on its first line, never a line
    of their own. A part wider than `width` (a name of 250 characters) is broken at its edge:
    it would overflow the terminal whole."""
    if not heads:
        return []
    before = " ".join(heads[:-1])
    room = width - len(before) - 1 if before else width
    first, *rest = wrap_line(heads[-1], room, whole=True) or [""]
    lines = [" ".join(filter(None, (before, first))), *rest]
    return [
        part for line in lines for part in (wrap_spec(line, width) if len(line) > width else [line])
    ]


def _unfolded(cell: str) -> str:
    """A cell's lines on one (a spec folded by `fold_specs` whole again: no space after its
    colon or a comma)."""
    lines = cell.strip().splitlines()
    return "".join(
        line if not i or lines[i - 1].endswith((":", ",")) else f" {line}"
        for i, line in enumerate(lines)
    )


def _plain(cell: object) -> str:
    """A table cell's text (a str, or a rich Text's plain text)."""
    return cell.plain if isinstance(cell, Text) else str(cell)


def _packed(pairs: Sequence[str], width: int) -> list[str]:
    """`pairs` two spaces apart, as many on a line as fit `width`; a wider one on lines of its
    own, wrapped at its spaces (`wrap_line`: a spec at its commas, never inside a key=value),
    its next lines indented under its first."""
    lines: list[str] = []
    shared = False  # whether the last line may take another pair
    for pair in pairs:
        if shared and len(lines[-1]) + 2 + len(pair) <= width:
            lines[-1] += f"  {pair}"
        elif len(pair) <= width:
            lines.append(pair)
            shared = True
        else:
            first, *rest = wrap_line(pair, width - 2, whole=True)
            lines.extend([first, *(f"  {line}" for line in rest)])
            shared = False
    return lines


def stacked_width(header: str, cells: Iterable[str]) -> int:
    """The width of a column of `cells` under `header` stacked a word a line (`stack_headers`)."""
    return max([*map(len, header.translate(_HEADER_BREAKS).splitlines()), *map(len, cells)])


def narrowest_width(table: Table, console: Console) -> int:
    """The width `table` takes with its wrapping cells broken at every space: the narrowest
    at which no word of a cell is broken."""
    return Measurement.get(console, console.options.update(width=_UNBOUNDED), table).minimum


def _natural_width(table: Table, console: Console) -> int:
    """The width `table` takes with every cell and header on one line."""
    return Measurement.get(console, console.options.update(width=_UNBOUNDED), table).maximum


_UNBOUNDED = 100_000
_HEADER_BREAKS = str.maketrans({" ": "\n", "_": "\n"})


def print_legend(lines: Sequence[str], console: Console) -> None:
    """Legend lines under a table, wrapped to the console (never cut)."""
    for line in lines:
        console.print(line, highlight=False, soft_wrap=False, style="dim")
