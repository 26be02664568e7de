"""A baseline that gates nothing is refused: a check against it could never fail."""

from __future__ import annotations

import json

import pytest
from _cli import ROOT, run_cli
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

RUN = ROOT / "fixtures" / "grpo"
NOTHING = {"observed": {}, "recorded": {"grad_norm": {}}, "policies": {"grpo": {}}}


def _baseline(path, **sections: object):
    path.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
                **sections,
            }
        )
    )
    return path


@pytest.mark.parametrize("sections", [{"policies": {}}, NOTHING])
def test_a_baseline_that_gates_nothing_is_refused(tmp_path, sections):
    """check -b of a baseline with no tolerance (no observed figure, no recorded statistic, no
    policy metric) passed (exit 0) with no gate evaluated, on a run with policies as on any
    other."""
    baseline = _baseline(tmp_path / "b.json", **sections)
    result = CliRunner().invoke(app, ["check", str(RUN), "-b", str(baseline)])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {baseline}: the baseline gates nothing (no observed figure, recorded statistic "
        "or policy metric): a check against it could never fail\n"
    )


def test_a_baseline_that_gates_one_policy_metric_alone_is_taken(tmp_path):
    metric = {"discard_frac": {"value": 1.0}}
    baseline = _baseline(tmp_path / "b.json", policies={"grpo": metric})
    result = CliRunner().invoke(app, ["check", str(RUN), "-b", str(baseline), "-f", "json"])
    assert result.exit_code == 0, result.output


def test_a_baseline_that_gates_nothing_exits_3_in_a_process(tmp_path):
    baseline = _baseline(tmp_path / "b.json", policies={})
    done = run_cli("check", RUN, "-b", baseline)
    assert done.returncode == 3, done.stderr
    assert "the baseline gates nothing" in done.stderr
