"""Unscored entries (mask = 0) are padding and may hold anything (`PolicyBatch`): NaN, an
infinity or a huge number there must not move any scored entry's figure. Every policy gives
the weights, and the frameworks' clip metrics, it gives the same step padded with clean
values."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.policies import REGISTRY, prepare
from stabledrl_cli.replay.framework import MicroBatches, framework_metrics

F64 = torch.float64
B, L = 6, 5
FIELDS = ("logp", "logp_old", "advantages", "logp_ref", "logp_rollout", "loss_weight")
SPECS = [
    *(name for name in REGISTRY if name != "two-sided"),
    "two-sided:delta=1.1",
    "clip-cov:ratio=0.3,lb=-1,ub=1,seed=3",
    "kl-cov:ratio=0.3,cov=micro",
    "ppo:adv=zscore",
    "grpo:beta=0.1,kl_is=token",
    "gspo:beta=0.1,kl_is=sequence",
    "gspo:tis=sequence-mask,tis_min=0.5",
]


def clean() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, L, generator=gen, dtype=F64) * 3
    logp_old = logp - torch.randn(B, L, generator=gen, dtype=F64) * 0.4
    mask = (torch.rand(B, L, generator=gen) < 0.7).to(F64)
    mask[:, 0] = 1.0
    return {
        "logp": logp,
        "logp_old": logp_old,
        "advantages": torch.randn(B, generator=gen, dtype=F64)[:, None].expand(B, L).clone(),
        "mask": mask,
        "logp_ref": logp - 0.1,
        "logp_rollout": logp_old + 0.05 * torch.randn(B, L, generator=gen, dtype=F64),
        "loss_weight": torch.ones(B, L, dtype=F64),
        "reward": torch.rand(B, generator=gen, dtype=F64),
        "group_id": torch.tensor([0, 0, 1, 1, 2, 2]),
        "micro_batch": torch.tensor([0, 0, 0, 1, 1, 1]),
    }


def figures(spec: str, data: dict[str, torch.Tensor]) -> tuple[Any, dict[str, float]]:
    """The policy's weights and its TRL and verl metrics on the step, one micro-batch."""
    prep = prepare(PolicyBatch(**data))
    policy = get_policy(spec)
    weights = policy.weights(prep)
    one = torch.zeros(B, dtype=torch.int64)
    metrics = framework_metrics(prep, [policy], [weights], MicroBatches(one, 1, one, 1))
    return weights, {name: float(value) for name, value in metrics.items()}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_padding_moves_no_figure(spec: str, value: float) -> None:
    data = clean()
    scored = data["mask"].reshape(-1) > 0
    want, want_metrics = figures(spec, data)
    for field in FIELDS:
        padded = dict(data)
        padded[field] = torch.where(data["mask"] > 0, data[field], value)
        got, metrics = figures(spec, padded)
        msg = f"{spec}, {field} = {value} on unscored entries"
        assert torch.equal(got.coef[scored], want.coef[scored]), msg
        assert torch.equal(got.discarded, want.discarded), msg
        assert torch.equal(got.clipped, want.clipped), msg
        assert torch.equal(got.objective, want.objective), msg
        assert int(got.nonfinite) == 0, msg
        assert metrics == pytest.approx(want_metrics, rel=0, abs=0, nan_ok=True), msg
