"""docs/custom-loops.md's StableDRL recipe on several ranks: each rank's batch is one prompt's
completions (group_id = arange(B) // num_generations, all 0), its softmax over that batch, and
the data-parallel loss the mean of the ranks'. Recorded with the `group_ids` the page names,
replaying the run's own policy gives that loss on every step."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import stabledrl_cli as sd

ROOT = Path(__file__).resolve().parents[1]
G = 4  # num_generations, one group a rank
RANKS = 2


def _documented_group_ids() -> str:
    text = " ".join((ROOT / "docs" / "custom-loops.md").read_text().split())
    found = re.search(r"recorded with (?:the default )?`group_ids=\"(\w+)\"`", text)
    assert found is not None, "docs/custom-loops.md names no group_ids for several ranks"
    return found.group(1)


def _rank_batch(step: int, rank: int) -> tuple[dict[str, torch.Tensor], float]:
    g = torch.Generator().manual_seed(100 * step + rank)
    per_seq_elbo = -torch.rand(G, generator=g) * 5
    ref_elbo = per_seq_elbo + 0.5 * torch.randn(G, generator=g)
    rewards = torch.rand(G, generator=g)
    advantages = rewards - rewards.mean()
    clipped_log_iw = torch.clamp(per_seq_elbo - ref_elbo, max=math.log(5.0))
    normalized_weights = torch.softmax(clipped_log_iw, dim=0)
    loss = -torch.sum(normalized_weights * advantages * per_seq_elbo)
    fields = {
        "logp": per_seq_elbo,
        "logp_old": ref_elbo,
        "advantages": advantages,
        "group_id": torch.arange(G) // G,
        "reward": rewards,
        "loss": loss,
    }
    return fields, float(loss)


def test_the_documented_multi_rank_stabledrl_recording_replays_the_loops_loss(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    group_ids = _documented_group_ids()
    recorders = [
        sd.Recorder(
            run, policy="stabledrl", unit="sequence", world_size=RANKS, rank=r, group_ids=group_ids
        )
        for r in range(RANKS)
    ]
    losses = []
    for step in range(3):
        rank_losses = []
        for rank, rec in enumerate(recorders):
            fields, loss = _rank_batch(step, rank)
            rec.log_step(step, **fields)
            rank_losses.append(loss)
        losses.append(sum(rank_losses) / RANKS)  # DDP's average of the ranks' losses
    for rec in recorders:
        rec.close()
    policies = json.loads(sd.replay(run).to_json())["policies"]
    own = next(p for p in policies if p["own"])
    assert [row["objective"] for row in own["steps"]] == pytest.approx(
        [-loss for loss in losses], rel=1e-5
    )
