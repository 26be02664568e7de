"""A baseline gate on a count of flagged steps names the step where the count went past its
limit, and the steps, as --max-collapsed names its steps: 'collapsed_steps 3, baseline 1:
above the limit 1.1' said neither where nor which."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _run(path: Path, spikes: tuple[int, ...]) -> Path:
    """A 30-step grpo token run whose update (advantages) and recorded grad_norm are 1000
    times their usual size at `spikes`."""
    gen = torch.Generator().manual_seed(0)
    with sd.Recorder(path, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(30):
            scale = 1000.0 if step in spikes else 1.0
            logp = -torch.rand(4, 8, generator=gen)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=scale * torch.randn(4, generator=gen),
                mask=torch.ones(4, 8),
                reward=torch.full((4,), 0.5),
                grad_norm=scale * (1.0 + 0.1 * float(torch.rand(1, generator=gen))),
            )
    return path


def test_a_tripped_count_gate_names_the_step_past_its_limit(tmp_path: Path) -> None:
    baseline = tmp_path / "b.json"
    good = _run(tmp_path / "good", spikes=(20,))
    written = runner.invoke(
        app,
        ["check", str(good), "-p", "grpo", "--device", "cpu", "--write-baseline", str(baseline)],
    )
    assert written.exit_code == 0, written.output
    bad = _run(tmp_path / "bad", spikes=(20, 24, 27))
    result = runner.invoke(
        app, ["check", str(bad), "-b", str(baseline), "--device", "cpu", "--format", "json"]
    )
    assert result.exit_code == 1, result.output
    gates = {g["gate"]: g for g in json.loads(result.stdout)["gates"] if not g["ok"]}
    past = "; past it at step 24 (steps 20, 24, 27)"
    assert gates["baseline.collapsed_steps"]["message"] == (
        f"collapsed_steps 3, baseline 1: above the limit 1.1 (abs_tol 0, rel_tol 0.1){past}"
    )
    assert gates["baseline.observed.spike_steps"]["message"] == (
        f"observed.spike_steps 3, baseline 1: above the limit 1.1 (abs_tol 0, rel_tol 0.1){past}"
    )
    assert past in result.stderr


def test_a_count_gate_that_holds_lists_no_step(tmp_path: Path) -> None:
    baseline = tmp_path / "b.json"
    run = _run(tmp_path / "run", spikes=(20,))
    args = ["check", str(run), "-p", "grpo", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--write-baseline", str(baseline)]).exit_code == 0
    result = runner.invoke(app, [*args, "-b", str(baseline), "--format", "json"])
    assert result.exit_code == 0, result.output
    gate = next(
        g for g in json.loads(result.stdout)["gates"] if g["gate"] == "baseline.collapsed_steps"
    )
    assert (
        gate["message"] == "collapsed_steps 1, baseline 1: fails above 1.1 (abs_tol 0, rel_tol 0.1)"
    )


def test_a_hand_edited_negative_baseline_trips_at_the_first_step(tmp_path: Path) -> None:
    """A baseline edited to a negative figure is past its limit from the first flagged step (a
    count's limit -0.9 named the last step, 27), and a negative figure with no flagged step
    (a grad norm) trips with its message: it was an IndexError, exit 70."""
    baseline = tmp_path / "b.json"
    run = _run(tmp_path / "run", spikes=(20, 24, 27))
    args = ["check", str(run), "-p", "grpo", "--device", "cpu"]
    assert runner.invoke(app, [*args, "--write-baseline", str(baseline)]).exit_code == 0
    edited = json.loads(baseline.read_text())
    edited["policies"]["grpo"]["collapsed_steps"]["value"] = -1
    edited["recorded"]["grad_norm"]["max"]["value"] = -1
    baseline.write_text(json.dumps(edited))
    result = runner.invoke(app, [*args, "-b", str(baseline), "--format", "json"])
    assert result.exit_code == 1, result.output
    gates = {g["gate"]: g for g in json.loads(result.stdout)["gates"] if not g["ok"]}
    assert gates["baseline.collapsed_steps"]["message"].endswith(
        "; past it at step 20 (steps 20, 24, 27)"
    )
    assert gates["baseline.recorded.grad_norm.max"]["message"].startswith("recorded.grad_norm.max ")
