"""`stabledrl check`: absolute gates, baseline regressions, the baseline file, JUnit XML."""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _cli import full_disk, full_disk_error, run_cli_together
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli._json import parse_strict
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import WriteError
from stabledrl_cli.replay import config, derivations
from stabledrl_cli.replay.baseline import BASELINE_SCHEMA, Tolerance
from stabledrl_cli.replay.baseline_read import load_baseline
from stabledrl_cli.replay.baseline_write import baseline_text, write_baseline
from stabledrl_cli.replay.evaluation import _regression
from stabledrl_cli.replay.figures import RUN_METRICS, policy_metrics
from stabledrl_cli.replay.gate import Gates, _unjudged_gate
from stabledrl_cli.replay.gate import absolute as _absolute
from stabledrl_cli.replay.junit import junit_xml, write_junit

ROOT = Path(__file__).resolve().parents[1]
RECORDED_GATES = 5
"""A written baseline's `recorded` gates of these runs: grad_norm median and max, reward_mean
mean, tail and nonfinite."""
POLICIES = ["-p", "grpo", "-p", "is", "-p", "stabledrl"]
STEADY_STEPS = config.DEFAULT_WINDOW + 10
"""The steady run's: the drift rule judges a step after a window of finite net_push values, so
its baseline holds drift_steps (the 40-step collapsing run, NaN at step 36, has no window)."""
runner = CliRunner()


def _make_run(path: Path, *, collapse: bool, nan_step: int | None = None, steps: int = 40) -> Path:
    """`steps` steps, seeded. One token's old log-prob is 6 nats lower at steps 25 and 33, so
    the unclipped IS update spikes there (grpo clips it away). With `collapse`, the reward drops
    from 0.8 to 0.05 at step 20 (observed collapse at 25); `nan_step` puts a NaN log-prob in."""
    gen = torch.Generator().manual_seed(0)
    with sd.Recorder(path, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(steps):
            logp = -torch.rand(4, 8, generator=gen) - 0.5
            logp_old = logp + 0.02 * torch.randn(4, 8, generator=gen)
            if step in (25, 33):
                logp_old[0, 3] -= 6.0
            if step == nan_step:
                logp[2, 2] = float("nan")
            reward = 0.05 if collapse and step >= 20 else 0.8
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp_old,
                advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                group_id=np.array([0, 0, 1, 1]),
                reward=torch.full((4,), reward) + 0.01 * torch.rand(4, generator=gen),
                grad_norm=1.0,
                loss=0.1,
            )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("check")
    return {
        "steady": _make_run(base / "steady", collapse=False, steps=STEADY_STEPS),
        "collapsing": _make_run(base / "collapsing", collapse=True, nan_step=36),
    }


