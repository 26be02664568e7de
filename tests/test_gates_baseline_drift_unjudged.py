"""A baseline's drift_steps on a policy whose net_push gives the drift rule nothing to judge (no
window of finite values): the check trips `baseline.present` "not judged" (exit 1), as it does
for collapsed_steps the spike rule judged nothing of; a pass would claim no drift where none
could have been found. --write-baseline leaves the figure out."""

from __future__ import annotations

import json

from test_gates_max_collapsed_unjudged import _baseline_gates, _policy_run
from test_gates_unjudged import _baseline
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
WINDOW = 20
"""The drift window of `_baseline`'s replay settings."""
DRIFT = {"grpo": {"drift_steps": {"value": 0}}}
NOT_JUDGED = (
    "drift_steps is in the baseline, but for 'grpo' it is not judged: the drift rule judges a "
    f"step after {WINDOW} finite net_push values in a row, and "
)


def test_a_baseline_drift_steps_on_a_run_shorter_than_the_window_trips_not_judged(tmp_path):
    """A 3-step run: 'drift_steps 0, baseline 0' held (exit 0, '1 gate holds'), though the
    drift rule judges no step before a window of 20 finite net_push values."""
    baseline = _baseline(tmp_path / "b.json", {}, DRIFT)
    code, (gate,) = _baseline_gates(_policy_run(tmp_path / "short", 3), baseline)
    assert code == 1
    assert (gate["policy"], gate["gate"], gate["ok"]) == ("grpo", "baseline.present", False)
    assert gate["figure"] is None and gate["limit"] is None
    assert gate["message"] == NOT_JUDGED + "the run has 3 steps"


def test_a_baseline_drift_steps_with_no_window_of_finite_net_push_trips_not_judged(tmp_path):
    """30 steps, but a NaN update at step 15 leaves no 20 finite net_push values in a row."""
    baseline = _baseline(tmp_path / "b.json", {}, DRIFT)
    run = _policy_run(tmp_path / "gap", 30, nonfinite_at=15)
    code, (gate,) = _baseline_gates(run, baseline)
    assert (code, gate["gate"]) == (1, "baseline.present")
    assert gate["message"] == NOT_JUDGED + "the policy's net_push has no such window"


def test_a_baseline_drift_steps_the_rule_judged_is_compared(tmp_path):
    baseline = _baseline(tmp_path / "b.json", {}, DRIFT)
    code, (gate,) = _baseline_gates(_policy_run(tmp_path / "long", 30), baseline)
    assert (code, gate["gate"], gate["ok"], gate["figure"]) == (0, "baseline.drift_steps", True, 0)


def test_write_baseline_leaves_out_drift_steps_the_rule_judged_nothing_of(tmp_path):
    short, long = _policy_run(tmp_path / "short", 3), _policy_run(tmp_path / "long", 30)
    for run, written in ((short, False), (long, True)):
        path = tmp_path / f"{run.name}.json"
        done = runner.invoke(
            app,
            ["check", str(run), "--write-baseline", str(path), "--window", str(WINDOW),
             "--device", "cpu"],
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        figures = json.loads(path.read_text())["policies"]["grpo"]
        assert ("drift_steps" in figures) is written and "discard_frac" in figures
        code, _ = _baseline_gates(run, path)
        assert code == 0  # a baseline written of a run holds on it


def test_a_baseline_drift_steps_not_judged_fails_the_check_on_stderr(tmp_path):
    """(check's exit 1 in a real process: test_check's test_exit_codes_in_a_real_process.)"""
    baseline = _baseline(tmp_path / "b.json", {}, DRIFT)
    run = _policy_run(tmp_path / "short", 3)
    done = runner.invoke(app, ["check", str(run), "-b", str(baseline), "--device", "cpu"])
    assert done.exit_code == 1, done.stderr
    assert f"grpo baseline.present: {NOT_JUDGED}the run has 3 steps" in done.stderr
    assert "check passed" not in done.stderr and "Traceback" not in done.stderr
