"""`check` and `tune` warn of a run whose recording stopped before its training ended, as
`replay` and `watch` do.

`record --rl-steps 400` stopped by Ctrl-C at step 27: `replay` and `watch --once` warned
`recording stopped at step 27 (rank 0): training interrupted (Ctrl-C) ...`, but `check RUN
--max-spikes 1000` printed only `check passed: 1 gate holds` and `tune` nothing: a CI gate
passed a run of 27 of the 400 steps asked, with no word that the training went on
unrecorded or was cut short."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

STOPPED = "recording stopped at step 8 (rank 0): training interrupted (Ctrl-C)"


def _interrupted(path: Path, *, batches: bool) -> Path:
    """A run whose `with Recorder` block Ctrl-C left after its step 7."""
    rng = np.random.default_rng(0)
    with pytest.raises(KeyboardInterrupt), Recorder(path, policy="grpo") as recorder:
        for step in range(8):
            logp = -rng.random((4, 3)).astype(np.float32)
            batch = {
                "logp": logp,
                "logp_old": logp + rng.normal(scale=0.1, size=(4, 3)).astype(np.float32),
                "advantages": rng.standard_normal(4).astype(np.float32),
                "group_id": np.array([0, 0, 1, 1]),
            }
            recorder.log_step(step, grad_norm=1.0, loss=0.5, **(batch if batches else {}))
        raise KeyboardInterrupt
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["check", "--max-spikes", "100"],
        ["check", "--max-collapsed", "100", "-f", "json"],
        ["tune", "-p", "dapo:eps_high=0.2|0.3"],
    ],
)
def test_a_run_cut_short_is_warned_of(tmp_path: Path, args: list[str]) -> None:
    run = _interrupted(tmp_path / "run", batches=True)
    result = CliRunner().invoke(app, [args[0], str(run), *args[1:], "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith(f"warning: {run}: {STOPPED}") for line in result.stderr.splitlines())


def test_a_scalar_run_cut_short_is_warned_of_by_check(tmp_path: Path) -> None:
    run = _interrupted(tmp_path / "run", batches=False)
    result = CliRunner().invoke(app, ["check", str(run), "--max-spikes", "100"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith(f"warning: {run}: {STOPPED}") for line in result.stderr.splitlines())
