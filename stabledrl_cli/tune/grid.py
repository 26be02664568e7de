"""Sweep specs: a policy spec whose values may be grids.

    NAME:key=LOW..HIGH:N       N values evenly spaced from LOW to HIGH (both included)
    NAME:key=LOW..HIGH:logN    N values evenly spaced in log from LOW to HIGH (LOW > 0)
                               (the points between LOW and HIGH are rounded to 4
                               significant digits, or as many more as keep the points
                               apart; to whole numbers for an integer key)
    NAME:key=A|B|C             the values listed
    NAME:key=VALUE             one value

Several keys of one spec sweep together as a product: `ppo:eps_low=0.1..0.3:3,eps_high=
0.2..0.4:3` is 9 settings. Every setting is checked against the catalogue (a bad value is a
usage error naming the setting: a listed value is taken as written, so `seed=1.4` is refused
as `replay -p clip-cov:seed=1.4` is) and named by its canonical spec; settings that are the
same policy after rounding (a range over an integer key) or defaults count once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from stabledrl_cli.errors import UsageError, quoted, quoted_spec
from stabledrl_cli.policies import MAX_POLICIES, REGISTRY, resolve_spec
from stabledrl_cli.policies._config import type_hints
from stabledrl_cli.policies._spec import base_type, finite_number
from stabledrl_cli.spec import format_spec, format_value

MAX_POINTS = 1024
"""The most values one grid may have."""
SWEEP_SYNTAX = "NAME:key=LOW..HIGH:N, key=LOW..HIGH:logN, key=A|B|C or key=VALUE"


def _range(text: str) -> tuple[str, str, bool, str] | None:
    """LOW..HIGH:N or LOW..HIGH:logN -> (LOW, HIGH, log, N); None for other text. LOW is the
    text before the first `..` (`.1...5:3` is .1 to .5); spaces around each part are left
    out, as `replay -p` leaves them around a value. Linear in the text's length (a
    backtracking pattern took quadratic time on a value of many dots)."""
    head, colon, count = text.rpartition(":")
    low, dots, high = (part.strip() for part in head.partition(".."))
    count = count.strip()
    log = count.startswith("log")
    digits = count.removeprefix("log")
    ok = colon and dots and low and high and ":" not in head
    if not (ok and digits.isascii() and digits.isdigit()):
        return None
    return low, high, log, digits


def grid_values(text: str, where: str, *, integer: bool = False) -> list[str]:
    """One key's value text -> the values it sweeps, as spec text. integer: a range's ends
    must be whole numbers and its points are rounded to whole numbers (listed values are taken
    as written)."""
    match = _range(text)
    if match is None and (":" in text or ".." in text):  # no value of a spec holds either
        raise UsageError(
            f"{where}: bad grid {quoted(text)}; a grid is LOW..HIGH:N or LOW..HIGH:logN "
            f"(N from 2 to {MAX_POINTS})"
        )
    if match is None:
        values = [part.strip() for part in text.split("|")]
        if any(not v for v in values):
            raise UsageError(f"{where}: empty value in {quoted(text)}; expected {SWEEP_SYNTAX}")
        return list(dict.fromkeys(values))  # a value listed twice is one setting
    low_text, high_text, log, count_text = match
    low = finite_number(where, low_text)
    high = finite_number(where, high_text)
    digits = count_text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_POINTS)) or not 2 <= int(digits) <= MAX_POINTS:
        shown = digits if len(digits) <= 12 else f"a {len(digits)}-digit number"
        raise UsageError(f"{where}: a grid takes 2 to {MAX_POINTS} points, got {shown}")
    count = int(digits)
    first, last = Decimal(low_text), Decimal(high_text)  # exact, where floats stop at 2**53
    if not first < last:
        raise UsageError(f"{where}: a grid runs from low to high, got {quoted(text)}")
    whole = first == first.to_integral_value() and last == last.to_integral_value()
    if integer and not whole:  # as replay -p refuses 0.5
        raise UsageError(
            f"{where}: a grid over an integer key runs between whole numbers, got {quoted(text)}"
        )
    if log:
        if low <= 0:
            raise UsageError(f"{where}: a log grid needs low > 0, got {quoted(text)}")
        lo, hi = math.log(low), math.log(high)  # in logs: high / low may overflow
        points = [math.exp(lo + (hi - lo) * i / (count - 1)) for i in range(count)]
        relative_step = math.expm1(min((hi - lo) / (count - 1), 1.0))  # 1: 4 digits anyway
    else:  # weighted ends: high - low may overflow
        points = [low * (1 - i / (count - 1)) + high * (i / (count - 1)) for i in range(count)]
        scale = max(abs(low), abs(high))  # each end scaled first: high - low may overflow
        relative_step = (high / scale - low / scale) / (count - 1)
    points[-1] = high
    if integer:  # the points themselves, not their 4-digit forms: 0..12345:2 ends at 12345
        start, stop = int(first), int(last)  # linear points in integers too
        between = (
            [round(p) for p in points[1:-1]]
            if log
            else [
                round(start + (stop - start) * Fraction(i, count - 1)) for i in range(1, count - 1)
            ]
        )
        return list(dict.fromkeys(str(v) for v in (start, *between, stop)))
    # 4 significant digits, more when the points lie closer than that tells apart (a grid
    # of 1.0000001..1.0000002 was rounded to 1, a value the user never wrote)
    apart = 2 + math.ceil(-math.log10(relative_step)) if relative_step > 0 else 17  # underflow
    significant = min(17, max(4, apart))
    inner = [format_value(float(f"{p:.{significant}g}")) for p in points[1:-1]]
    return [format_value(low), *inner, format_value(high)]  # the ends as written


def _integer_keys(name: str) -> set[str]:
    hints = type_hints(REGISTRY[name].config)
    return {key for key, hint in hints.items() if base_type(hint) is int}


def expand(sweep: str) -> list[str]:
    """One sweep spec -> the canonical specs of its settings, in grid order."""
    name, colon, rest = sweep.strip().partition(":")
    name = name.strip()
    if name not in REGISTRY:
        raise UsageError(
            f"unknown policy {quoted(name)} in {quoted_spec(sweep)}; valid: {', '.join(REGISTRY)}"
        )
    keys: list[str] = []
    axes: list[list[str]] = []
    if colon:
        for part in rest.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise UsageError(
                    f"bad sweep {quoted_spec(sweep)}: {quoted(part.strip())}; "
                    f"expected {SWEEP_SYNTAX}"
                )
            if key in keys:
                raise UsageError(f"bad sweep {quoted_spec(sweep)}: key {quoted(key)} given twice")
            if key not in REGISTRY[name].keys:  # before its values: the line names it bounded
                raise UsageError(
                    f"unknown key {quoted(key)} for policy {name!r}; "
                    f"valid keys: {', '.join(REGISTRY[name].keys)}"
                )
            where = f"sweep {quoted_spec(sweep)}, {key}"
            values = grid_values(value, where, integer=key in _integer_keys(name))
            keys.append(key)
            axes.append(values)
    total = math.prod(len(a) for a in axes)
    if total > MAX_POLICIES:
        raise UsageError(f"sweep {quoted_spec(sweep)} has {total} settings; at most {MAX_POLICIES}")
    specs = []
    for combo in itertools.product(*axes):
        text = format_spec(name, dict(zip(keys, combo, strict=True)))
        entry, config = resolve_spec(text)
        specs.append(entry.spec_of(config))
    return list(dict.fromkeys(specs))


def expand_all(sweeps: Sequence[str]) -> list[str]:
    """Every sweep's settings, in order, each policy once."""
    specs: dict[str, None] = {}
    for sweep in sweeps:  # each sweep is bounded: stop at the first that passes the bound
        specs.update(dict.fromkeys(expand(sweep)))
        if len(specs) > MAX_POLICIES:
            raise UsageError(
                f"the sweeps hold more than {MAX_POLICIES} settings in all; tune takes at most "
                f"{MAX_POLICIES}"
            )
    if not specs:
        raise UsageError(f"no setting to tune: give -p SWEEP ({SWEEP_SYNTAX})")
    return list(specs)
