"""The replay's references of one step's advantages share what does not depend on the
normalizer: two aggregations' references use the same counted tokens and r A w, computed
once, and each still holds its own A w / norm and r A w / norm."""

from __future__ import annotations

import torch

from stabledrl_cli.policies import PolicyBatch, prepare
from stabledrl_cli.replay.metrics import References


def test_references_of_one_advantages_share_their_counted_tokens() -> None:
    prep = prepare(
        PolicyBatch(
            logp=torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5, 0.0]),
            logp_old=torch.zeros(6),
            advantages=torch.tensor([1.0, -1.0, 0.0, 2.0, 1.0, 1.0]),
            mask=torch.tensor([1, 1, 1, 1, 1, 0]),
            loss_weight=torch.tensor([1.0, 0.5, 1.0, 0.0, 2.0, 1.0]),
        )
    )
    adv = prep.advantages()
    token_mean, seq_mean = torch.full((6,), 5.0), torch.full((6,), 2.0)
    first, second = References(prep, adv, token_mean), References(prep, adv, seq_mean)
    assert first.counted is second.counted
    assert first.counted.tolist() == [True, True, False, False, True, False]
    assert int(first.n_counted) == int(second.n_counted) == 3
    weighted = torch.tensor([1.0, -0.5, 0.0, 0.0, 2.0, 0.0])
    assert torch.equal(first.reinforce, weighted / 5.0)
    assert torch.equal(second.reinforce, weighted / 2.0)
    ratio = torch.exp(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5, 0.0]))
    scored_ratio_weighted = ratio * torch.tensor([1.0, -0.5, 0.0, 0.0, 2.0, 0.0])
    assert torch.allclose(second.coef_is, scored_ratio_weighted / 2.0)
