"""A step joined from ranks counts in `nonfinite` what the same step recorded from one process
counts: the ranks' non-finite batch entries, plus the joined step's own `loss` and `grad_norm`
when they are not finite, once each. Every rank of a DDP or FSDP job records the same global
grad_norm, so a NaN gradient read 2 in a 2-rank run (8 in one of 8) where one process reads 1,
and `diff` of the two recordings parted on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app

NAN = math.nan


def _log(recorder: sd.Recorder, logp: list[float], loss: float, grad_norm: float) -> None:
    """One step of one token per sequence (`logp`), its advantages 1."""
    values = np.array(logp, dtype=np.float32)[:, None]
    recorder.log_step(
        0, logp=values, logp_old=np.zeros_like(values), advantages=np.ones(len(logp)),
        loss=loss, grad_norm=grad_norm,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("losses", "grad_norm", "expected"),
    [
        ((0.5, 0.5), NAN, 2),  # rank 1's NaN logp, and the NaN grad_norm every rank records
        ((0.5, math.inf), 1.0, 2),  # the joined loss (their mean) is inf: counted once
        ((math.inf, math.inf), math.inf, 3),
        ((0.5, 0.5), 1.0, 1),  # the entry alone, as before
    ],
)
def test_the_joined_step_counts_its_loss_and_grad_norm_once(tmp_path, losses, grad_norm, expected):
    parts = ([-1.0, -2.0], [NAN, -1.0])
    with (
        sd.Recorder(tmp_path / "ranks", world_size=2, rank=0, policy=None) as first,
        sd.Recorder(tmp_path / "ranks", world_size=2, rank=1, policy=None) as second,
    ):
        for recorder, logp, loss in zip((first, second), parts, losses, strict=True):
            _log(recorder, logp, loss, grad_norm)
    with sd.Recorder(tmp_path / "one", policy=None) as alone:
        _log(alone, parts[0] + parts[1], float(np.mean(losses)), grad_norm)
    joined = sd.open_run(tmp_path / "ranks").step(0).scalars
    one = sd.open_run(tmp_path / "one").step(0).scalars
    assert joined["nonfinite"] == one["nonfinite"] == expected
    result = CliRunner().invoke(app, ["diff", str(tmp_path / "ranks"), str(tmp_path / "one")])
    assert "nonfinite" not in result.output, result.output
