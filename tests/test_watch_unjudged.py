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
    assert set(state["unjudged"]) == {"drift", "spike", "first_reward_collapse"}, state
    assert state["unjudged"]["drift"].startswith("the drift rule judges a step after 50 ")
    view = runner.invoke(app, ["watch", str(run), "--once"], env={"COLUMNS": "200"})
    assert view.exit_code == 0, view.output
    lines = view.stdout.splitlines()
    assert any(
        line.startswith("risk steps: none (spikes not judged: the spike rule") for line in lines
    )
    assert any(line.startswith("drift steps: none (not judged: the drift rule") for line in lines)
    assert "collapse warning: none; reward collapse: not judged" in lines, lines


def test_a_run_the_rules_judge_has_nothing_unjudged(tmp_path):
    run = _policy_run(tmp_path / "long", 60)
    done = runner.invoke(app, ["watch", str(run), "--once", "--format", "json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["unjudged"] == {}
