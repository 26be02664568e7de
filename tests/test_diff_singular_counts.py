"""`diff` counts one compared step in the singular."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app


def test_one_compared_step_is_said_in_the_singular(tmp_path: Path) -> None:
    """Two runs of one equal step: each kind said 'equal on all 1 compared steps'."""
    for name in ("a", "b"):
        with sd.Recorder(tmp_path / name, policy="is") as recorder:
            recorder.log_step(
                0,
                logp=torch.full((2, 3), -1.0),
                logp_old=torch.full((2, 3), -1.1),
                advantages=torch.tensor([1.0, -1.0]),
            )
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "log-probs   equal on the 1 compared step" in result.stdout.splitlines(), result.stdout
