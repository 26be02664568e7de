"""`tune` on a run whose spike or drift rule judges no step of a setting (a run shorter than
the drift window, fewer than 6 finite update norms): the ranking's 0 risk steps then say
nothing, as replay says under its table. tune said 'no risk step over the run' and nothing
else; it now names the rules that judged nothing, under its table, in its evidence and JSON."""

from __future__ import annotations

import json

from test_gates_max_collapsed_unjudged import _policy_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

runner = CliRunner()
SWEEP = "dapo:eps_high=0.2..0.5:3"


def test_a_short_runs_tune_says_its_rules_judged_nothing(tmp_path):
    run = _policy_run(tmp_path / "short", 3)
    done = runner.invoke(app, ["tune", str(run), "-p", SWEEP, "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    for setting in report["settings"]:
        assert set(setting["unjudged"]) == {"drift", "spike"}, setting
    assert report["evidence"].endswith(
        "; but the spike and drift rules judged no step of it, so its 0 risk steps say nothing"
    )
    table = runner.invoke(app, ["tune", str(run), "-p", SWEEP], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "bias: not judged (the drift rule judges a step after 50 finite net_push" in text
    assert "risk: spikes not judged (the spike rule judges a step after 5 finite" in text
    assert "so its 0 risk steps say nothing" in text


def test_a_long_enough_runs_tune_has_nothing_unjudged(tmp_path):
    run = _policy_run(tmp_path / "long", 12)
    done = runner.invoke(app, ["tune", str(run), "-p", SWEEP, "--format", "json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert all(set(s["unjudged"]) == {"drift"} for s in report["settings"]), report
    assert report["evidence"].endswith(
        "; but the drift rule judged no step of it, so its 0 risk steps say nothing"
    )
