"""Scalar runs (per-step scalars, no policy batch): replay refuses them (exit 3) and skips the
scalar steps of a mixed run; inspect shows them; check gates their recorded series (spikes,
non-finite steps, the observed reward collapse, regressions against a baseline's `recorded`
section); the committed fixture baselines are gated unchanged by .ci/run."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import pack_run
from stabledrl_cli.replay.baseline_read import load_baseline

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
STEPS = 60


def _scalar_run(
    path: Path,
    *,
    collapse: bool = False,
    spike: bool = False,
    nonfinite: bool = False,
    clip: float = 0.1,
) -> Path:
    """60 imported-looking steps: reward 0.8 (0.05 from step 30 with `collapse`), grad norm
    about 1 (40 at step 40 with `spike`), clip fractions near `clip`, a NaN grad norm and two
    parameters with non-finite gradients at step 50 with `nonfinite`."""
    gen = np.random.default_rng(0)
    source = {"kind": "import", "format": "jsonl", "file": "log.jsonl"}
    with sd.Recorder(path, policy=None, source=source, reward_range=(0.0, 1.0)) as rec:
        for step in range(STEPS):
            reward = 0.05 if collapse and step >= 30 else 0.8
            norm = 1.0 + 0.05 * gen.random()
            if spike and step == 40:
                norm = 40.0
            bad = nonfinite and step == 50
            rec.log_step(
                step,
                reward_mean=reward + 0.01 * gen.random(),
                grad_norm=math.nan if bad else norm,
                loss=0.5,
                lr=1e-5,
                clip_frac=clip + 0.01 * gen.random(),
                clip_frac_low=clip / 2,
                clip_frac_high=clip / 2,
                entropy=1.2,
                step_time=0.1,
                nonfinite_grads=2 if bad else 0,
                scalars={"clip_ratio/region_mean": clip},
            )
    return path


def _batch_step(rec: sd.Recorder, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    logp = -torch.rand(2, 4, generator=gen) - 0.5
    rec.log_step(
        step,
        logp=logp,
        logp_old=logp + 0.01,
        advantages=torch.tensor([1.0, -1.0]),
        reward=[1.0, 0.0],
        grad_norm=1.0,
    )


def _gates(data: dict) -> dict[str, dict]:
    return {f"{g['policy'] or '(run)'} {g['gate']}": g for g in data["gates"]}


def test_replay_refuses_a_scalar_run_with_one_line_and_exit_3(tmp_path):
    run = _scalar_run(tmp_path / "run")
    proc = runner.invoke(app, ["replay", str(run), "-p", "grpo"])
    assert proc.exit_code == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.stdout == ""
    assert "nothing to replay: a scalar run (60 steps" in lines[0]
    assert "stabledrl inspect" in lines[0] and "stabledrl check" in lines[0]


def test_replay_skips_and_counts_the_scalar_steps_of_a_mixed_run(tmp_path):
    mixed, batches = tmp_path / "mixed", tmp_path / "batches"
    with sd.Recorder(mixed) as rec, sd.Recorder(batches) as only:
        for step in range(6):
            if step % 3 == 2:
                rec.log_step(step, grad_norm=2.0, step_time=0.1)
            else:
                _batch_step(rec, step)
                _batch_step(only, step)
    result = runner.invoke(app, ["replay", str(mixed), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 4 and data["scalar_steps"] == 2
    assert "2 steps have no policy batch" in result.stderr
    reference = json.loads(
        runner.invoke(app, ["replay", str(batches), "-p", "grpo", "--format", "json"]).stdout
    )
    assert reference["scalar_steps"] == 0
    for row, expected in zip(
        data["policies"][0]["steps"], reference["policies"][0]["steps"], strict=True
    ):
        assert row["step"] == expected["step"] and row["update_norm"] == expected["update_norm"]


@pytest.mark.parametrize("packed", [False, True])
def test_inspect_json_of_a_scalar_run(tmp_path, packed):
    run = _scalar_run(tmp_path / "run", collapse=True, spike=True, nonfinite=True)
    if packed:
        pack_run(sd.open_run(run), tmp_path / "run.h5")
        run = tmp_path / "run.h5"
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == data["scalar_steps"] == STEPS
    assert data["policy"] is None and data["source"]["kind"] == "import"
    assert data["fields"] == [] and data["integrity"]["ok"]
    observed = data["observed"]
    assert observed["first_reward_collapse"] is not None
    assert 30 <= observed["first_reward_collapse"] <= 40
    assert observed["recorded_spike_steps"] == [40]
    assert observed["nonfinite_steps"] == [50]
    clip = data["series"]["clip_frac"]
    assert clip["steps"] == STEPS and 0.1 <= clip["min"] <= clip["max"] <= 0.11
    assert data["series"]["grad_norm"]["nonfinite"] == 1
    assert data["series"]["grad_norm"]["max"] == 40.0
    assert data["series"]["clip_ratio/region_mean"]["first"] == 0.1
    assert "step" not in data["series"] and "wall_time" not in data["series"]


def test_inspect_and_check_tables_of_a_scalar_run_fit_80_columns(tmp_path, monkeypatch):
    """Wherever the run lives: the titles that name its path are lines of text wrapped to the
    width (the run table's title was printed whole, past 80 columns once the test's own
    temporary directory grew a digit)."""
    monkeypatch.setenv("COLUMNS", "80")
    run = _scalar_run(tmp_path / ("a-directory-long-enough-to-overflow-a-title" * 2) / "run")
    result = runner.invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.output
    assert "scalars only: nothing to replay" in result.stdout
    assert "import (format=jsonl, file=log.jsonl)" in result.stdout
    assert "Recorded series" in result.stdout and "clip_frac_high" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for gate in (["--max-spikes", "10"], ["--write-baseline", str(tmp_path / "b.json")]):
        checked = runner.invoke(app, ["check", str(run), *gate])
        assert checked.exit_code == 0, checked.output
        assert max(len(line) for line in checked.stdout.splitlines()) <= 80
    assert "recorded series of" in checked.stdout  # a baseline alone: the figures it records


def test_check_gates_a_scalar_run_without_a_baseline(tmp_path):
    healthy = _scalar_run(tmp_path / "healthy")
    sick = _scalar_run(tmp_path / "sick", collapse=True, spike=True, nonfinite=True)
    gates = ["--max-spikes", "0", "--max-nonfinite", "0", "--fail-on-collapse", "--format", "json"]
    passed = runner.invoke(app, ["check", str(healthy), *gates])
    assert passed.exit_code == 0, passed.output
    data = json.loads(passed.stdout)
    assert data["ok"] and data["scalar_run"] and data["policies"] == []
    assert set(_gates(data)) == {"(run) reward_collapse", "(run) max_spikes", "(run) max_nonfinite"}
    failed = runner.invoke(app, ["check", str(sick), *gates])
    assert failed.exit_code == 1, failed.stderr
    tripped = {name for name, g in _gates(json.loads(failed.stdout)).items() if not g["ok"]}
    assert tripped == {"(run) reward_collapse", "(run) max_spikes", "(run) max_nonfinite"}
    assert "1 grad-norm spike step, limit 0 (step 40)" in failed.stderr


def test_check_with_a_baseline_passes_and_trips_on_a_scalar_run(tmp_path):
    healthy = _scalar_run(tmp_path / "healthy")
    baseline = tmp_path / "baseline.json"
    wrote = runner.invoke(app, ["check", str(healthy), "--write-baseline", str(baseline)])
    assert wrote.exit_code == 0, wrote.output
    assert "recorded series of" in wrote.stdout
    data = json.loads(baseline.read_text())
    assert data["policies"] == {} and data["run"]["policy"] is None
    assert data["observed"]["spike_steps"]["value"] == 0
    assert data["observed"]["nonfinite_steps"]["value"] == 0
    assert data["observed"]["first_reward_collapse"]["value"] is None
    assert set(data["recorded"]) == {
        "reward_mean",
        "grad_norm",
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "entropy",
    }
    # ... and not step_time, which depends on the machine.
    assert data["recorded"]["clip_frac"]["mean"]["worse"] == "higher"
    load_baseline(baseline)  # what it writes, it reads

    same = runner.invoke(app, ["check", str(healthy), "--baseline", str(baseline)])
    assert same.exit_code == 0, same.output
    sick = _scalar_run(tmp_path / "sick", collapse=True, spike=True, nonfinite=True, clip=0.3)
    proc = runner.invoke(app, ["check", str(sick), "--baseline", str(baseline), "--format", "json"])
    assert proc.exit_code == 1, proc.stderr
    tripped = {name for name, g in _gates(json.loads(proc.stdout)).items() if not g["ok"]}
    assert {
        "(run) baseline.observed.first_reward_collapse",
        "(run) baseline.observed.spike_steps",
        "(run) baseline.observed.nonfinite_steps",
        "(run) baseline.recorded.clip_frac.mean",
        "(run) baseline.recorded.clip_frac.max",
        "(run) baseline.recorded.clip_frac_high.mean",
        "(run) baseline.recorded.reward_mean.tail",
    } <= tripped
    assert "(run) baseline.recorded.entropy.mean" not in tripped


def _reward_run(path: Path, rewards: list[float]) -> Path:
    """A scalar run of these per-step `reward_mean` values (grad norm 1 throughout)."""
    with sd.Recorder(path, policy=None, reward_range=(0.0, 1.0)) as rec:
        for step, reward in enumerate(rewards):
            rec.log_step(step, reward_mean=reward, grad_norm=1.0)
    return path


def test_a_written_baseline_gates_where_the_reward_ended_not_its_last_batch(tmp_path):
    """The written baseline gated `reward_mean.last`, one batch's mean reward, within 10%: a
    healthy rerun whose last batch drew 0.45 against the baseline's lucky 0.6 tripped (exit 1)
    on a reward steady at 0.5. It gates the mean of the last TAIL_STEPS steps (`tail`): a
    rerun ending at the same level passes, one that ended lower trips."""
    steady = [0.5] * (STEPS - 1)
    baseline = tmp_path / "baseline.json"
    wrote = runner.invoke(
        app,
        ["check", str(_reward_run(tmp_path / "a", [*steady, 0.6])), "--write-baseline",
         str(baseline)],
    )  # fmt: skip
    assert wrote.exit_code == 0, wrote.output
    rerun = runner.invoke(
        app, ["check", str(_reward_run(tmp_path / "b", [*steady, 0.45])), "-b", str(baseline)]
    )
    assert rerun.exit_code == 0, rerun.output
    tail = json.loads(baseline.read_text())["recorded"]["reward_mean"]["tail"]
    assert tail["value"] == pytest.approx(0.51)
    lower = [*steady[:-9], *[0.4] * 10]
    worse = runner.invoke(
        app, ["check", str(_reward_run(tmp_path / "c", lower)), "-b", str(baseline)]
    )
    assert worse.exit_code == 1
    assert "baseline.recorded.reward_mean.tail" in worse.stderr


@pytest.mark.parametrize(
    ("norms", "strict_gates_max"),
    [([1.0] * (STEPS - 1) + [1.7e308], True), ([sys.float_info.max] * STEPS, False)],
    ids=["one-step-at-1.7e308", "every-step-at-the-largest-float"],
)
def test_a_baseline_written_from_a_run_near_the_float_range_passes_it(
    tmp_path, norms, strict_gates_max
):
    """A recorded grad norm of 1.7e308 (finite) was written as grad_norm.max with its 25%
    slack, a limit past the largest float that `check -b` on the same run then refused (exit
    3, 'puts the limit past the largest float'). --write-baseline leaves such a gate out (no
    figure could trip it); the strict baseline's 1e-4 slack keeps it where it fits."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as rec:
        for step, norm in enumerate(norms):
            rec.log_step(step, grad_norm=norm)
    loose, strict = tmp_path / "loose.json", tmp_path / "strict.json"
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        wrote = [
            runner.invoke(app, ["check", str(run), "--write-baseline", str(loose)]),
            runner.invoke(app, ["check", str(run), "--write-baseline", str(strict), "--strict"]),
        ]
        assert [w.exit_code for w in wrote] == [0, 0], [w.stderr for w in wrote]
        checks = [
            runner.invoke(app, ["check", str(run), "-b", str(baseline), *flag])
            for baseline in (loose, strict)
            for flag in ([], ["--strict"])
        ]
    assert [str(w.message) for w in warned] == []
    for done in (*wrote, *checks):
        assert "Warning" not in done.stderr, done.stderr
    assert [c.exit_code for c in checks] == [0, 0, 0, 0], [c.stderr for c in checks]
    grad_norm = json.loads(loose.read_text())["recorded"].get("grad_norm", {})
    assert "max" not in grad_norm
    strict_norm = json.loads(strict.read_text())["recorded"].get("grad_norm", {})
    assert ("max" in strict_norm) == strict_gates_max


