"""The one number formatter of replay's tables, gate messages and `inspect`, and the cut of
replay's step lists."""

from __future__ import annotations

import math


def format_number(
    value: float | None, digits: int = 3, *, none: str = "n/a", integers: bool = False
) -> str:
    """`value` to `digits` significant digits; `none` for None, "n/a" for NaN, "inf"/"-inf";
    with `integers`, a whole number plainly (25, not 25.0 or 2.5e+01)."""
    if value is None:
        return none
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if integers and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.{digits}g}"


def format_written(value: float) -> str:
    """`value` as a file writes it, every digit (its shortest round-trip form: 1.999999, not
    2), a whole number plainly (0, not 0.0): a baseline's tolerance, from which a reader redoes
    the limit."""
    text = repr(float(value))
    return text.removesuffix(".0")


FIGURE_DIGITS = 4
"""Significant digits of a gate's figure (more where `format_figures` needs them)."""


def format_figure(value: float | None, *, count: bool = False) -> str:
    """A gate's figure to 4 digits ("n/a": None, no figure); a `count` (of steps, or a step)
    whole, plainly, and an infinite one as "none": a step that never came, such as a collapse
    the run does not have, as the gate's message says. A measure is never shown whole for
    being whole: a float32 norm past 2**24 always is."""
    return _figure(value, FIGURE_DIGITS, count)


def _figure(value: float | None, digits: int, count: bool) -> str:
    if count and value == math.inf:
        return "none"
    return format_number(value, digits, integers=count)


def format_figures(*values: float | None, count: bool = False) -> list[str]:
    """`format_figure` of each value, all to the fewest digits (4 to 17) at which different
    finite values read differently: a figure just past its limit (a 1e-4 slack) never reads
    as the limit, nor as the baseline value."""
    finite = {v for v in values if v is not None and math.isfinite(v)}
    digits = FIGURE_DIGITS
    while digits < 17 and len({format_number(v, digits, integers=count) for v in finite}) < len(
        finite
    ):
        digits += 1
    return [_figure(v, digits, count) for v in values]


def format_steps(
    steps: list[int],
    limit: int,
    *,
    empty: str = "-",
    separator: str = ",",
    more: str = "",
    named: bool = False,
) -> str:
    """Steps cut after `limit` of them: '3,5,8 (+12)' (with more=" more": '(+12 more)'), led by
    'step ' or 'steps ' when `named` (in a sentence a bare '25' reads as a count)."""
    if not steps:
        return empty
    shown = separator.join(str(s) for s in steps[:limit])
    rest = len(steps) - limit
    text = f"{shown} (+{rest}{more})" if rest > 0 else shown
    if not named:
        return text
    return ("step " if len(steps) == 1 else "steps ") + text


def format_cell(
    value: float | bool | None, *, percent: bool = False, yes: str = "yes", no: str = ""
) -> str:
    """A table cell: "-" for None, `yes`/`no` for a flag, a fraction as "12.5%" (`percent`),
    else `format_number`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return yes if value else no
    return f"{100 * value:.1f}%" if percent else format_number(value)


LIST_LIMIT = 8
"""Step lists longer than this are cut in the table (JSON has them all)."""
