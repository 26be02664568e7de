"""Gates on a policy whose every replayed update is non-finite: its discard fraction and drift
say nothing (nothing is discarded or drifts in a NaN update), so a gate on them trips."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _run(path, *, logp_nan: bool):
    """12 steps of 4 sequences of 6 tokens; `logp_nan`: every new log-probability NaN."""
    rng = np.random.default_rng(0)
    shape, groups = (4, 6), np.arange(4) // 2
    with sd.Recorder(path, policy="grpo", unit="token") as recorder:
        for step in range(12):
            old = -rng.random(shape).astype(np.float32)
            batch = {"logp_old": old, "logp": np.full(shape, np.nan, np.float32) if logp_nan
                     else old + 0.01, "mask": np.ones(shape, dtype=bool), "group_id": groups,
                     "advantages": rng.normal(size=4).astype(np.float32),
                     "reward": rng.random(4).astype(np.float32)}  # fmt: skip
            recorder.log_step(step, **batch)
    return path


def _gates(*args: str) -> tuple[int, list[dict[str, object]]]:
    result = runner.invoke(app, ["check", *args, "--format", "json"])
    return result.exit_code, json.loads(result.stdout)["gates"]


def test_max_discard_frac_trips_on_a_policy_whose_every_update_is_non_finite(tmp_path):
    """It passed ('discard_frac 0, limit 0', exit 0): a NaN ratio is never clipped."""
    run = _run(tmp_path / "nan", logp_nan=True)
    code, (gate,) = _gates(str(run), "-p", "grpo", "--max-discard-frac", "0")
    assert code == 1
    assert (gate["policy"], gate["gate"], gate["ok"], gate["figure"]) == (
        "grpo",
        "max_discard_frac",
        False,
        None,
    )
    assert gate["message"] == (
        "every replayed step's update is non-finite (12 steps): there is no discard fraction "
        "to gate"
    )
    done = runner.invoke(app, ["check", str(run), "-p", "grpo", "--max-discard-frac", "0"])
    assert done.exit_code == 1, done.stderr
    assert "grpo max_discard_frac: every replayed step's update is non-finite" in done.stderr
    finite = _run(tmp_path / "finite", logp_nan=False)
    code, (gate,) = _gates(str(finite), "-p", "grpo", "--max-discard-frac", "1")
    assert (code, gate["ok"]) == (0, True)


def _nan_run_against_a_healthy_baseline(tmp_path) -> list[dict[str, object]]:
    """The gates of the NaN run checked against the finite run's baseline (which passes its
    own run; the NaN run trips it, exit 1). Its drift window of 10 lets the drift rule judge
    the finite run's 12 steps, so the baseline holds drift_steps."""
    baseline = tmp_path / "b.json"
    code, _ = _gates(str(_run(tmp_path / "finite", logp_nan=False)), "-p", "grpo",
                     "--window", "10", "--write-baseline", str(baseline))  # fmt: skip
    assert code == 0
    code, gates = _gates(str(_run(tmp_path / "nan", logp_nan=True)), "-b", str(baseline))
    assert code == 1
    return gates


def test_a_baseline_discard_frac_or_drift_trips_on_a_policy_whose_every_update_is_non_finite(
    tmp_path,
):
    """Against a healthy run's baseline, discard_frac 0 and drift_steps 0 passed on the NaN
    run (only collapsed_steps and the update norms tripped)."""
    gates = _nan_run_against_a_healthy_baseline(tmp_path)
    absent = {g["message"] for g in gates if g["gate"] == "baseline.present"}
    assert absent == {
        f"{name} is in the baseline, but every replayed step's update of 'grpo' is non-finite "
        "(12 steps)"
        for name in ("discard_frac", "drift_steps")
    }
    assert not any(g["gate"] in ("baseline.discard_frac", "baseline.drift_steps") for g in gates)


def test_a_baseline_update_norm_on_a_policy_whose_every_update_is_non_finite_says_so(tmp_path):
    """It tripped with the figure shown as a plain 'inf', as if a norm had been measured."""
    gates = _nan_run_against_a_healthy_baseline(tmp_path)
    norms = {g["gate"]: g for g in gates if g["gate"].startswith("baseline.update_norm")}
    assert sorted(norms) == ["baseline.update_norm_max", "baseline.update_norm_median"]
    for name, gate in norms.items():
        assert (gate["ok"], gate["figure"]) == (False, None)
        assert gate["message"].startswith(f"{name.split('.')[1]} inf (no finite value), baseline ")
        assert ": above the limit " in gate["message"]
