"""The collapse warning's per-step median (`detectors.own_likelihood`) equals np.median's over
the scored finite values, on even and odd counts, ties and extremes."""

from __future__ import annotations

import numpy as np
import pytest

from stabledrl_cli.replay.detectors import own_likelihood


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 8, 1001, 1002, 142076])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_median_of_scored_finite_values_is_numpys(size: int, dtype: type) -> None:
    rng = np.random.default_rng(size)
    values = (-rng.gamma(0.6, 1.5, size=size)).astype(dtype)
    values[::3] = np.round(values[::3], 1)  # ties
    mask = rng.random(size) < 0.8
    mask[0] = True
    values[rng.random(size) < 0.01] = -np.inf
    scored = values[mask & np.isfinite(values)]
    expected = float(np.median(scored.astype(np.float64))) if scored.size else float("nan")
    got = own_likelihood(values, mask.astype(np.uint8))
    assert got == expected or (np.isnan(got) and np.isnan(expected))


def test_ties_at_both_middles_give_the_tied_value() -> None:
    values = np.array([-3.0, -1.0, -1.0, -1.0, -1.0, 0.5], dtype=np.float32)
    assert own_likelihood(values, np.ones(6)) == -1.0


def test_the_two_middles_of_an_even_count_are_averaged() -> None:
    values = np.array([4.0, -2.0, 1.0, 3.0], dtype=np.float32)
    assert own_likelihood(values, np.ones(4)) == 2.0
