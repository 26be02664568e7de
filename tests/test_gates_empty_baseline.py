"""A baseline that gates nothing is refused: a check against it could never fail."""

from __future__ import annotations

import json

import pytest
from _cli import ROOT, run_cli
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay.engine import resolve_policies

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


def test_a_baseline_gating_no_policy_replays_the_own_policy_and_the_catalogue(tmp_path):
    """docs/ci.md: with no -p, check replays exactly the baseline's policies; a baseline with
    `"policies": {}` gates none, and check then replays what replay does with no -p (the
    run's own policy and the standard catalogue), the absolute gates evaluated on each."""
    observed = {"spike_steps": {"value": 0, "abs_tol": 100}}
    some = _baseline(tmp_path / "some.json", observed=observed, policies={"dapo": {}})
    none = _baseline(tmp_path / "none.json", observed=observed, policies={})
    replayed = {}
    for name, baseline in (("some", some), ("none", none)):
        args = ["check", str(RUN), "-b", str(baseline), "--max-nonfinite", "100", "-f", "json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        replayed[name] = report["policies"]
        gated = [g["policy"] for g in report["gates"] if g["gate"] == "max_nonfinite"]
        assert gated == [None, *replayed[name]]  # the run's, then each policy's
    assert replayed["some"] == ["dapo"]
    catalogue = [p.spec for p in resolve_policies(open_run(RUN), None)[0]]
    assert replayed["none"] == catalogue and len(catalogue) > 1
