"""A step's arrays must have the shape the manifest's `unit` says (docs/run-format.md, Units):
under `unit: sequence` each entry is a whole sequence, one distinct `seq_id` an entry. A
step that contradicts it (token-level data: several entries of one sequence) is data a replay
cannot use: skipped and named, and a run with no other step is exit 3 with one line, never
replayed as if each token were a sequence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli
from _corpus import edit_manifest, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import InputError

runner = CliRunner()
STEPS = 4
REPEATS = "unit 'sequence' records one entry per sequence"


def _token_run_said_sequence(path: Path) -> Path:
    """`tiny_run` (4 sequences of 3 tokens a step) under a manifest that says unit: sequence."""
    return edit_manifest(tiny_run(path, steps=STEPS), lambda m: m.update(unit="sequence"))


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("replaying:")]


@pytest.mark.parametrize(
    "options",
    [["replay", "--device", "cpu"], ["check", "--max-collapsed", "100"], ["watch", "--once"]],
    ids=lambda options: options[0],
)
def test_token_data_under_unit_sequence_is_refused(tmp_path, options):
    run = _token_run_said_sequence(tmp_path / "run")
    result = runner.invoke(app, [options[0], str(run), *options[1:]])
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "no step could be read" in lines[0] and REPEATS in lines[0], lines[0]
    with pytest.raises(InputError, match=REPEATS):
        sd.replay(run, ["grpo"], device="cpu")


def test_inspect_lists_each_contradicting_step_as_invalid(tmp_path):
    run = _token_run_said_sequence(tmp_path / "run")
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert [(f["kind"], f["step"]) for f in findings] == [("invalid", n) for n in range(STEPS)]
    assert all(REPEATS in f["message"] for f in findings)


def test_the_exit_code_in_a_real_process(tmp_path):
    run = _token_run_said_sequence(tmp_path / "run")
    result = run_cli("replay", run, "--device", "cpu")
    assert result.returncode == 3, result.stderr
    lines = _lines(result.stderr)
    assert len(lines) == 1 and REPEATS in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_one_contradicting_step_is_skipped_and_named(tmp_path):
    """A sequence run whose step 1 holds token-level data: the other steps replay."""
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    with sd.Recorder(run, policy="grpo", unit="sequence") as rec:
        for step in range(STEPS):
            logp = -rng.random(4).astype(np.float32)
            rec.log_step(step, logp=logp, logp_old=logp + 0.01, advantages=[1.0, -1.0, 1.0, -1.0])
    token = tmp_path / "token"
    tiny_run(token, steps=2)
    (run / "steps" / "step-00000001.safetensors").write_bytes(
        (token / "steps" / "step-00000001.safetensors").read_bytes()
    )
    result = runner.invoke(app, ["replay", str(run), "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == STEPS - 1
    named = [line for line in _lines(result.stderr) if "step 1:" in line]
    assert len(named) == 1 and REPEATS in named[0], result.stderr
