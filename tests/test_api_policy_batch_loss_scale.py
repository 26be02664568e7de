"""docs/custom-loops.md's SPG recipe gives `loss_scale` as one number, the batch's total
(`completion_length.sum()`), which `Recorder.log_step` takes (4afc850); a `PolicyBatch` of the
same fields (the Guard's batch rule, `Policy.weights`) refused it: 'loss_scale has shape (),
expected (4,)'. It now takes it as every entry's normaliser, as the Recorder does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import InputError
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import PolicyBatch, get_policy

SPEC = "reinforce:agg=recorded"


def _fields() -> dict[str, torch.Tensor]:
    """One SPG step: four sequences' ELBOs, their completion lengths and the batch's total."""
    lengths = torch.tensor([5, 7, 3, 9])
    return {
        "logp": torch.tensor([-1.5, -2.0, -0.5, -3.25]),
        "logp_old": torch.tensor([-1.25, -2.0, -0.75, -3.0]),
        "advantages": torch.tensor([1.0, -0.5, 0.25, -1.0]),
        "loss_weight": lengths,
        "loss_scale": lengths.sum(),
    }


def test_one_loss_scale_weighs_as_the_recorded_step_replays(tmp_path: Path) -> None:
    fields = _fields()
    weights = get_policy(SPEC).weights(PolicyBatch(unit="sequence", **fields))
    lengths = fields["loss_weight"].float()
    expected = fields["advantages"] * lengths / lengths.sum()
    torch.testing.assert_close(weights.coef, expected)
    with sd.Recorder(tmp_path / "run", policy=SPEC, unit="sequence") as recorder:
        recorder.log_step(0, loss=-float(weights.objective), **fields)
    summary = sd.replay(tmp_path / "run", SPEC).policies[0].summary
    assert summary.loss_parity is not None and summary.loss_parity < 1e-6


def test_the_guard_takes_the_batch_the_recorder_takes() -> None:
    guard = Guard(mode="skip", policy=SPEC)
    decision = guard.before_step(grad_norm=1.0, batch=PolicyBatch(unit="sequence", **_fields()))
    assert decision.action == "none"


def test_a_loss_scale_of_another_shape_is_still_refused() -> None:
    fields = {**_fields(), "loss_scale": torch.ones(3)}
    with pytest.raises(InputError, match=r"^loss_scale has shape \(3,\), expected \(4,\)$"):
        get_policy(SPEC).weights(PolicyBatch(unit="sequence", **fields))
