"""Run-level gates on a run whose recorded series gives their rule nothing to judge: each trips,
saying what is missing, as `--fail-on-collapse` on a run without a reward does; a gate that
could never trip would pass a CI job on any run."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

runner = CliRunner()


def _scalar_run(path, steps: int, **series: list[float]):
    """A scalar run of `steps` steps, each recording the given series' value at that step."""
    with Recorder(path, policy=None) as recorder:
        for step in range(steps):
            recorder.log_step(step, **{name: values[step] for name, values in series.items()})
    return path


def _gates(run, *options: str) -> tuple[int, list[dict[str, object]]]:
    result = runner.invoke(app, ["check", str(run), *options, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)["gates"]


WINDOW = "no 10 in a row (the collapse window)"
STEADY = [1.0 + 0.01 * (step % 3) for step in range(30)]


@pytest.mark.parametrize(
    ("steps", "series", "recorded"),
    [
        (30, {"reward_mean": [0.5] * 30}, "no finite, nonzero grad_norm"),
        (30, {"grad_norm": [math.nan] * 30}, "no finite, nonzero grad_norm"),
        (30, {"grad_norm": [0.0] * 30}, "no finite, nonzero grad_norm"),
        (1, {"grad_norm": [1.0]}, "1 finite, nonzero grad_norm value"),
        (5, {"grad_norm": STEADY[:5]}, "5 finite, nonzero grad_norm values"),
    ],
)
def test_max_spikes_trips_when_no_grad_norm_can_be_judged(tmp_path, steps, series, recorded):
    """The gate passed ('0 grad-norm spike steps, limit 0', exit 0) on a run with no grad norm
    for the spike rule to judge (none recorded, every one NaN or 0, or no more than the 5 the
    rule reads before it judges a step). Its message ends as the collapse gate's does: 'there
    is no judged grad-norm step to gate', not 'there are no grad-norm spikes to gate' (read as
    the run having none)."""
    run = _scalar_run(tmp_path / "run", steps, **series)
    code, (gate,) = _gates(run, "--max-spikes", "0")
    assert code == 1
    assert gate["gate"] == "max_spikes" and not gate["ok"]
    assert gate["figure"] is None and gate["limit"] == 0
    assert gate["message"] == (
        f"the run recorded {recorded}; the spike rule judges a step after 5 such: there is "
        "no judged grad-norm step to gate"
    )
    assert "no grad-norm spikes" not in gate["message"]


def test_max_spikes_on_judged_grad_norms_still_counts_their_spikes(tmp_path):
    run = _scalar_run(tmp_path / "steady", 30, grad_norm=STEADY)
    code, (gate,) = _gates(run, "--max-spikes", "0")
    assert (code, gate["ok"], gate["figure"]) == (0, True, 0)
    spiky = _scalar_run(tmp_path / "spiky", 30, grad_norm=[*STEADY[:20], 50.0, *STEADY[21:]])
    code, (gate,) = _gates(spiky, "--max-spikes", "0")
    assert (code, gate["ok"], gate["figure"]) == (1, False, 1)


def test_max_spikes_without_grad_norms_fails_the_check_in_junit_and_in_watch(tmp_path):
    """(check's exit 1 in a real process: test_check's test_exit_codes_in_a_real_process.)"""
    run = _scalar_run(tmp_path / "rewards", 30, reward_mean=[0.5] * 30)
    done = runner.invoke(app, ["check", str(run), "--max-spikes", "3"])
    assert done.exit_code == 1, done.stderr
    assert "(run) max_spikes: the run recorded no finite, nonzero grad_norm" in done.stderr
    junit = tmp_path / "gates.xml"
    result = runner.invoke(app, ["check", str(run), "--max-spikes", "3", "--junit", str(junit)])
    assert result.exit_code == 1, result.output
    report = junit.read_text()
    assert 'failures="1"' in report and "figure n/a, limit 3: the run recorded no" in report
    watched = runner.invoke(app, ["watch", str(run), "--once", "--max-spikes", "3"])
    assert watched.exit_code == 1, watched.output
    assert "gate tripped: (run) max_spikes: the run recorded no finite, nonzero" in watched.stderr


@pytest.mark.parametrize(
    ("steps", "rewards", "has"),
    [
        (30, [math.nan] * 30, "no finite value"),
        (1, [0.5], f"1 finite value (one a rollout), {WINDOW}"),
        (9, [0.5] * 9, f"9 finite values (one a rollout), {WINDOW}"),
        (27, [0.5, math.nan, math.nan] * 9, f"9 finite values (one a rollout), {WINDOW}"),
    ],
)
def test_fail_on_collapse_trips_when_no_reward_window_can_be_judged(tmp_path, steps, rewards, has):
    """The gate passed ('the recorded reward did not collapse', exit 0) on a reward the
    observed-collapse rule cannot judge: every value NaN, or fewer finite ones than its window
    of 10 (a NaN one is no draw). It trips, counting the finite values the run has (it said
    'there is no reward to gate' of a run with 9 rewards)."""
    run = _scalar_run(tmp_path / "run", steps, reward_mean=rewards)
    code, (gate,) = _gates(run, "--fail-on-collapse")
    assert code == 1
    assert gate["gate"] == "reward_collapse" and not gate["ok"] and gate["figure"] is None
    assert gate["message"] == (
        f"the run's reward_mean has {has}: the collapse rule judges no step: there is no "
        "reward window to gate"
    )
    assert "no reward to gate" not in gate["message"]
    some_finite = any(math.isfinite(reward) for reward in rewards)
    code, (gate,) = _gates(run, "--fail-on-collapse", "--collapse-window", "1")
    assert (code, gate["ok"]) == ((0, True) if some_finite else (1, False))


def test_fail_on_collapse_judges_a_reward_with_a_nan_step_in_three(tmp_path):
    """Its NaN steps are no draws (no sample scored): 20 draws, judged; it tripped before."""
    run = _scalar_run(tmp_path / "run", 30, reward_mean=[0.5, 0.5, math.nan] * 10)
    code, (gate,) = _gates(run, "--fail-on-collapse")
    assert (code, gate["ok"], gate["figure"]) == (0, True, None)


def test_fail_on_collapse_on_an_unjudged_reward_fails_the_check_and_the_watch(tmp_path):
    run = _scalar_run(tmp_path / "short", 5, reward_mean=[0.5] * 5)
    done = runner.invoke(app, ["check", str(run), "--fail-on-collapse"])
    assert done.exit_code == 1, done.stderr
    assert "(run) reward_collapse: the run's reward_mean has 5 finite values" in done.stderr
    watched = runner.invoke(app, ["watch", str(run), "--once", "--fail-on-collapse"])
    assert watched.exit_code == 1, watched.output
    assert "gate tripped: (run) reward_collapse: the run's reward_mean has 5 finite" in (
        watched.stderr
    )


def _baseline(path, observed: dict[str, object], policies: dict[str, object] | None = None):
    path.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
                "observed": observed,
                "policies": policies or {},
            }
        )
    )
    return path