def test_only_a_clip_fraction_regression_trips(tmp_path):
    baseline = tmp_path / "baseline.json"
    runner.invoke(
        app, ["check", str(_scalar_run(tmp_path / "a")), "--write-baseline", str(baseline)]
    )
    worse = _scalar_run(tmp_path / "b", clip=0.2)
    proc = runner.invoke(
        app, ["check", str(worse), "--baseline", str(baseline), "--format", "json"]
    )
    assert proc.exit_code == 1
    tripped = {name for name, g in _gates(json.loads(proc.stdout)).items() if not g["ok"]}
    assert tripped == {
        f"(run) baseline.recorded.{name}.{stat}"
        for name in ("clip_frac", "clip_frac_low", "clip_frac_high")
        for stat in ("mean", "max")
    }


def test_a_hand_written_recorded_gate_on_any_scalar(tmp_path):
    run = _scalar_run(tmp_path / "run")
    baseline = tmp_path / "baseline.json"
    entry = {"value": 0.05, "worse": "higher", "abs_tol": 0.0, "rel_tol": 0.0}
    baseline.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
                "recorded": {"clip_ratio/region_mean": {"max": entry}, "missing": {"last": entry}},
                "policies": {"grpo": {}},
            }
        )
    )
    proc = runner.invoke(app, ["check", str(run), "--baseline", str(baseline), "--format", "json"])
    assert proc.exit_code == 1
    gates = json.loads(proc.stdout)["gates"]
    assert [(g["policy"], g["gate"], g["ok"]) for g in gates] == [
        (None, "baseline.recorded.clip_ratio/region_mean.max", False),
        (None, "baseline.present", False),
        ("grpo", "baseline.present", False),
    ]
    assert "did not record it" in gates[1]["message"]


