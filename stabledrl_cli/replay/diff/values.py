"""How two arrays or two scalars differ, in words, within a tolerance (`diff_runs`).

Two values a, b (a from run A, b from run B) agree within the tolerance when
|a - b| <= atol + rtol * |b|, or both are NaN, or both are the same infinity.
"""

from __future__ import annotations

import numpy as np


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def array_type(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


def _is_float(a: np.ndarray) -> bool:
    return bool(np.issubdtype(a.dtype, np.floating))


def past_float64() -> np.errstate:
    """Inside: a gap or a tolerance past float64's largest number is infinite, as it should
    be, without a warning (the largest finite tolerances, 1e308, made one), and inf - inf is
    NaN (no gap), without one either."""
    return np.errstate(over="ignore", invalid="ignore")


def entry_differences(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> str | None:
    """None when a and b agree (exactly with atol = rtol = 0; NaN agrees with NaN), else how
    they differ, in words."""
    if a.shape != b.shape or _is_float(a) != _is_float(b):
        return f"{array_type(a)} vs {array_type(b)}"
    x, y = a.reshape(-1), b.reshape(-1)
    gaps: np.ndarray | None = None
    nonfinite = 0
    if _is_float(x):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        with past_float64():
            bad = ~np.isclose(x64, y64, rtol=rtol, atol=atol, equal_nan=True)
            gaps = np.abs(x64 - y64)[bad]
        nonfinite = int(np.count_nonzero(~(np.isfinite(x64[bad]) & np.isfinite(y64[bad]))))
    else:
        bad = x != y
    count = int(np.count_nonzero(bad))
    if count == 0:
        return None
    detail = f"{count} of {x.size} differ, first at {int(np.flatnonzero(bad)[0])}"
    if gaps is not None and np.isfinite(gaps).any():
        detail += f", max |a-b| {float(gaps[np.isfinite(gaps)].max()):.4g}"
    if nonfinite:
        detail += f", {nonfinite} NaN or inf against another value"
    return detail


def scalar_text(value: float | None, *, digits: int | None = None) -> str:
    """`digits` significant digits, or (None) as many as tell it from any other float."""
    if value is None:
        return "absent"
    return repr(float(value)) if digits is None else f"{value:.{digits}g}"


def scalars_text(x: float | None, y: float | None) -> str:
    """'x vs y' with 6 significant digits, or the fewest more that tell the two apart."""
    for digits in range(6, 17):
        texts = scalar_text(x, digits=digits), scalar_text(y, digits=digits)
        if texts[0] != texts[1]:
            return " vs ".join(texts)
    return f"{scalar_text(x)} vs {scalar_text(y)}"
