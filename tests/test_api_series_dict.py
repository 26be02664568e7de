"""A replay's per-step series converts to a dict of columns (and so to a DataFrame), as a
step of a run does."""

from __future__ import annotations

import numpy as np

import stabledrl_cli as sd


def test_dict_of_a_series_holds_every_column_by_name() -> None:
    """Before, `dict(series)` raised ValueError ('dictionary update sequence element #0 has
    length 4; 2 is required'): the series iterated its names but had no `keys()`."""
    result = sd.replay("fixtures/grpo", policies=["grpo"], step_range=(0, 12), device="cpu")
    series = result.policy("grpo").series
    columns = dict(series)
    assert list(columns) == list(series) == series.keys()
    assert len(columns["step"]) == len(series) == 12
    np.testing.assert_array_equal(columns["step"], np.arange(12))
    np.testing.assert_array_equal(columns["update_norm"], series["update_norm"])
