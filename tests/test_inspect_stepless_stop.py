"""`inspect` of a run whose training stopped before its first step (its note's step null)
names no step: the row read `stopped at step None`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabledrl_cli import Recorder
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError


def test_a_stop_before_the_first_step_names_no_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(UsageError), Recorder(run, policy="grpo") as recorder:
        recorder.log_step(0, logp=np.zeros(4), logp_old=np.zeros(4), advantages=np.ones(4))
    result = CliRunner().invoke(app, ["inspect", str(run)], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "step None" not in result.stdout
    assert "stopped (rank 0): training stopped by UsageError: seq_id" in result.stdout