@pytest.fixture(scope="module")
def baseline(runs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "steady.baseline.json"
    result = runner.invoke(
        app, ["check", str(runs["steady"]), *POLICIES, "--write-baseline", str(path)]
    )
    assert result.exit_code == 0, result.output
    return path


def _check(*args: str) -> tuple[int, dict, str]:
    result = runner.invoke(app, ["check", *args, "--format", "json"])
    data = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.exit_code, data, result.stderr


def _gate(data: dict, policy: str | None, gate: str) -> dict:
    return next(g for g in data["gates"] if g["policy"] == policy and g["gate"] == gate)


def _edit(path: Path, out: Path, edit) -> Path:
    data = json.loads(path.read_text())
    edit(data)
    out.write_text(json.dumps(data))
    return out


# --- the baseline file -------------------------------------------------------------------------
def test_written_baseline_holds_todays_figures(runs, baseline):
    data = json.loads(baseline.read_text())
    assert data["schema"] == BASELINE_SCHEMA and data["version"] == 1
    assert data["run"]["path"] == str(runs["steady"]) and data["run"]["steps"] == STEADY_STEPS
    assert data["replay"] == {
        "spike_factor": config.DEFAULT_SPIKE_FACTOR,
        "window": config.DEFAULT_WINDOW,
        "drift_threshold": config.DEFAULT_DRIFT_THRESHOLD,
        "collapse_window": config.DEFAULT_COLLAPSE_WINDOW,
    }
    assert data["observed"]["first_reward_collapse"]["value"] is None
    assert list(data["observed"]) == list(RUN_METRICS)
    assert data["observed"]["collapse_warning_first_step"]["worse"] == "lower"
    assert data["observed"]["spike_steps"] == {
        "value": 0, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.1
    }  # fmt: skip
    assert data["recorded"] == {
        "reward_mean": {
            stat: {"value": pytest.approx(0.805, abs=0.005), "worse": "lower", "abs_tol": 0.01,
                   "rel_tol": 0.1}
            for stat in ("mean", "tail")
        }
        | {"nonfinite": {"value": 0, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.1}},
        "grad_norm": {
            stat: {"value": 1.0, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.25}
            for stat in ("median", "max")
        },
    }  # fmt: skip
    assert list(data["policies"]) == ["grpo", "is", "stabledrl"]
    is_ = data["policies"]["is"]
    assert set(is_) == set(policy_metrics())
    assert is_["collapsed_steps"] == {
        "value": 2, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.1, "first": 25
    }  # fmt: skip
    replayed = sd.replay(runs["steady"], ["is"], device="cpu").policies[0].summary
    assert is_["update_norm_max"]["value"] == replayed.update_norm_max
    assert is_["discard_frac"]["value"] == 0
    # grpo discards the one token of steps 25 and 33 (32 a step)
    assert data["policies"]["grpo"]["discard_frac"]["value"] == 2 / (32 * STEADY_STEPS)


def test_baseline_writes_floats_as_floats_and_counts_as_integers(runs, tmp_path):
    """A whole-number float of huge magnitude stays a float (never a 30-digit integer); counts
    and steps are integers."""
    text = baseline_text({"value": 8.68e12, "big": 1e30, "count": 3, "frac": 0.25, "two": 2.0})
    assert '"value": 8.68e+12' in text and '"big": 1e+30' in text
    assert '"count": 3' in text and '"frac": 0.25' in text and '"two": 2.0' in text
    assert json.loads(text) == {"value": 8.68e12, "big": 1e30, "count": 3, "frac": 0.25, "two": 2}
    path = tmp_path / "b.json"
    result = runner.invoke(
        app, ["check", str(runs["collapsing"]), "-p", "grpo", "--write-baseline", str(path)]
    )
    assert result.exit_code == 0 and "(1 policy, 2 recorded series)" in result.stderr
    grpo = json.loads(path.read_text())["policies"]["grpo"]
    assert isinstance(grpo["collapsed_steps"]["value"], int)
    raw = path.read_text()
    assert not any(len(token) > 17 and token.isdigit() for token in raw.replace(",", " ").split())


def test_baseline_text_keeps_a_string_that_looks_like_its_float_marks(runs, tmp_path):
    """A float was written through a stand-in string and put back by replacing the first text
    equal to it: a run whose manifest names its policy with that text had a float put there,
    the stand-in left under replay.spike_factor, and a check of the same run against the
    baseline it had just written exited 3."""
    marks = {"policy": "\0float-0\0", "note": "\0float-1\0\0float-+-0\0"}
    data = {"run": marks, "replay": {"spike_factor": 10.0, "window": 50}, "big": 8.68e12}
    assert json.loads(baseline_text(data)) == data
    run = tmp_path / "run"
    _make_run(run, collapse=False)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["policy"]["spec"] = marks["policy"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    written = tmp_path / "b.json"
    result = runner.invoke(app, ["check", str(run), "-p", "grpo", "--write-baseline", str(written)])
    assert result.exit_code == 0, result.output
    assert json.loads(written.read_text())["run"]["policy"] == marks["policy"]
    code, data, stderr = _check(str(run), "--baseline", str(written))
    assert code == 0 and data["ok"], stderr


def test_a_baseline_of_a_run_whose_path_is_not_utf8_reads_back(runs, tmp_path):
    """run.path was written with the lone surrogate Python decodes such a byte to ('\\udcff'),
    which every reader refuses: checking the run against the baseline just written of it
    exited 3 ('a string with a lone surrogate'). The byte is written as \\xff."""
    run = tmp_path / os.fsdecode(b"run\xff")
    _make_run(run, collapse=False)
    written = tmp_path / "b.json"
    code, _, stderr = _check(str(run), "-p", "grpo", "--write-baseline", str(written))
    assert code == 0, stderr
    assert load_baseline(written).run["path"] == f"{tmp_path}/run\\xff"
    code, data, stderr = _check(str(run), "--baseline", str(written))
    assert code == 0 and data["ok"], stderr


@pytest.mark.parametrize("command", ["check", "replay", "inspect"])
def test_json_of_a_run_whose_path_is_not_utf8_is_strict_json(tmp_path, command):
    """`--format json` named such a run with the lone surrogate Python decodes the byte to,
    which json.dumps writes as the escape \\udcff: strict JSON readers (this tool's own among
    them) refuse the whole output. The byte is written as \\xff, as a baseline writes it."""
    run = tmp_path / os.fsdecode(b"run\xff")
    _make_run(run, collapse=False)
    options = {"check": ["--max-collapsed", "99", "--device", "cpu"], "replay": ["--device", "cpu"]}
    done = runner.invoke(app, [command, str(run), *options.get(command, []), "--format", "json"])
    assert done.exit_code == 0, done.output
    data = parse_strict(done.stdout, "stdout", "JSON")
    assert isinstance(data, dict)
    assert data["run"] == f"{tmp_path}/run\\xff"


def test_gate_counts_agree_in_number(runs):
    one = runner.invoke(
        app, ["check", str(runs["steady"]), "-p", "stabledrl", "--max-collapsed", "0"]
    )
    assert "check passed: 1 gate holds" in one.stderr
    two = runner.invoke(
        app, ["check", str(runs["steady"]), "-p", "stabledrl", "-p", "is", "--max-collapsed", "9"]
    )
    assert "check passed: 2 gates hold" in two.stderr


def test_baseline_is_deterministic(runs, baseline, tmp_path):
    again = tmp_path / "again.json"
    result = runner.invoke(
        app, ["check", str(runs["steady"]), *POLICIES, "--write-baseline", str(again)]
    )
    assert result.exit_code == 0, result.output
    first, second = json.loads(baseline.read_text()), json.loads(again.read_text())
    first.pop("created")
    second.pop("created")
    assert first == second


def test_check_against_own_baseline_passes(runs, baseline):
    code, data, stderr = _check(str(runs["steady"]), "--baseline", str(baseline))
    assert code == 0, stderr
    assert data["ok"] and data["tripped"] == 0 and data["policies"] == ["grpo", "is", "stabledrl"]
    assert data["gates_checked"] == len(RUN_METRICS) + RECORDED_GATES + 3 * len(policy_metrics())
    assert "check passed" in stderr
    table = runner.invoke(app, ["check", str(runs["steady"]), "--baseline", str(baseline)])
    assert table.exit_code == 0 and "baseline.update_norm_max" in table.stdout


def test_regressions_trip_and_are_all_named(runs, baseline, tmp_path):
    def tighten(data):
        data["policies"]["is"]["collapsed_steps"].update(value=1, rel_tol=0.0)
        data["policies"]["grpo"]["discard_frac"].update(value=0.0005, abs_tol=0.0, rel_tol=0.1)
        data["policies"]["stabledrl"]["update_norm_median"]["value"] = 0.2  # looser: passes

    edited = _edit(baseline, tmp_path / "tight.json", tighten)
    code, data, stderr = _check(str(runs["steady"]), "--baseline", str(edited))
    assert code == 1 and not data["ok"] and data["tripped"] == 2
    collapsed = _gate(data, "is", "baseline.collapsed_steps")
    assert not collapsed["ok"] and collapsed["figure"] == 2 and collapsed["limit"] == 1
    discard = _gate(data, "grpo", "baseline.discard_frac")
    assert not discard["ok"] and discard["limit"] == pytest.approx(0.00055)
    assert _gate(data, "stabledrl", "baseline.update_norm_median")["ok"]
    assert "2 of 24 gates tripped" in stderr
    assert "is baseline.collapsed_steps: collapsed_steps 2, baseline 1: above the limit 1" in stderr
    assert "grpo baseline.discard_frac" in stderr


def test_strict_also_fails_on_an_improvement(runs, baseline, tmp_path):
    def loosen(data):
        data["policies"]["is"]["collapsed_steps"]["value"] = 5  # today: 2, better

    edited = _edit(baseline, tmp_path / "loose.json", loosen)
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(edited))
    assert code == 0 and data["ok"]
    code, data, stderr = _check(str(runs["steady"]), "--baseline", str(edited), "--strict")
    assert code == 1
    tripped = [g for g in data["gates"] if not g["ok"]]
    assert [(g["policy"], g["gate"]) for g in tripped] == [("is", "baseline.collapsed_steps")]
    assert "better than the baseline beyond its tolerance" in tripped[0]["message"]
    assert "--strict fails on it" in stderr
    code, _, _ = _check(str(runs["steady"]), "--baseline", str(baseline), "--strict")
    assert code == 0


def test_a_null_baseline_value_worse_when_higher_is_refused(runs, baseline, tmp_path):
    """A null value (infinity) worse when higher is a gate no figure can trip: the baseline is
    refused (exit 3) naming the entry, strict or not, rather than checked as a pass."""
    edited = _edit(
        baseline,
        tmp_path / "null.json",
        lambda d: d["policies"]["is"]["update_norm_max"].update(value=None),
    )
    for strict in ((), ("--strict",)):
        code, _, stderr = _check(str(runs["steady"]), "--baseline", str(edited), *strict)
        assert code == 3
        assert "update_norm_max" in stderr and "never trip" in stderr


def test_strict_baseline_has_noise_tolerances_and_is_two_sided(runs, tmp_path):
    golden = tmp_path / "golden.json"
    result = runner.invoke(
        app, ["check", str(runs["steady"]), *POLICIES, "--write-baseline", str(golden), "--strict"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(golden.read_text())
    assert data["strict"] is True
    assert data["observed"]["first_reward_collapse"]["abs_tol"] == 0
    metrics = data["policies"]["is"]
    assert (metrics["collapsed_steps"]["abs_tol"], metrics["collapsed_steps"]["rel_tol"]) == (0, 0)
    assert (metrics["update_norm_max"]["abs_tol"], metrics["update_norm_max"]["rel_tol"]) == (
        0,
        1e-4,
    )
    code, _, _ = _check(str(runs["steady"]), "--baseline", str(golden))
    assert code == 0
    improved = _edit(
        golden,
        tmp_path / "improved.json",
        lambda d: d["policies"]["is"]["collapsed_steps"].update(value=3),
    )
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(improved))  # no --strict flag
    assert code == 1
    assert [g["gate"] for g in data["gates"] if not g["ok"]] == ["baseline.collapsed_steps"]


def test_rewriting_a_strict_baseline_through_its_own_check_keeps_it_strict(runs, tmp_path):
    """`check RUN -b golden.json --write-baseline golden.json` (accepting a shift) checked
    two-sided, as the baseline is strict, then rewrote it loose: "strict": false, counts with
    10% slack, so the next check passed a shift of either kind. A baseline written while
    checking against a strict one is strict, as its replay settings and policies are the
    baseline's."""
    golden = tmp_path / "golden.json"
    wrote = runner.invoke(
        app, ["check", str(runs["steady"]), *POLICIES, "--write-baseline", str(golden), "--strict"]
    )
    assert wrote.exit_code == 0, wrote.output
    _edit(golden, golden, lambda d: d["policies"]["is"]["collapsed_steps"].update(value=3))
    code, _, _ = _check(str(runs["steady"]), "-b", str(golden), "--write-baseline", str(golden))
    assert code == 1  # checked against the old figures, two-sided
    rewritten = json.loads(golden.read_text())
    assert rewritten["strict"] is True
    assert rewritten["policies"]["is"]["collapsed_steps"]["rel_tol"] == 0
    code, _, _ = _check(str(runs["steady"]), "-b", str(golden))
    assert code == 0


def test_a_detector_change_fails_until_the_baseline_is_rewritten(runs, baseline, monkeypatch):
    real = derivations.drift_flags
    monkeypatch.setattr(
        derivations,
        "drift_flags",
        lambda net_push, window, threshold: real(net_push, 5, threshold + 1),
    )
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(baseline))
    assert code == 1
    tripped = {(g["policy"], g["gate"]) for g in data["gates"] if not g["ok"]}
    assert ("grpo", "baseline.drift_steps") in tripped
    assert all(gate == "baseline.drift_steps" for _, gate in tripped)


def test_observed_collapse_is_compared(runs, baseline):
    code, data, _ = _check(str(runs["collapsing"]), "--baseline", str(baseline))
    assert code == 1
    observed = _gate(data, None, "baseline.observed.first_reward_collapse")
    assert not observed["ok"] and observed["figure"] == 25
    assert observed["message"] == (
        "observed.first_reward_collapse 25, baseline none: any figure but none fails"
    )


def test_a_collapse_the_run_does_not_have_reads_none_in_the_table_and_junit(
    runs, baseline, tmp_path
):
    """With no collapse, the step gates read 'observed.first_reward_collapse ok inf inf' and
    'reward_collapse FAILED 25 inf' in the table (and JUnit), where their messages say
    'none'. The JSON keeps null."""
    junit = tmp_path / "check.xml"
    args = ["check", "--baseline", str(baseline), *POLICIES, "--fail-on-collapse"]
    table = runner.invoke(app, [*args, str(runs["steady"])], env={"COLUMNS": "200"})
    rows = {
        cells[1].removeprefix("baseline."): cells[2:5]
        for line in table.stdout.splitlines()
        if line.startswith("│ ")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }
    assert rows["observed.first_reward_collapse"] == ["ok", "none", "none"]
    assert rows["reward_collapse"] == ["ok", "none", "none"]
    tripped = runner.invoke(app, [*args, str(runs["collapsing"]), "--junit", str(junit)])
    assert tripped.exit_code == 1
    cases = ET.parse(junit).getroot().iter("testcase")
    collapse = next(c for c in cases if c.get("name") == "reward_collapse")
    assert collapse.find("failure").text.startswith("figure 25, limit none: ")
    code, data, _ = _check(*args[1:], str(runs["steady"]))
    assert code == 0 and _gate(data, None, "reward_collapse")["limit"] is None
    assert _gate(data, None, "baseline.observed.first_reward_collapse")["figure"] is None


def test_policy_missing_from_the_check_is_a_tripped_gate(runs, baseline):
    code, data, stderr = _check(str(runs["steady"]), "--baseline", str(baseline), "-p", "grpo")
    assert code == 1 and data["policies"] == ["grpo"]
    missing = [g for g in data["gates"] if g["gate"] == "baseline.present"]
    assert [g["policy"] for g in missing] == ["is", "stabledrl"]
    assert "'is' is in the baseline but was not checked" in stderr


@pytest.mark.parametrize("width", [30, 40])
def test_a_narrow_terminal_keeps_every_gates_name_in_the_table(runs, baseline, width):
    """At 40 columns the status, figure and limit columns took the width and the gate column
    shrank to nothing: a table of statuses and figures with no policy or gate named (the
    fixture's own baseline check alike). The names are folded into a column of their own,
    the table wider than the terminal rather than without them."""
    args = ["check", str(runs["steady"]), "-b", str(baseline)]
    shown = runner.invoke(app, args, env={"COLUMNS": str(width)})
    assert shown.exit_code == 0, shown.output
    first_cells = [
        line.strip("│").split("│")[0].strip()
        for line in shown.stdout.splitlines()
        if line.startswith("│ ")
    ]
    names = "".join(first_cells)
    gates = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)["gates"]
    for gate in gates:
        assert (gate["policy"] or "(run)") in names
        assert gate["gate"].removeprefix("baseline.") in names


