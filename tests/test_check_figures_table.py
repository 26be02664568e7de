"""`check --write-baseline` with no gate prints today's figures, "what --write-baseline
records": a figure it leaves out of the baseline (a rule that judged no step of the run) shows
as not judged there, never as the 0 or none that the rule never measured."""

from __future__ import annotations

import json

from rich.console import Console
from test_gates_max_collapsed_unjudged import _policy_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _figures(run, path) -> tuple[list[str], dict[str, object]]:
    """The figures table's lines and the baseline written beside it."""
    done = runner.invoke(
        app,
        ["check", str(run), "-p", "grpo", "--write-baseline", str(path), "--device", "cpu"],
        env={"COLUMNS": "80"},
    )
    assert done.exit_code == 0, done.output
    return done.stdout.splitlines(), json.loads(path.read_text())


def _top(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("┏"))


def _cells(lines: list[str], spec: str) -> list[str]:
    (row,) = [line for line in lines if line.startswith(f"│ {spec} ")]
    return [cell.strip() for cell in row.strip("│").split("│")]


def test_figures_the_baseline_leaves_out_show_as_not_judged(tmp_path):
    """A 3-step run: the spike, drift and collapse rules judge no step, so the baseline holds
    none of collapsed_steps, drift_steps and observed.first_reward_collapse; the table said
    'collapsed steps 0', 'drift steps 0' and 'observed collapse: none'."""
    lines, written = _figures(_policy_run(tmp_path / "short", 3), tmp_path / "b.json")
    assert set(written["policies"]["grpo"]) == {
        "discard_frac", "update_norm_median", "update_norm_max",
    }  # fmt: skip
    assert "first_reward_collapse" not in written["observed"]
    title = " ".join(line.strip() for line in lines[: lines.index(_top(lines))])
    assert title.endswith("/short (observed collapse: not judged)"), title
    assert _cells(lines, "grpo")[:3] == ["grpo", "n/a", "n/a"]
    assert max(Console().measure(line).maximum for line in lines) <= 80


def test_figures_the_baseline_holds_are_shown(tmp_path):
    """30 steps and a window of 20: both rules judge, and the table shows the counts the
    baseline holds."""
    run = _policy_run(tmp_path / "long", 30)
    done = runner.invoke(
        app,
        ["check", str(run), "-p", "grpo", "--write-baseline", str(tmp_path / "b.json"),
         "--window", "20", "--device", "cpu"],
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    grpo = json.loads((tmp_path / "b.json").read_text())["policies"]["grpo"]
    cells = _cells(done.stdout.splitlines(), "grpo")
    assert cells[1:3] == [str(grpo["collapsed_steps"]["value"]), str(grpo["drift_steps"]["value"])]


def test_a_scalar_runs_figures_say_what_its_rules_did_not_judge(tmp_path):
    """A scalar run of 3 steps: its line said 'observed collapse: none; grad-norm spikes: 0',
    figures the baseline leaves out (no window of reward, no 5 grad norms before a judged one)."""
    with sd.Recorder(tmp_path / "scalar", policy=None) as rec:
        for step in range(3):
            rec.log_step(step, reward_mean=0.5, grad_norm=1.0)
    path = tmp_path / "b.json"
    done = runner.invoke(app, ["check", str(tmp_path / "scalar"), "--write-baseline", str(path)])
    assert done.exit_code == 0, done.output
    observed = json.loads(path.read_text())["observed"]
    assert "first_reward_collapse" not in observed and "spike_steps" not in observed
    assert observed["nonfinite_steps"]["value"] == 0
    assert done.stdout.splitlines()[0] == (
        "observed collapse: not judged; grad-norm spikes: not judged; non-finite steps: 0"
    )
