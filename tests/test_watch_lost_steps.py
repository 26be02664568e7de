"""`watch --max-lost-steps N`: `check`'s gate on the steps a run lacks (skipped, or missing
between its recorded ones). watch had no such gate: a run that lost steps, live or --once, was
only warned of on stderr and exited 0 (`--max-lost-steps`: 'No such option', exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from _corpus import bad_seq_id
from conftest import fixture_run
from test_replay_bad_steps import measured_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder


def _lossy_copy(tmp_path: Path) -> Path:
    """The grpo fixture with step 5 removed (missing) and step 7 torn (skipped)."""
    run = tmp_path / "run"
    shutil.copytree(fixture_run("grpo"), run)
    (run / "steps" / "step-00000005.safetensors").unlink()
    torn = run / "steps" / "step-00000007.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    return run


def _tripped_as_check(run: Path, limit: str) -> tuple[str, str]:
    """`watch --once --max-lost-steps LIMIT` beside `check` with the same gate: both exit 1
    with the same gates; -> the gate's message and watch's stderr."""
    args = ["--max-lost-steps", limit, "-f", "json", "--device", "cpu"]
    watch = CliRunner().invoke(app, ["watch", str(run), "--once", *args])
    check = CliRunner().invoke(app, ["check", str(run), "-p", "grpo", *args])
    assert watch.exit_code == 1 == check.exit_code, watch.output
    gates = json.loads(watch.stdout)["gates"]
    assert gates == json.loads(check.stdout)["gates"]
    return gates[0]["message"], watch.stderr


def test_once_gates_the_lost_steps_as_check_does(tmp_path):
    run = _lossy_copy(tmp_path)
    message, stderr = _tripped_as_check(run, "1")
    assert message == "2 steps lost (1 skipped, 1 missing between recorded ones), limit 1"
    assert "gate tripped: (run) max_lost_steps: 2 steps lost" in stderr
    held = CliRunner().invoke(app, ["watch", str(run), "--once", "--max-lost-steps", "2"])
    assert held.exit_code == 0 and "gates passed: 1 gate holds" in held.stderr


def test_a_step_the_own_policy_cannot_replay_is_lost_as_check_counts_it(tmp_path):
    run = bad_seq_id(measured_run(tmp_path / "run"), 2)  # a seq_id past int32: rejected
    message, _ = _tripped_as_check(run, "0")
    assert message == "1 step lost (1 skipped, 0 missing between recorded ones), limit 0"


def test_a_followed_scalar_run_that_lost_steps_trips_the_gate_when_it_ends(tmp_path):
    run = tmp_path / "run"
    with Recorder(run) as recorder:  # steps 10 and 11 never written
        for n in (*range(10), *range(12, 20)):
            recorder.log_step(n, grad_norm=1.0, loss=0.5, reward_mean=0.5)
    args = ["watch", str(run), "--interval", "0.05", "--max-lost-steps", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "the recording closed: stopped (18 steps seen)" in result.stderr
    assert result.stderr.rstrip().endswith(
        "gate tripped: (run) max_lost_steps: 2 steps lost (0 skipped, 2 missing between "
        "recorded ones), limit 0"
    )


def test_a_negative_limit_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["watch", str(tmp_path), "--max-lost-steps", "-1"])
    assert result.exit_code == 2
    assert "max-lost-steps" in result.stderr and ">= 0" in result.stderr