def test_junit_and_table_show_a_missing_figure_alike(runs, baseline, tmp_path):
    """A gate with no figure (baseline.present) showed 'n/a' in the table and null in the JSON,
    but 'figure never, limit never' in the JUnit report, where 'never' means no collapse."""
    junit = tmp_path / "check.xml"
    args = ["check", str(runs["steady"]), "--baseline", str(baseline), "-p", "grpo"]
    table = runner.invoke(app, [*args, "--junit", str(junit)])
    assert table.exit_code == 1
    row = next(line for line in table.stdout.splitlines() if "baseline.present" in line)
    assert [cell.strip() for cell in row.split("│")[4:6]] == ["n/a", "n/a"]
    cases = ET.parse(junit).getroot().iter("testcase")
    present = next(c for c in cases if c.get("name") == "baseline.present")
    assert present.find("failure").text.startswith("figure n/a, limit n/a: policy 'is'")


def test_junit_classnames_hold_no_dot_of_a_spec_and_names_are_unique(runs, baseline, tmp_path):
    """Jenkins splits a classname at its last '.': the class of 'two-sided:delta=4.5' read as
    package 'stabledrl.two-sided:delta=4', class '5'. And every `baseline.present` of one class
    shared one testcase name, told apart by its message alone."""

    def edit(data):
        data["policies"]["two-sided:delta=4.5"] = data["policies"]["grpo"]
        data["recorded"] = {
            series: {"max": {"value": 1.0, "worse": "higher"}} for series in ("kl", "entropy")
        }

    edited = _edit(baseline, tmp_path / "dotted.json", edit)
    junit = tmp_path / "check.xml"
    args = ["check", str(runs["steady"]), "-b", str(edited), "-p", "grpo", "--junit", str(junit)]
    assert runner.invoke(app, args).exit_code == 1
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    classes = {c.get("classname") for c in cases}
    assert "stabledrl.two-sided:delta=4\u00b75" in classes  # U+00B7 MIDDLE DOT
    assert all(c.count(".") == 1 for c in classes), classes
    pairs = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(pairs) == len(set(pairs)), sorted(pairs)
    assert ("stabledrl.run", "baseline.present (recorded.kl.max)") in pairs