def test_a_baseline_figure_the_run_gives_its_rule_nothing_to_judge_trips(tmp_path):
    """A baseline's observed figures passed on a run whose rule judged nothing: no collapse
    ('any figure but none fails': none), no spikes (0, limit 0) and no collapse warning on a
    run that recorded a loss alone (exit 0, 3 gates hold)."""
    run = _scalar_run(tmp_path / "loss", 30, loss=STEADY)
    baseline = _baseline(
        tmp_path / "b.json",
        {
            "first_reward_collapse": {"value": None},
            "spike_steps": {"value": 0},
            "collapse_warning_first_step": {"value": None},
        },
    )
    code, gates = _gates(run, "-b", str(baseline))
    assert code == 1
    assert [(g["gate"], g["ok"], g["figure"]) for g in gates] == [
        ("baseline.present", False, None)
    ] * 3
    assert [g["message"] for g in gates] == [
        "observed.first_reward_collapse is in the baseline, but the run recorded no reward_mean",
        "observed.spike_steps is in the baseline, but the run recorded no finite, nonzero "
        "grad_norm; the spike rule judges a step after 5 such",
        "observed.collapse_warning_first_step is in the baseline, but the run has no "
        "own-sample likelihood (a step with a policy batch, one a rollout) for the collapse "
        "warning to judge",
    ]
    done = runner.invoke(app, ["check", str(run), "-b", str(baseline)])
    assert done.exit_code == 1, done.stderr
    assert "(run) baseline.present: observed.spike_steps is in the baseline, but" in done.stderr


