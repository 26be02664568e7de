"""SPG without SNIS in a hand-written loop, recorded as docs/custom-loops.md says:
`reinforce:agg=recorded` with `loss_weight` = each sequence's completion length and
`loss_scale` = the batch's total. The loop's own numbers are ints (lengths and their sum, one
0-d tensor): the Recorder takes them as they are, and replaying the run's own policy gives the
loop's loss on every step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

B = 8


def _spg_step(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    per_seq_logps = -torch.rand(B, generator=g) * 20
    completion_length = torch.randint(5, 30, (B,), generator=g)  # int64
    advantages = torch.randn(B, generator=g)
    loss = (-advantages * per_seq_logps * completion_length).sum() / completion_length.sum()
    return {
        "logp": per_seq_logps,
        "logp_old": per_seq_logps + 0.1 * torch.randn(B, generator=g),
        "advantages": advantages,
        "loss_weight": completion_length,
        "loss_scale": completion_length.sum(),  # one number: the batch's total, an int
        "token_count": completion_length,
        "group_id": torch.arange(B) // 4,
        "loss": loss,
    }


def test_spg_recipe_records_int_lengths_and_one_total(tmp_path: Path) -> None:
    run = tmp_path / "spg"
    losses = []
    with sd.Recorder(run, policy="reinforce:agg=recorded", unit="sequence") as rec:
        for step in range(3):
            fields = _spg_step(step)
            rec.log_step(step, **fields)
            losses.append(float(fields["loss"]))
    opened = sd.open_run(run)
    total = float(_spg_step(0)["loss_scale"])
    assert np.array_equal(opened.step(0).array("loss_scale"), np.full(B, total, "float32"))
    own = json.loads(sd.replay(run).to_json())["policies"]
    rows = next(p for p in own if p["own"])["steps"]
    assert [row["objective"] for row in rows] == pytest.approx([-x for x in losses], rel=1e-5)


def test_a_loss_scale_of_another_shape_is_still_refused(tmp_path: Path) -> None:
    fields = _spg_step(0)
    fields["loss_scale"] = fields["loss_scale"].reshape(1).expand(2)
    rec = sd.Recorder(tmp_path / "run", policy="reinforce:agg=recorded", unit="sequence")
    with rec, pytest.raises(UsageError, match=r"loss_scale: shape \[2\] does not match"):
        rec.log_step(0, **fields)