def test_replay_settings_come_from_the_baseline(runs, baseline, tmp_path):
    code, _, stderr = _check(str(runs["steady"]), "--baseline", str(baseline), "--window", "7")
    assert code == 2 and "differs from the baseline's" in stderr
    same = str(config.DEFAULT_WINDOW)
    code, _, _ = _check(str(runs["steady"]), "--baseline", str(baseline), "--window", same)
    assert code == 0
    # A baseline written with other settings is replayed with them.
    edited = _edit(baseline, tmp_path / "w5.json", lambda d: d["replay"].update(window=5))
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(edited))
    assert data["replay"]["window"] == 5
    # The observed-collapse window too: recorded in the baseline, checked against an option.
    assert data["replay"]["collapse_window"] == config.DEFAULT_COLLAPSE_WINDOW
    wide = _edit(baseline, tmp_path / "c20.json", lambda d: d["replay"].update(collapse_window=20))
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(wide))
    assert data["replay"]["collapse_window"] == 20
    code, _, stderr = _check(
        str(runs["steady"]), "--baseline", str(wide), "--collapse-window", "10"
    )
    assert code == 2 and "--collapse-window 10 differs from the baseline's 20" in stderr


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("--drift-threshold", "nan", "--drift-threshold must be finite"),
        ("--spike-factor", "0.5", "--spike-factor must be a finite number > 1"),
        ("--window", "0", "--window must be an integer in [1, 1e+09]"),
    ],
)
def test_a_setting_out_of_its_range_is_named_so_beside_a_baseline(
    runs, baseline, option, value, said
):
    """Beside a baseline, an out-of-range setting read as one that differs from the
    baseline's ('--drift-threshold nan differs from the baseline's -0.15 ... write a new
    baseline with it', which no baseline could hold); it is named as without one."""
    code, _, stderr = _check(str(runs["steady"]), "--baseline", str(baseline), option, value)
    assert code == 2
    assert stderr.strip().splitlines() == [f"error: {said}"]