def test_each_statistic_of_a_series_the_run_lacks_is_named_apart(tmp_path):
    """A baseline gating two statistics of a series the run did not record tripped two
    `baseline.present` gates with one message: stderr and JUnit showed the same line twice,
    and a report that merges identical test cases counted one failure."""
    run = _scalar_run(tmp_path / "run")
    baseline = tmp_path / "baseline.json"
    entry = {"value": 0.05, "worse": "higher"}
    baseline.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
                "recorded": {"missing": {"last": entry, "max": entry}},
                "policies": {},
            }
        )
    )
    proc = runner.invoke(app, ["check", str(run), "--baseline", str(baseline), "--format", "json"])
    assert proc.exit_code == 1
    messages = [g["message"] for g in json.loads(proc.stdout)["gates"]]
    assert len(messages) == 2 and len(set(messages)) == 2, messages
    assert all("did not record it" in m for m in messages)


@pytest.mark.parametrize(
    ("recorded", "message"),
    [
        ({"my_metric": {"max": {"value": 1.0}}}, "recorded.my_metric.max has no 'worse'"),
        ({"clip_frac": {"p99": {"value": 1.0}}}, "unknown statistic 'p99'"),
        ({"clip_frac": [1]}, "recorded.clip_frac must be an object"),
    ],
)
def test_a_malformed_recorded_section_is_exit_3(tmp_path, recorded, message):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(
        json.dumps(
            {
                "schema": "stabledrl-baseline",
                "version": 1,
                "replay": {"spike_factor": 10.0, "window": 20, "drift_threshold": -0.1},
                "recorded": recorded,
                "policies": {},
            }
        )
    )
    result = runner.invoke(app, ["check", str(_scalar_run(tmp_path / "r")), "-b", str(baseline)])
    assert result.exit_code == 3 and message in result.stderr


