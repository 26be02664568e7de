"""`stabledrl diff` with tolerances at their limits: no arithmetic warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from _corpus import edit_header
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder
from stabledrl_cli.replay.diff.values import entry_differences

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
runner = CliRunner()


def test_the_largest_tolerances_say_no_overflow():
    """--atol 1e308 --rtol 1e308 (finite, so accepted) printed 'warning: overflow encountered
    in multiply' and '... in add' (numpy's, from |b| * rtol past float64) before the result;
    the tolerance is then infinite, which is what was asked: no line, the same verdict."""
    args = ["diff", str(FIXTURES / "grpo"), str(FIXTURES / "stabledrl")]
    plain = runner.invoke(app, args)
    result = runner.invoke(app, [*args, "--atol", "1e308", "--rtol", "1e308"])
    assert "overflow" not in result.stderr, result.stderr
    assert not result.stderr.startswith("warning:"), result.stderr
    assert (plain.exit_code, result.exit_code) == (1, 1)
    assert "log-probs   equal on all 160 compared steps" in result.stdout


def test_values_whose_gap_overflows_differ_without_a_warning():
    """Two float64 entries 1e308 and -1e308: their gap is past float64 (numpy warned
    'overflow encountered in subtract'); they differ, by an infinite gap that is not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = entry_differences(np.array([1e308, 0.0]), np.array([-1e308, 0.0]), 1e-6, 1e-6)
    assert found == "1 of 2 differ, first at 0"


def test_a_nan_or_inf_against_another_value_is_named():
    """A NaN in one run where the other has a number: the entries were counted but the
    largest gap shown left the NaN out ('2 of 3 differ, first at 0, max |a-b| 0.5'), as if
    the runs differed by 0.5 at most. The non-finite ones are counted apart; NaN against NaN
    and an infinity against the same one agree."""
    a = np.array([1.0, np.nan, np.inf, np.nan, np.inf])
    b = np.array([1.5, 2.0, -np.inf, np.nan, np.inf])
    found = entry_differences(a, b, 1e-6, 1e-6)
    assert found == "3 of 5 differ, first at 0, max |a-b| 0.5, 2 NaN or inf against another value"
    assert entry_differences(np.array([np.nan]), np.array([0.0]), 0.0, 0.0) == (
        "1 of 1 differ, first at 0, 1 NaN or inf against another value"
    )


def _counted(path: Path, name: str, counts: list[float]) -> Path:
    """A run of scalar steps recording a loss and this count scalar (`nonfinite`, which the
    Recorder derives, written into each step's header)."""
    with Recorder(path, policy=None) as recorder:
        for step in range(len(counts)):
            recorder.log_step(step, loss=0.5)
    for step, count in enumerate(counts):
        edit_header(path, step, lambda h, c=count: h["__metadata__"].update({name: repr(c)}))
    return path


@pytest.mark.parametrize("name", ["nonfinite", "nonfinite_grads", "inner_step"])
def test_a_count_is_compared_exactly(tmp_path, name):
    """A count scalar (non-finite values, parameters with a non-finite gradient, the inner
    iteration) was compared within the float tolerance: 100000 against 100001 agreed (within
    rtol 1e-5), exit 0 'they never part'. A different count is a parting: exit 1 at step 1,
    whatever the tolerance; the loss beside it keeps the tolerance."""
    a = _counted(tmp_path / "a", name, [0.0, 100000.0, 3.0])
    b = _counted(tmp_path / "b", name, [0.0, 100001.0, 3.0])
    args = ["diff", str(a), str(b), "--device", "cpu", "-f", "json", "--atol", "10"]
    done = runner.invoke(app, args)
    assert done.exit_code == 1, done.output
    report = json.loads(done.stdout)
    assert report["parted_at"] == 1
    assert report["first"]["scalars"]["fields"] == [{"field": name, "what": "100000 vs 100001"}]
    same = _counted(tmp_path / "same", name, [0.0, 100000.0, 3.0])
    assert runner.invoke(app, [*args[:2], str(same), *args[3:]]).exit_code == 0
