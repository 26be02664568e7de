"""A replay's discarded mass and per-sign counts: a policy that discards (or clips) no token
of a step has the mass and the counts on each side of A 0 there without a pass over the step
(on the CPU, where its count is known), and one that discards some has them as before."""

from __future__ import annotations

import pytest
import torch

from stabledrl_cli import get_policy
from stabledrl_cli.policies import PolicyBatch, PreparedBatch, prepare
from stabledrl_cli.policies._masked import counts, keep_times
from stabledrl_cli.replay import columns, metrics
from stabledrl_cli.replay.framework import micro_batches
from stabledrl_cli.replay.metrics import step_metrics
from stabledrl_cli.replay.step_geometry import StepGeometry

SEQ_ID = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)


def _step() -> PreparedBatch:
    """grpo discards the token with r = e (A > 0) and the one with r = 1/e (A < 0)."""
    return prepare(
        PolicyBatch(
            logp=torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0, 0.0]),
            logp_old=torch.zeros(6),
            advantages=torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0]),
            mask=torch.ones(6, dtype=torch.uint8),
            seq_id=SEQ_ID,
        )
    )


def test_only_a_policy_that_discards_takes_a_pass_for_its_discarded_mass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prep = _step()
    micro = micro_batches(prep, None, SEQ_ID, seq_is_raw=False, where="step")
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


def test_only_nonempty_sets_are_counted_on_each_side_of_a(monkeypatch: pytest.MonkeyPatch) -> None:
    prep = _step()
    micro = micro_batches(prep, None, SEQ_ID, seq_is_raw=False, where="step")
    policies = [get_policy("grpo"), get_policy("reinforce")]
    weights = [policy.weights(prep) for policy in policies]
    counted: list[int] = []

    def counting(flags: list[torch.Tensor]) -> torch.Tensor:
        counted.append(len(flags))
        return counts(flags)

    monkeypatch.setattr(metrics, "counts", counting)
    row = step_metrics(prep, policies, weights, StepGeometry("coef"), 0, micro)
    names = columns.device_metrics()
    assert row[:, names.index("discarded_pos")].tolist() == [1.0, 0.0]
    assert row[:, names.index("discarded_neg")].tolist() == [1.0, 0.0]
    assert row[:, names.index("clipped_pos")].tolist() == [0.0, 0.0]
    assert row[:, names.index("clipped_neg")].tolist() == [0.0, 0.0]
    # both policies' discarded and clipped sets, then grpo's discarded set on each side
    assert counted == [2, 2, 1, 1]
