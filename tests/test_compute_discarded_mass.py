"""A replay's discarded mass: a policy that discards no token of a step has the mass 0 there
without a pass over the step's terms (on the CPU, where its count is known), and one that
discards some has the sum of |r A w / norm| over them, as before."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli import get_policy
from stabledrl_cli.policies import PolicyBatch, prepare
from stabledrl_cli.policies._masked import keep_times
from stabledrl_cli.replay import columns, metrics
from stabledrl_cli.replay.framework import micro_batches
from stabledrl_cli.replay.metrics import StepGeometry, step_metrics


def test_only_a_policy_that_discards_takes_a_pass_for_its_discarded_mass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seq_id = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
    prep = prepare(
        PolicyBatch(
            logp=torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0, 0.0]),
            logp_old=torch.zeros(6),
            advantages=torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]),
            mask=torch.ones(6, dtype=torch.uint8),
            seq_id=seq_id,
        )
    )
    micro = micro_batches(prep, None, seq_id, seq_is_raw=False, where="step")
    policies = [get_policy("grpo"), get_policy("reinforce")]
    weights = [policy.weights(prep) for policy in policies]
    summed: list[str] = []

    def counting(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        summed.extend(p.name for p, w in zip(policies, weights, strict=True) if keep is w.discarded)
        return keep_times(keep, value)

    monkeypatch.setattr(metrics, "keep_times", counting)
    row = step_metrics(prep, policies, weights, StepGeometry("coef"), 0, micro)
    at = columns.device_metrics().index("discarded_mass")
    discarded = columns.device_metrics().index("discarded")
    assert row[:, discarded].tolist() == [2.0, 0.0]
    # grpo discards the tokens with r = e (A > 0) and r = 1/e (A < 0): |r A| / (2 * 3) each
    expected = (torch.tensor(1.0).exp() + torch.tensor(-1.0).exp()).double() / 6.0
    assert row[0, at].item() == pytest.approx(expected.item(), rel=1e-6)
    assert row[1, at].item() == 0.0
    assert summed == ["grpo"]
