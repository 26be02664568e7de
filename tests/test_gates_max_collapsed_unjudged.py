"""--max-collapsed on a policy whose update norms give the spike rule nothing to judge: the
gate says "not judged" and trips (exit 1), as every gate whose rule judged nothing does; a
pass would claim no spike where none could have been found."""

from __future__ import annotations

import json

import torch
from test_gates_unjudged import _baseline
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _policy_run(path, steps: int, nonfinite_at: int | None = None):
    """A token run of `steps` steps with finite, steady batches (one NaN logp at
    `nonfinite_at`)."""
    gen = torch.Generator().manual_seed(0)
    with sd.Recorder(path, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(steps):
            logp = -torch.rand(4, 8, generator=gen)
            if step == nonfinite_at:
                logp[0, 0] = float("nan")
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.05 * torch.randn(4, 8, generator=gen),
                advantages=torch.randn(4, generator=gen),
                mask=torch.ones(4, 8),
                reward=torch.full((4,), 0.5),
            )
    return path


def _gate(run, *options: str) -> tuple[int, dict[str, object]]:
    result = runner.invoke(
        app, ["check", str(run), "-p", "grpo", *options, "--device", "cpu", "--format", "json"]
    )
    gates = [g for g in json.loads(result.stdout)["gates"] if g["gate"] == "max_collapsed"]
    assert len(gates) == 1, result.output
    return result.exit_code, gates[0]


SPIKES_UNJUDGED = (
    "not judged: the spike rule judges a step after 5 finite, nonzero update norms of one "
    "kind, and the policy has 3"
)


def test_max_collapsed_on_too_few_steps_to_judge_spikes_trips_not_judged(tmp_path):
    """Three steps: the spike rule judges none, so the figure counted non-finite updates only;
    the gate passed ('0 collapsed steps, limit 0', exit 0) as if the run had been judged."""
    code, gate = _gate(_policy_run(tmp_path / "short", 3), "--max-collapsed", "0")
    assert code == 1
    assert not gate["ok"] and gate["figure"] is None and gate["limit"] == 0
    assert gate["message"] == (
        f"{SPIKES_UNJUDGED}: no collapsed step counted (non-finite updates only), limit 0"
    )


def test_max_collapsed_over_its_limit_on_non_finite_updates_alone_trips_judged(tmp_path):
    """A non-finite update over the limit trips whatever the spike rule judged: the count can
    only grow with spikes."""
    run = _policy_run(tmp_path / "nan", 3, nonfinite_at=1)
    code, gate = _gate(run, "--max-collapsed", "0")
    assert code == 1 and not gate["ok"] and gate["figure"] == 1
    assert gate["message"] == "1 collapsed step, limit 0 (step 1)"


def test_max_collapsed_on_judged_spikes_still_passes(tmp_path):
    code, gate = _gate(_policy_run(tmp_path / "long", 12), "--max-collapsed", "0")
    assert (code, gate["ok"], gate["figure"]) == (0, True, 0)


def test_max_collapsed_not_judged_fails_the_check_on_stderr(tmp_path):
    """(check's exit 1 in a real process: test_check's test_exit_codes_in_a_real_process.)"""
    run = _policy_run(tmp_path / "short", 3)
    done = runner.invoke(
        app, ["check", str(run), "-p", "grpo", "--max-collapsed", "0", "--device", "cpu"]
    )
    assert done.exit_code == 1, done.stderr
    assert f"grpo max_collapsed: {SPIKES_UNJUDGED}" in done.stderr
    assert "check passed" not in done.stderr


def _baseline_gates(run, baseline) -> tuple[int, list[dict[str, object]]]:
    result = runner.invoke(
        app, ["check", str(run), "-b", str(baseline), "--device", "cpu", "--format", "json"]
    )
    return result.exit_code, json.loads(result.stdout)["gates"]


def test_a_baseline_collapsed_steps_the_spike_rule_judged_nothing_of_trips(tmp_path):
    """A baseline's collapsed_steps 0 passed a 3-step run (exit 0, '1 gate holds'), where the
    spike rule judged no step: its 0 counted non-finite updates only. It trips
    `baseline.present`, saying so; more non-finite updates than the baseline still trip as a
    regression; --write-baseline leaves the figure out."""
    run = _policy_run(tmp_path / "short", 3)
    baseline = _baseline(tmp_path / "b.json", {}, {"grpo": {"collapsed_steps": {"value": 0}}})
    code, (gate,) = _baseline_gates(run, baseline)
    assert code == 1
    assert (gate["policy"], gate["gate"], gate["ok"]) == ("grpo", "baseline.present", False)
    assert gate["message"] == (
        "collapsed_steps is in the baseline, but for 'grpo' it is not judged: the spike rule "
        "judges a step after 5 finite, nonzero update norms of one kind, and the policy has 3"
    )
    nan = _policy_run(tmp_path / "nan", 3, nonfinite_at=1)
    code, (gate,) = _baseline_gates(nan, baseline)
    assert (code, gate["gate"], gate["figure"]) == (1, "baseline.collapsed_steps", 1)
    written = tmp_path / "own.json"
    done = runner.invoke(
        app, ["check", str(run), "--write-baseline", str(written), "--device", "cpu"]
    )
    assert done.exit_code == 0, done.output
    figures = json.loads(written.read_text())["policies"]["grpo"]
    assert "collapsed_steps" not in figures and "discard_frac" in figures
