"""`check --max-lost-steps N`: a CI gate on the steps a run lacks (skipped as unreadable, or
missing between its recorded ones). Without it a recording that lost most of its steps passed
every gate: the JSON counted them and a warning named them, but nothing failed."""

from __future__ import annotations

import json
from pathlib import Path

from _corpus import step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

runner = CliRunner()


def _damaged(tmp_path: Path) -> Path:
    """A tiny run of 12 steps whose steps 2 and 3 are gone and step 5 torn: 3 steps lost."""
    run = tiny_run(tmp_path / "run", steps=12)
    for step in (2, 3):
        step_path(run, step).unlink()
    step_path(run, 5).write_bytes(b"x")
    return run


def _gate(stdout: str) -> dict[str, object]:
    (gate,) = [g for g in json.loads(stdout)["gates"] if g["gate"] == "max_lost_steps"]
    return gate


def test_a_run_that_lost_steps_trips_the_gate(tmp_path):
    run = _damaged(tmp_path)
    result = runner.invoke(app, ["check", str(run), "--max-lost-steps", "0", "-f", "json"])
    assert result.exit_code == 1, result.output
    assert _gate(result.stdout) == {
        "policy": None,
        "gate": "max_lost_steps",
        "ok": False,
        "figure": 3.0,
        "limit": 0.0,
        "message": "3 steps lost (1 skipped, 2 missing between recorded ones), limit 0",
    }
    assert (
        "  (run) max_lost_steps: 3 steps lost (1 skipped, 2 missing between recorded ones), "
        "limit 0" in result.stderr.splitlines()
    ), result.stderr


def test_the_limit_is_inclusive_and_a_whole_run_passes(tmp_path):
    run = _damaged(tmp_path)
    held = runner.invoke(app, ["check", str(run), "--max-lost-steps", "3", "-f", "json"])
    assert held.exit_code == 0, held.output
    assert _gate(held.stdout)["ok"] is True
    whole = tiny_run(tmp_path / "whole", steps=12)
    result = runner.invoke(app, ["check", str(whole), "--max-lost-steps", "0"])
    assert result.exit_code == 0, result.output
    assert "check passed: 1 gate holds" in result.stderr


def test_a_scalar_run_is_gated_too(tmp_path):
    """A run of scalar steps (an optimizer-hooks recording) is not replayed; its lost steps
    are counted from its read."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        for step in range(10):
            recorder.log_step(step, grad_norm=1.0, loss=0.5)
    step_path(run, 4).unlink()
    result = runner.invoke(app, ["check", str(run), "--max-lost-steps", "0", "-f", "json"])
    assert result.exit_code == 1, result.output
    assert _gate(result.stdout)["message"] == (
        "1 step lost (0 skipped, 1 missing between recorded ones), limit 0"
    )


def test_a_negative_limit_is_a_usage_error(tmp_path):
    run = tiny_run(tmp_path / "run", steps=4)
    result = runner.invoke(app, ["check", str(run), "--max-lost-steps", "-1"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("must be >= 0, got -1"), result.stderr


def test_a_scalar_run_resumed_while_checked_is_refused(tmp_path, monkeypatch):
    """A scalar run resumed from step 5 (steps 5-6 written again) after check listed its 10
    steps: check read 10 steps of two recordings and failed the gate on '3 steps lost (3
    skipped ...)', steps 7-9 removed by the resume, where a replayed run is refused."""
    import stabledrl_cli.cli.check as check
    from stabledrl_cli.dump import Run

    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        for step in range(10):
            recorder.log_step(step, grad_norm=1.0, loss=0.5)
    listed = check.is_scalar_run

    def resumed_meanwhile(opened: Run) -> bool:
        with sd.Recorder(run, policy=None, resume=True, resume_from=5) as recorder:
            for step in range(5, 7):
                recorder.log_step(step, grad_norm=50.0, loss=0.5)
        return listed(opened)

    monkeypatch.setattr(check, "is_scalar_run", resumed_meanwhile)
    result = runner.invoke(app, ["check", str(run), "--max-lost-steps", "0", "-f", "json"])
    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == (
        f"error: {run}: the run was recorded again while the check read it (resumed from a "
        "step it held, or recorded over: a new run_id); check it again"
    )