# --- absolute gates ----------------------------------------------------------------------------
def test_absolute_gates(runs):
    code, data, stderr = _check(
        str(runs["collapsing"]), *POLICIES, "--max-collapsed", "1", "--max-nonfinite", "0",
        "--max-discard-frac", "0.001",
    )  # fmt: skip
    assert code == 1
    assert data["gates_checked"] == 10  # 3 gates a policy, and the run's non-finite steps
    run_nonfinite = _gate(data, None, "max_nonfinite")
    assert not run_nonfinite["ok"] and run_nonfinite["figure"] == 1
    assert "1 non-finite recorded step, limit 0 (step 36)" in run_nonfinite["message"]
    collapsed = _gate(data, "is", "max_collapsed")
    assert not collapsed["ok"] and collapsed["figure"] == 3
    assert "3 collapsed steps, limit 1 (steps 25, 33, 36)" in collapsed["message"]
    grpo = _gate(data, "grpo", "max_collapsed")
    assert grpo["ok"] and grpo["message"] == "1 collapsed step, limit 1 (step 36)"
    assert all(not _gate(data, p, "max_nonfinite")["ok"] for p in ("grpo", "is", "stabledrl"))
    assert not _gate(data, "grpo", "max_discard_frac")["ok"]
    stabledrl = _gate(data, "stabledrl", "max_discard_frac")
    assert not stabledrl["ok"] and stabledrl["message"] == (
        "discard_frac at most 0.025, counting the 32 tokens of 1 step with a non-finite update"
        " as discarded (0 without them), limit 0.001"
    )
    assert "is max_collapsed: 3 collapsed steps, limit 1" in stderr
    code, data, _ = _check(str(runs["steady"]), "-p", "stabledrl", "--max-collapsed", "0")
    assert code == 0 and data["ok"]


def test_a_discard_fraction_just_past_its_limit_reads_past_it():
    """The message showed the figure to 4 digits and the limit to 6: a discard fraction of
    0.12344 over --max-discard-frac 0.123435 tripped, reading 'discard_frac 0.1234, limit
    0.123435', below its limit."""
    policy = SimpleNamespace(
        spec="grpo",
        summary=SimpleNamespace(discard_frac=0.12344, collapsed_steps=[]),
        series={"nonfinite": [False], "tokens": [100000], "discarded": [12344]},
    )
    (gate,) = _absolute(policy, Gates(max_discard_frac=0.123435))
    shown, limit = gate.message.removeprefix("discard_frac ").split(", limit ")
    assert not gate.ok and float(shown) > float(limit), gate.message


