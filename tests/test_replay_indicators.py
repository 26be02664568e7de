"""The per-step indicators computed for every policy of a step at once (replay/metrics.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from stabledrl_cli import get_policy
from stabledrl_cli.policies import PolicyBatch, prepare
from stabledrl_cli.replay.metrics import References, _weight_indicators, policy_gradient_coef

NAN = math.nan


def _refs(advantages: list[float]) -> References:
    prep = prepare(
        PolicyBatch(
            logp=torch.zeros(6),
            logp_old=torch.zeros(6),
            advantages=torch.tensor(advantages),
            mask=torch.tensor([1, 1, 1, 1, 1, 0]),
        )
    )
    return References(prep, prep.advantages(), torch.ones(6))


def _expected(w: torch.Tensor, refs: References) -> float:
    """The max over the counted tokens, NaN with a NaN weight there or no counted token."""
    kept = w[refs.counted]
    if kept.numel() == 0 or bool(torch.isnan(kept).any()):
        return NAN
    return float(kept.max())


def test_weight_max_per_policy_whatever_the_others_hold():
    adv = [1.0, -1.0, 0.0, 2.0, 0.5, 1.0]  # tokens 2 (A = 0) and 5 (unscored) are not counted
    counted, nothing = _refs(adv), _refs([0.0] * 6)
    cases = [
        (torch.tensor([1.0, 2.0, 7.0, 3.0, 0.5, 9.0]), counted),  # positive max
        (torch.tensor([-1.0, -2.0, 7.0, -0.5, -3.0, 9.0]), counted),  # negative: not the 0s
        (torch.tensor([1.0, NAN, 0.0, 3.0, 0.5, 0.0]), counted),  # a NaN weight
        (torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5, NAN]), counted),  # NaN on an unscored token
        (torch.tensor([2.0] * 6), nothing),  # no counted token
        (torch.tensor([math.inf, 1.0, 0.0, 1.0, 1.0, 0.0]), counted),  # an inf weight
    ]
    for order in (cases, cases[::-1], cases[:1], cases[1:2], cases[2:3], cases[4:5]):
        # pg = w A on the counted tokens: the weights w = pg / (A w / norm) with norm 1.
        pgs = [w * torch.tensor(adv) for w, _ in order]
        refs = [r for _, r in order]
        got, _, _ = _weight_indicators(pgs, refs)
        assert got.dtype == torch.float64 and got.shape == (len(order),)
        want = torch.tensor([_expected(w, r) for w, r in order], dtype=torch.float64)
        assert torch.equal(got.isnan(), want.isnan()), (got, want)
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), (got, want)


@pytest.mark.parametrize(
    ("spec", "without_kl"),
    [
        ("grpo:beta=0.1", "grpo"),
        ("grpo:beta=0.1,kl_is=token", "grpo"),
        ("vespo:beta=0.3,kl_is=token", "vespo"),
        ("gspo:beta=0.1,kl_is=sequence", "gspo"),
        ("grpo:beta=0.1,kl_is=sequence", "grpo"),
        ("cispo:beta=0.2,kl_is=token,agg=seq-mean-token-mean", "cispo:agg=seq-mean-token-mean"),
        ("dapo:beta=0.1,kl_weight=none", "dapo"),
    ],
)
def test_the_indicators_take_out_the_kl_term_the_policy_added(spec: str, without_kl: str):
    """The indicators measure the policy-gradient term: with the KL term (k3, or r k3 or s_i k3
    with kl_is=token or sequence) taken out, coef is the same policy's coef without beta."""
    gen = torch.Generator().manual_seed(11)
    logp_old = -2.0 + 0.5 * torch.randn(5, 9, generator=gen, dtype=torch.float64)
    logp = logp_old + 0.5 * torch.randn(5, 9, generator=gen, dtype=torch.float64)
    prep = prepare(
        PolicyBatch(
            logp=logp,
            logp_old=logp_old,
            advantages=torch.randn(5, generator=gen, dtype=torch.float64),
            mask=(torch.rand(5, 9, generator=gen) > 0.2).double(),
            logp_ref=logp + 0.3 * torch.randn(5, 9, generator=gen, dtype=torch.float64),
            loss_weight=torch.rand(5, 9, generator=gen, dtype=torch.float64),
        )
    )
    policy = get_policy(spec)
    weights = policy.weights(prep)
    plain = get_policy(without_kl).weights(prep).coef
    assert not torch.allclose(weights.coef, plain)
    assert_close(policy_gradient_coef(policy, weights, prep), plain, rtol=1e-12, atol=1e-15)
