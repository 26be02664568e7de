"""A recorded step's arrays as a policy batch, for the integration tests."""

from __future__ import annotations

from typing import Any

from stabledrl_cli.policies import PolicyBatch


def policy_batch(step: Any) -> PolicyBatch:
    """Every array an integration records for a step (a `Step` or a mapping of its arrays)."""
    return PolicyBatch(
        logp=step["logp"],
        logp_old=step["logp_old"],
        advantages=step["advantages"],
        mask=step["mask"],
        seq_id=step["seq_id"],
        group_id=step["group_id"],
        reward=step["reward"],
        logp_ref=step.get("logp_ref"),
        loss_weight=step.get("loss_weight"),
        loss_scale=step.get("loss_scale"),
        micro_batch=step["micro_batch"],
    )
