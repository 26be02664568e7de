"""`watch` on a run its rules judge no step of yet (a run shorter than the drift window, fewer
than 6 finite update norms, fewer than 10 reward draws): the view said 'risk steps: none',
'drift steps: none', 'reward collapse: none', a clean bill nothing measured, where replay and
inspect say 'not judged'. The view and the --once JSON now say which rule judged nothing."""

from __future__ import annotations

import json

from test_gates_max_collapsed_unjudged import _policy_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()


def test_watch_once_says_what_its_rules_have_not_judged(tmp_path):
    run = _policy_run(tmp_path / "short", 3)
    done = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert done.exit_code == 0, done.output
    state = json.loads(done.stdout)
    assert set(state["unjudged"]) == {
        "drift",
        "spike",
        "first_reward_collapse",
        "spike_steps",
        "collapse_warning",
    }, state
    assert state["unjudged"]["drift"].startswith("the drift rule judges a step after 50 ")
    view = runner.invoke(app, ["watch", str(run), "--once"], env={"COLUMNS": "200"})
    assert view.exit_code == 0, view.output
    lines = view.stdout.splitlines()
    assert any(
        line.startswith("risk steps: none (spikes not judged: the spike rule") for line in lines
    )
    assert any(line.startswith("drift steps: none (not judged: the drift rule") for line in lines)
    assert "collapse warning: not judged; reward collapse: not judged" in lines, lines


def test_a_run_the_rules_judge_names_only_what_it_never_recorded(tmp_path):
    run = _policy_run(tmp_path / "long", 60)
    done = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert done.exit_code == 0, done.output
    unjudged = json.loads(done.stdout)["unjudged"]
    # no grad_norm recorded: the recorded spike rule judges none
    assert set(unjudged) == {"spike_steps"}, unjudged


def test_watch_says_when_the_recorded_runs_rules_have_judged_nothing(tmp_path):
    """A run of 2 steps that recorded no grad_norm (no 3 own-sample likelihoods in a row):
    the view said 'recorded grad-norm spikes: none' and 'collapse warning: none', and the
    JSON's `unjudged` named neither, where inspect, replay and check say 'not judged' (and
    --max-spikes trips as unjudged). The view and the JSON now say so."""
    run = _policy_run(tmp_path / "short", 2)
    done = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert done.exit_code == 0, done.output
    unjudged = json.loads(done.stdout)["unjudged"]
    assert unjudged["spike_steps"] == (
        "the run recorded no finite, nonzero grad_norm; the spike rule judges a step after 5 such"
    )
    assert unjudged["collapse_warning"].startswith(
        "the run has 2 own-sample likelihoods (one a rollout"
    )
    view = runner.invoke(app, ["watch", str(run), "--once"], env={"COLUMNS": "200"})
    lines = view.stdout.splitlines()
    assert f"recorded grad-norm spikes: none (not judged: {unjudged['spike_steps']})" in lines
    assert "recorded non-finite: none" in lines  # the Recorder counts them: judged
    assert "collapse warning: not judged; reward collapse: not judged" in lines, lines