def test_a_policy_gate_on_a_scalar_run_is_a_usage_error(tmp_path):
    run = _scalar_run(tmp_path / "run")
    result = runner.invoke(app, ["check", str(run), "--max-collapsed", "0"])
    assert result.exit_code == 2
    assert "scalar run" in result.stderr and "--max-collapsed" in result.stderr


def test_a_policy_gate_on_a_mixed_run_whose_batch_steps_are_torn_is_bad_input(tmp_path):
    """Its readable steps are scalar steps, but the torn ones held the policy batches: not a
    scalar run (exit 2, "is a scalar run"), but bad input (exit 3) naming the files skipped,
    as when those steps' data is corrupt instead."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(4):
            if step % 2:
                _batch_step(rec, step)
            else:
                rec.log_step(step, grad_norm=1.0, reward_mean=0.5)
    for step in (1, 3):
        torn = run / "steps" / f"step-{step:08d}.safetensors"
        torn.write_bytes(torn.read_bytes()[:10])
    done = runner.invoke(app, ["check", str(run), "--max-collapsed", "0"])
    assert done.exit_code == 3, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: {run}: no readable step holds a policy batch (2 steps ")
    assert line.endswith("--max-collapsed need(s) replayed policies")


def test_a_run_whose_rewards_went_unscored_trips_a_written_baseline(tmp_path):
    """A run whose reward was NaN (no sample scored: a reward server down) at 18 of its 60
    steps passed the baseline of a clean run, exit 0: the finite rewards' mean and tail held.
    A written baseline now gates how many steps recorded a non-finite reward_mean."""
    rewards = [0.5 + 0.001 * (step % 7) for step in range(STEPS)]
    baseline = tmp_path / "baseline.json"
    clean = _reward_run(tmp_path / "clean", rewards)
    wrote = runner.invoke(app, ["check", str(clean), "--write-baseline", str(baseline)])
    assert wrote.exit_code == 0, wrote.output
    entry = json.loads(baseline.read_text())["recorded"]["reward_mean"]["nonfinite"]
    assert (entry["value"], entry["worse"]) == (0, "higher")
    assert runner.invoke(app, ["check", str(clean), "-b", str(baseline)]).exit_code == 0
    unscored = [math.nan if step % 10 < 3 else r for step, r in enumerate(rewards)]
    sick = _reward_run(tmp_path / "unscored", unscored)
    checked = runner.invoke(app, ["check", str(sick), "-b", str(baseline), "--format", "json"])
    assert checked.exit_code == 1, checked.output
    gate = _gates(json.loads(checked.stdout))["(run) baseline.recorded.reward_mean.nonfinite"]
    assert not gate["ok"] and gate["figure"] == 18
    assert gate["message"].startswith("recorded.reward_mean.nonfinite 18, baseline 0: above")