def test_usage_errors(runs, tmp_path):
    code, _, stderr = _check(str(runs["steady"]))
    assert code == 2 and "nothing to check" in stderr
    code, _, stderr = _check(str(runs["steady"]), "--max-discard-frac", "1.5")
    assert code == 2 and "--max-discard-frac" in stderr
    code, _, stderr = _check(str(runs["steady"]), "--max-collapsed", "0", "-p", "nope")
    assert code == 2 and "nope" in stderr
    code, _, stderr = _check(
        str(runs["steady"]), "--max-collapsed", "0", "--junit", str(tmp_path / "no/x.xml")
    )
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = _check(str(tmp_path / "missing"), "--max-collapsed", "0")
    assert code == 3


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "baseline version 2 is newer than this tool reads"),
        (lambda d: d.update(version="1"), "version must be an integer"),
        (lambda d: d.update(schema="other"), "not a stabledrl baseline"),
        (lambda d: d["replay"].pop("window"), "replay.window is missing"),
        (lambda d: d["policies"]["is"]["discard_frac"].pop("value"), "is.discard_frac has no"),
        (
            lambda d: d["policies"]["is"]["discard_frac"].update(worse="sideways"),
            "worse must be 'higher' or 'lower'",
        ),
        (
            lambda d: d["policies"]["is"]["discard_frac"].update(abs_tol="0.1"),
            "abs_tol must be a finite number",
        ),
        (lambda d: d["policies"]["is"].update(speed={"value": 1}), "unknown metric 'speed'"),
        (lambda d: d["policies"].update({"nope:x=1": {}}), "policy 'nope:x=1'"),
        (
            lambda d: d["observed"].update(other={"value": 1}),
            "unknown observed metric 'other' (known: first_reward_collapse, "
            "collapse_warning_first_step, spike_steps, nonfinite_steps)",
        ),
        (lambda d: d.update(strict="yes"), "'strict' must be true or false"),
        (lambda d: d["replay"].update(window=1e30), "replay.window must be an integer in"),
        (lambda d: d["replay"].update(collapse_window=0), "replay.collapse_window must be"),
    ],
)
def test_malformed_baselines_exit_3_naming_the_problem(runs, baseline, tmp_path, edit, message):
    edited = _edit(baseline, tmp_path / "bad.json", edit)
    code, data, stderr = _check(str(runs["steady"]), "--baseline", str(edited))
    assert code == 3 and data == {}
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_library_writers_raise_write_error(tmp_path):
    """Baselines and JUnit go through the atomic writer: a failed write is a WriteError (exit 4)
    naming the target, and leaves no temporary file behind."""
    missing = tmp_path / "no" / "baseline.json"
    with pytest.raises(WriteError, match=r"baseline\.json: cannot write it"):
        write_baseline({"schema": BASELINE_SCHEMA}, missing)
    with pytest.raises(WriteError, match=r"check\.xml: cannot write it"):
        write_junit([], "run", tmp_path / "no" / "check.xml")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_baselines_exit_3(runs, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, stderr = _check(str(runs["steady"]), "--baseline", str(broken))
    assert code == 3 and "not valid JSON" in stderr
    code, _, stderr = _check(str(runs["steady"]), "--baseline", str(tmp_path / "none.json"))
    assert code == 3 and "no such baseline" in stderr


def test_baseline_accepts_hand_written_specs(runs, baseline, tmp_path):
    def rename(data):
        data["policies"]["grpo:eps_low=0.2"] = data["policies"].pop("grpo")

    edited = _edit(baseline, tmp_path / "hand.json", rename)
    assert "grpo" in load_baseline(edited).policies  # canonical spec: eps_low=0.2 is the default
    code, data, _ = _check(str(runs["steady"]), "--baseline", str(edited))
    assert code == 0, data
    assert _gate(data, "grpo", "baseline.update_norm_max")["ok"]


def test_tolerance_rule():
    higher = Tolerance(value=5.0, worse="higher", abs_tol=1.0, rel_tol=0.1)
    assert higher.limit() == 6.5
    assert not higher.tripped(6.5) and higher.tripped(6.51) and not higher.tripped(0.0)
    assert higher.tripped(None) and higher.tripped(math.nan)  # infinity, NaN: worse
    lower = Tolerance(value=100.0, worse="lower", abs_tol=10.0)
    assert lower.limit() == 90.0 and lower.tripped(89.0) and not lower.tripped(None)
    never = Tolerance(value=None, worse="lower", abs_tol=10.0)
    assert never.tripped(500.0) and not never.tripped(None)
    unbounded = Tolerance(value=None, worse="higher")
    assert not unbounded.tripped(1e30) and not unbounded.tripped(None)
    assert higher.improved(3.4) and not higher.improved(3.5) and not higher.improved(9.0)
    assert lower.improved(111.0) and not lower.improved(110.0)
    assert never.improved(None) is False and unbounded.improved(5.0)
    assert Tolerance(value=30.0, worse="lower").improved(None)  # a collapse that went away


@pytest.mark.parametrize(
    ("value", "worse", "abs_tol", "rel_tol", "bound"),
    [
        (0.1, "higher", 0.7, 0.0, 0.8),  # in floats 0.1 + 0.7 is 0.7999999999999999
        (0.01, "higher", 0.09, 0.0, 0.1),
        (0.01, "lower", 0.03, 0.0, -0.02),
        (0.01, "lower", 0.0, 0.1, 0.009),
    ],
)
def test_a_figure_exactly_at_the_bound_passes(value, worse, abs_tol, rel_tol, bound):
    """The bound is the decimal sum of the numbers the baseline writes, as docs/ci.md states
    it: a figure exactly there passes, and under --strict the mirror bound is no improvement."""
    tol = Tolerance(value=value, worse=worse, abs_tol=abs_tol, rel_tol=rel_tol)
    assert tol.limit() == bound and not tol.tripped(bound)
    mirror = Tolerance(value=bound, worse=worse, abs_tol=abs_tol, rel_tol=rel_tol)
    if rel_tol == 0:
        assert not mirror.improved(value)


def test_a_figure_just_past_its_limit_is_shown_apart_from_it(runs, baseline, tmp_path):
    """A golden baseline's slack is 1e-4 relative: at 4 digits a figure just past its limit, the
    limit and the baseline value all read 0.1286. Each is shown to as many digits as tell the
    three apart, in the message, the table's columns and JUnit."""

    def golden(data):
        entry = data["policies"]["grpo"]["update_norm_max"]
        entry.update(value=entry["value"] * (1 - 2e-5), abs_tol=0.0, rel_tol=1e-5)

    edited = _edit(baseline, tmp_path / "golden.json", golden)
    junit = tmp_path / "check.xml"
    code, data, _ = _check(str(runs["steady"]), "-b", str(edited), "--junit", str(junit))
    gate = _gate(data, "grpo", "baseline.update_norm_max")
    assert code == 1 and not gate["ok"]
    figure, rest = gate["message"].removeprefix("update_norm_max ").split(", baseline ")
    value, limit = rest.split(" (")[0].split(": above the limit ")
    assert len({figure, value, limit}) == 3, gate["message"]
    case = next(
        c
        for c in ET.parse(junit).iter("testcase")
        if (c.get("classname"), c.get("name")) == ("stabledrl.grpo", "baseline.update_norm_max")
    )
    assert case.find("failure").text.startswith(f"figure {figure}, limit {limit}: ")


def test_a_tolerance_is_shown_as_the_baseline_writes_it(runs, baseline, tmp_path):
    """A slack is shown to 6 digits: abs_tol 1.999999 read 'abs_tol 2' beside a limit of
    value + 1.999999, a sum the reader could not redo from the message."""

    def written(data):
        data["policies"]["grpo"]["update_norm_max"].update(abs_tol=1.999999, rel_tol=1.25e-7)

    edited = _edit(baseline, tmp_path / "written.json", written)
    code, data, _ = _check(str(runs["steady"]), "-b", str(edited))
    gate = _gate(data, "grpo", "baseline.update_norm_max")
    assert code == 0 and gate["ok"], data
    assert "(abs_tol 1.999999, rel_tol 1.25e-07)" in gate["message"], gate["message"]


# --- JUnit XML ---------------------------------------------------------------------------------
def test_the_docs_document_every_key_of_the_check_json(runs, baseline):
    """A CI script reads `check --format json`; docs/ci.md (once the README) documented no
    key of it."""
    code, data, _ = _check(str(runs["collapsing"]), "-b", str(baseline), "--max-nonfinite", "0")
    assert code == 1 and not data["ok"]
    text = (ROOT / "docs" / "ci.md").read_text()
    section = text[text.index("`--format json` prints one object") :] + "\n"
    section = section[: section.index("\n\n", section.index("| key |"))]
    documented = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", section, re.M))
    keys = {key for pair in documented for key in pair if key}
    assert keys == set(data), set(data) ^ keys
    gates_row = next(line for line in section.splitlines() if line.startswith("| `gates` |"))
    for key in data["gates"][0]:
        assert f"`{key}`" in gates_row, key
    for key in data["wrote"]:
        assert f"`{key}`" in section, key


def test_junit_report(runs, baseline, tmp_path):
    junit = tmp_path / "check.xml"
    result = runner.invoke(
        app,
        ["check", str(runs["collapsing"]), "--baseline", str(baseline), "--max-nonfinite", "0",
         "--junit", str(junit)],
    )  # fmt: skip
    assert result.exit_code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == f"stabledrl check {runs['collapsing']}"
    cases = suite.findall("testcase")
    failed = [c for c in cases if c.find("failure") is not None]
    names = {(c.get("classname"), c.get("name")) for c in cases}
    # + 1: the 40-step run is shorter than the baseline's (baseline.present on run.steps)
    assert (
        int(suite.get("tests"))
        == len(cases)
        == len(RUN_METRICS) + RECORDED_GATES + 1 + 1 + 3 * (len(policy_metrics()) + 1)
    )
    assert ("stabledrl.run", "baseline.present (run.steps)") in names
    assert int(suite.get("failures")) == len(failed) == int(root.get("failures")) > 0
    assert ("stabledrl.is", "max_nonfinite") in names
    assert ("stabledrl.run", "baseline.observed.first_reward_collapse") in names
    nonfinite = next(
        c for c in cases if (c.get("classname"), c.get("name")) == ("stabledrl.is", "max_nonfinite")
    )
    failure = nonfinite.find("failure")
    assert failure.get("message") == "1 step with a non-finite update, limit 0"
    assert failure.text.startswith("figure 1, limit 0")
    passed = next(c for c in cases if c.find("failure") is None)
    assert passed.find("system-out") is not None


def test_junit_report_is_well_formed_xml_whatever_the_names(tmp_path):
    """A run path or a recorded scalar's name may hold a control character, a byte that is not
    UTF-8 (a lone surrogate once decoded) or U+FFFF, none of which XML 1.0 can carry: they were
    written as they were, and CI's JUnit reader refused the whole report."""
    run = tmp_path / "run\x01"
    name = "a\x01\x1b[31mb\uffff"
    with sd.Recorder(run, policy=None) as rec:
        for step in range(5):
            rec.log_step(step, grad_norm=1.0, reward_mean=0.5, scalars={name: 1.0 + step})
    written = tmp_path / "b.json"
    written.write_text(
        json.dumps({
            "schema": BASELINE_SCHEMA,
            "version": 1,
            "replay": {"spike_factor": 10.0, "window": 50, "drift_threshold": -0.15},
            "recorded": {name: {"max": {"value": 1.0, "worse": "higher"}}},
            "policies": {},
        })
    )  # fmt: skip
    junit = tmp_path / "check.xml"
    result = runner.invoke(
        app, ["check", str(run), "--baseline", str(written), "--junit", str(junit)]
    )
    assert result.exit_code == 1, result.output
    (suite,) = ET.parse(junit).getroot().findall("testsuite")
    assert suite.get("name") == f"stabledrl check {tmp_path}/run\\x01"
    (case,) = suite.findall("testcase")
    # the name is quoted (`errors.key_shown`): it holds characters that are not printable
    assert case.get("name") == "baseline.recorded.'a\\x01\\x1b[31mb\\uffff'.max"
    message = case.find("failure").get("message")
    assert message.startswith("recorded.'a\\x01\\x1b[31mb\\uffff'.max 5")
    # A path that is not UTF-8 (CliRunner's streams cannot print it; a terminal's can).
    surrogate = os.fsdecode(b"run\xff")
    (suite,) = ET.fromstring(junit_xml([], surrogate)).findall("testsuite")
    assert suite.get("name") == "stabledrl check run\\xff"


def _scalar_run(path: Path, *, spike_at: int | None = None) -> Path:
    """20 scalar steps, grad norms 1 and 2 in turn (1000 at `spike_at`): checked without
    torch, so a process that checks it starts in a fraction of a replay's time."""
    with sd.Recorder(path, policy=None) as rec:
        for step in range(20):
            rec.log_step(
                step, reward_mean=0.5, grad_norm=1000.0 if step == spike_at else 1 + step % 2
            )
    return path


def test_exit_codes_in_a_real_process(tmp_path):
    steady = _scalar_run(tmp_path / "steady")
    spiking = _scalar_run(tmp_path / "spiking", spike_at=15)
    baseline = tmp_path / "steady.baseline.json"
    wrote = runner.invoke(app, ["check", str(steady), "--write-baseline", str(baseline)])
    assert wrote.exit_code == 0, wrote.output
    holds, tripped, usage, missing = run_cli_together(
        ["check", steady, "--baseline", baseline],
        ["check", spiking, "--baseline", baseline],
        ["check", steady],  # no gate given
        ["check", tmp_path / "nope", "--baseline", baseline],
    )  # a process of its own for each exit code; a second way to exit 2 in this one:
    strict = runner.invoke(app, ["check", str(steady), "--max-collapsed", "0", "--strict"])
    assert holds.returncode == 0 and "check passed" in holds.stderr
    assert tripped.returncode == 1 and "check failed" in tripped.stderr
    assert usage.returncode == 2 and "nothing to check" in usage.stderr
    assert strict.exit_code == 2 and "--strict applies to a baseline" in strict.stderr
    assert missing.returncode == 3 and "no such run" in missing.stderr
    for stderr in (holds.stderr, tripped.stderr, usage.stderr, strict.stderr, missing.stderr):
        assert "Traceback" not in stderr
    for stdout, stderr in [
        (usage.stdout, usage.stderr), (strict.stdout, strict.stderr),
        (missing.stdout, missing.stderr),
    ]:  # fmt: skip
        assert len(stderr.strip().splitlines()) == 1 and stdout == ""


def test_committed_fixture_baselines_are_valid():
    """.ci/run checks each fixture against these; here: they parse, and cover the catalogue
    with the engine's current default settings (else a default change went unrecorded)."""
    from stabledrl_cli.policies import STANDARD_CATALOGUE, get_policy

    fixtures = sorted(p.parent for p in (ROOT / "fixtures").glob("*/manifest.json"))
    assert fixtures, "no fixture runs"
    for run in fixtures:
        path = ROOT / "fixtures" / f"{run.name}.baseline.json"
        assert path.is_file(), f"{path} is missing: see fixtures/README.md"
        loaded = load_baseline(path)
        assert loaded.run["path"] == f"fixtures/{run.name}"
        # A baseline written before collapse_window was recorded means W = 10.
        assert loaded.replay.to_dict() == {
            "spike_factor": config.DEFAULT_SPIKE_FACTOR,
            "window": config.DEFAULT_WINDOW,
            "drift_threshold": config.DEFAULT_DRIFT_THRESHOLD,
            "collapse_window": config.DEFAULT_COLLAPSE_WINDOW,
        }
        assert loaded.strict, "fixture baselines are written with --strict"
        catalogue = {get_policy(s).spec for s in STANDARD_CATALOGUE}
        assert catalogue <= set(loaded.policies)


@pytest.mark.parametrize("output_format", ["json", "table"])
def test_an_output_that_cannot_be_written_comes_after_the_verdict(runs, tmp_path, output_format):
    """--junit onto a full disk: exit 4 naming it, as before, but after the gates' results
    and the verdict are shown. Before, the check ended at the failed write: a CI log held the
    write error alone, not which gates had tripped."""
    junit = full_disk(tmp_path / "report.xml")
    result = runner.invoke(
        app,
        ["check", str(runs["collapsing"]), "--max-collapsed", "0", "--junit", str(junit),
         "--format", output_format],
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == full_disk_error("--junit"), lines
    assert any(line.startswith("check failed: ") for line in lines), lines
    if output_format == "json":
        data = json.loads(result.stdout)
        assert not data["ok"] and data["tripped"] >= 1 and data["wrote"]["junit"] is None
    else:
        assert "max_collapsed" in result.stdout and "FAILED" in result.stdout


def test_an_output_that_cannot_be_written_leaves_the_others_written(runs, tmp_path):
    """--write-baseline onto a full disk beside --junit: the JUnit report was not written (the
    first failed write ended the writing), so CI lost its gates' results to a baseline it
    could not keep. Each output is written that can be; exit 4 names the one that cannot."""
    junit = tmp_path / "report.xml"
    result = runner.invoke(
        app,
        ["check", str(runs["collapsing"]), "-p", "grpo", "--max-collapsed", "0",
         "--write-baseline", str(full_disk(tmp_path / "base.json")), "--junit", str(junit),
         "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    assert result.stderr.strip().splitlines()[-1] == full_disk_error("--write-baseline")
    assert json.loads(result.stdout)["wrote"] == {
        "baseline": None,
        "junit": str(junit),
        "plot": None,
    }
    assert ET.parse(junit).getroot().get("failures") == "1"


def test_a_baseline_gating_no_policy_checks_a_policy_run_on_its_observed_figures(tmp_path):
    """A baseline whose `policies` is empty gates a run with policy batches on `observed`
    alone: its empty list of policies is not passed on as a replay of none."""
    repo = Path(__file__).resolve().parent.parent
    baseline = json.loads((repo / "fixtures" / "grpo.baseline.json").read_text())
    baseline["policies"] = {}
    written = tmp_path / "observed-only.json"
    written.write_text(json.dumps(baseline))
    result = runner.invoke(app, ["check", str(repo / "fixtures" / "grpo"), "-b", str(written)])
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output


def test_a_measure_reads_to_4_digits_even_when_whole_and_a_count_whole():
    """A float32 norm past 2**24 is whole: 'update_norm_max 2549074432, baseline 9705: above
    the limit 1.068e+04' (grpo replayed on a seed-2 example run against seed 0's baseline) and
    'recorded.grad_norm.max 16181641609216, baseline 8581108' read as counts, beside figures
    to 4 digits. A count of steps still reads whole, past 4 digits too."""
    norm = _regression(
        "grpo", "update_norm_max", Tolerance(value=9705.401367, worse="higher", rel_tol=0.1),
        2549074432.0, strict=False,
    )  # fmt: skip
    assert norm.message.startswith("update_norm_max 2.549e+09, baseline 9705: above the limit")
    assert norm.shown() == ("2.549e+09", "1.068e+04")
    recorded = _regression(
        None, "recorded.grad_norm.max", Tolerance(value=8581108.0, worse="higher", rel_tol=0.25),
        16181641609216.0, strict=False,
    )  # fmt: skip
    assert recorded.message.startswith("recorded.grad_norm.max 1.618e+13, baseline 8.581e+06")
    steps = _regression(
        "grpo", "collapsed_steps", Tolerance(value=12000.0, worse="higher", rel_tol=0.1),
        13345.0, strict=False, count=True,
    )  # fmt: skip
    assert steps.message.startswith("collapsed_steps 13345, baseline 12000: above the limit 13200")
    assert steps.shown() == ("13345", "13200")
    assert "count" not in steps.to_dict()
    unjudged = _unjudged_gate("max_spikes", 12345.0, "no judged grad-norm step")
    assert unjudged.shown() == ("n/a", "12345")