def test_a_baseline_written_on_a_run_leaves_out_the_figures_it_gives_nothing_to_judge(tmp_path):
    """Its own baseline passes a run that recorded a loss alone; the baseline holds the
    figures the run's rules judged (nonfinite_steps) and none of the others."""
    run = _scalar_run(tmp_path / "loss", 30, loss=STEADY)
    written = tmp_path / "own.json"
    code, _ = _gates(run, "--write-baseline", str(written))
    assert code == 0
    assert list(json.loads(written.read_text())["observed"]) == ["nonfinite_steps"]
    code, gates = _gates(run, "-b", str(written))
    assert code == 0 and all(g["ok"] for g in gates)
    judged = _scalar_run(tmp_path / "judged", 30, reward_mean=[0.5] * 30, grad_norm=STEADY)
    code, _ = _gates(judged, "--write-baseline", str(written))
    observed = json.loads(written.read_text())["observed"]
    assert list(observed) == ["first_reward_collapse", "spike_steps", "nonfinite_steps"]


def test_max_nonfinite_trips_on_a_run_that_recorded_no_nonfinite_count(tmp_path, monkeypatch):
    """A run whose steps record no `nonfinite` (nor `nonfinite_grads`) count, as a writer
    other than the Recorder may leave them: the run-level gate passed ('0 non-finite recorded
    steps', exit 0) and a baseline's observed.nonfinite_steps too, though nothing was counted."""
    from stabledrl_cli.dump import _inputs

    counted_scalars = _inputs._step_scalars

    def uncounted(*args, **kwargs):
        values = counted_scalars(*args, **kwargs)
        values.pop("nonfinite", None)
        return values

    with monkeypatch.context() as patched:
        patched.setattr(_inputs, "_step_scalars", uncounted)
        run = _scalar_run(tmp_path / "uncounted", 30, reward_mean=[0.5] * 30, grad_norm=STEADY)
    code, (gate,) = _gates(run, "--max-nonfinite", "0")
    assert code == 1
    assert (gate["gate"], gate["ok"], gate["figure"], gate["limit"]) == (
        "max_nonfinite",
        False,
        None,
        0,
    )
    assert gate["message"] == (
        "the run recorded no nonfinite or nonfinite_grads count: there is no non-finite count to "
        "gate"
    )  # not 'there are no non-finite steps', which reads as a run found clean
    baseline = _baseline(tmp_path / "b.json", {"nonfinite_steps": {"value": 0}})
    code, (gate,) = _gates(run, "-b", str(baseline))
    assert (code, gate["gate"]) == (1, "baseline.present")
    done = runner.invoke(app, ["check", str(run), "--max-nonfinite", "0"])
    assert done.exit_code == 1, done.stderr
    assert "(run) max_nonfinite: the run recorded no nonfinite or nonfinite_grads" in done.stderr
    counted = _scalar_run(tmp_path / "counted", 30, reward_mean=[0.5] * 30, grad_norm=STEADY)
    code, (gate,) = _gates(counted, "--max-nonfinite", "0")
    assert (code, gate["ok"], gate["figure"]) == (0, True, 0)
