"""A prompt group split across optimizer steps or ranks is never silently two groups: the
recorded `group_split` makes advantage re-normalisation refuse, and adv=recorded still works."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.errors import UsageError


def _batch(group_split: list[int] | None) -> PolicyBatch:
    logp = torch.tensor([-1.0, -1.1, -0.9, -1.2])
    return PolicyBatch(
        logp=logp,
        logp_old=logp - 0.05,
        advantages=torch.tensor([0.5, -0.5, 1.0, -1.0]),
        mask=torch.ones(4, dtype=torch.uint8),
        group_id=torch.tensor([0, 0, 1, 1]),
        reward=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_split=None if group_split is None else torch.tensor(group_split),
        unit="sequence",
    )


@pytest.mark.parametrize("mode", ["center", "zscore", "rloo"])
def test_recomputing_advantages_of_a_split_group_is_refused(mode: str) -> None:
    policy = get_policy(f"grpo:adv={mode}")
    with pytest.raises(UsageError, match="2 sequences of this step belong to groups split"):
        policy.weights(_batch([0, 0, 1, 1]))
    assert torch.isfinite(policy.weights(_batch([0, 0, 0, 0])).coef).all()


def test_recorded_advantages_of_a_split_group_replay_as_recorded() -> None:
    split = get_policy("grpo").weights(_batch([1, 1, 1, 1])).coef
    whole = get_policy("grpo").weights(_batch(None)).coef
    assert torch.equal(split, whole)
