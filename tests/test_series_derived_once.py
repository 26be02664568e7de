"""A policy's per-step columns, derived when read (`StepSeries`), are derived once for two
results read side by side, and never held for more than two series at a time."""

from __future__ import annotations

import collections
from functools import partial

import numpy as np
import pytest
from conftest import fixture_run

from stabledrl_cli.dump import open_run
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.step_series import Columns, StepSeries

POLICIES = ["grpo", "dapo", "cispo"]


def _counted(results: list[ReplayResult]) -> collections.Counter[int]:
    """From now on, how many times each series (by id) derives its columns."""
    derived: collections.Counter[int] = collections.Counter()

    def counting(series: StepSeries, derive: partial[Columns]) -> Columns:
        derived[id(series)] += 1
        return derive()

    for result in results:
        for p in result.policies:
            assert p.series.derive is not None
            object.__setattr__(p.series, "derive", partial(counting, p.series, p.series.derive))
            p.series.__dict__.pop("_derived", None)
    return derived


@pytest.mark.parametrize("step_range", [(None, None), (10, 40)], ids=["all", "range"])
def test_two_results_read_side_by_side_derive_each_series_once(step_range):
    """Before, the last series read alone held its columns: comparing two results column by
    column derived both series again at every column (62 derivations for 31 columns)."""
    config = ReplayConfig(device="cpu", step_range=step_range)
    first, second = (
        replay_run(open_run(fixture_run("grpo")), POLICIES, config=config) for _ in range(2)
    )
    derived = _counted([first, second])
    names = list(first.policies[0].series.columns)
    for name in names:
        np.testing.assert_array_equal(
            first.policies[0].series[name], second.policies[0].series[name]
        )
    assert sorted(derived.values()) == [1, 1]


def test_at_most_two_series_hold_their_columns():
    """Memory stays flat (docs/performance.md): reading every policy in turn keeps the
    columns of the last two read, not every policy's."""
    result = replay_run(open_run(fixture_run("grpo")), POLICIES, config=ReplayConfig(device="cpu"))
    derived = _counted([result])
    for p in result.policies:
        for name in p.series.columns:
            p.series[name]
        assert sum("_derived" in q.series.__dict__ for q in result.policies) <= 2
    assert list(derived.values()) == [1, 1, 1]
