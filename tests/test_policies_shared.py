"""A replay evaluates every policy on one prepared step, which shares its normalizers,
references and masks between them: each policy's weights must equal those it gets alone, and
the CPU's product-and-finite-sum shortcuts must equal the `torch.where` they stand in for."""

from __future__ import annotations

import math

import pytest
import torch

from stabledrl_cli.policies import STANDARD_CATALOGUE, PolicyBatch, get_policy, prepare
from stabledrl_cli.policies._masked import (
    above,
    below,
    count_nonfinite,
    keep_times,
    masked_sum,
    ratio_times,
)

SPECS = [
    *STANDARD_CATALOGUE,
    "grpo:tis=token-truncate",
    "dapo:tis=token-mask",
    "gspo:tis=sequence-mask",
    "grpo:beta=0.1",
    "grpo:beta=0.1,kl_is=token",
    "gspo:beta=0.1,kl_is=sequence",
    "vespo",
    "gspo:agg=seq-mean-token-sum,rows=all",
]


def batch(seed: int, *, loss_weight: bool = False) -> PolicyBatch:
    gen = torch.Generator().manual_seed(seed)
    logp_old = -2.0 + 0.5 * torch.randn(6, 12, generator=gen)
    logp = logp_old + 0.4 * torch.randn(6, 12, generator=gen)
    mask = (torch.rand(6, 12, generator=gen) > 0.2).float()
    return PolicyBatch(
        logp=logp,
        logp_old=logp_old,
        advantages=torch.randn(6, generator=gen).repeat_interleave(12).reshape(6, 12),
        mask=mask,
        group_id=torch.tensor([0, 0, 0, 1, 1, 1]),
        reward=torch.rand(6, generator=gen),
        logp_ref=logp_old + 0.1 * torch.randn(6, 12, generator=gen),
        logp_rollout=logp_old + 0.2 * torch.randn(6, 12, generator=gen),
        loss_weight=torch.rand(6, 12, generator=gen) if loss_weight else None,
    )


@pytest.mark.parametrize("loss_weight", [False, True])
def test_policies_sharing_a_prepared_step_equal_each_alone(loss_weight):
    data = batch(3, loss_weight=loss_weight)
    shared = prepare(data)
    together = [get_policy(spec).weights(shared) for spec in SPECS]
    for spec, got in zip(SPECS, together, strict=True):
        alone = get_policy(spec).weights(prepare(data))
        for name in ("coef", "discarded", "clipped", "objective", "norm", "nonfinite"):
            assert torch.equal(getattr(got, name), getattr(alone, name)), (spec, name)


def test_shortcuts_equal_where_and_fall_back_on_non_finite_values():
    keep = torch.tensor([True, False, True, False])
    finite = torch.tensor([1.5, -2.0, 3.0, 4.0])
    assert torch.equal(keep_times(keep, finite), torch.tensor([1.5, 0.0, 3.0, 0.0]))
    assert masked_sum(keep, finite).item() == 4.5
    # inf off `keep`: the product would be NaN; the where keeps an exact 0.
    wild = torch.tensor([1.5, math.inf, 3.0, math.nan])
    assert torch.equal(keep_times(keep, wild), torch.tensor([1.5, 0.0, 3.0, 0.0]))
    assert masked_sum(keep, wild).item() == 4.5
    ratio = torch.tensor([math.inf, 2.0, 1.0])
    adv = torch.tensor([0.0, 1.0, -1.0])
    assert torch.equal(ratio_times(ratio, adv), torch.tensor([0.0, 2.0, -1.0]))
    mask = torch.tensor([True, True, False])
    assert count_nonfinite(torch.tensor([1.0, 2.0, 0.0]), mask).item() == 0
    assert count_nonfinite(torch.tensor([math.nan, math.inf, 0.0]), mask).item() == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_comparisons_equal_torchs_own(dtype):
    values = torch.tensor(
        [1.2, 0.8, 1.0 + 0.2, math.nextafter(1.2, 2.0), math.nan, math.inf, -math.inf, 0.0, -0.0],
        dtype=dtype,
    )
    strided = torch.stack([values, -values], dim=1)[:, 1]  # not contiguous
    for tensor in (values, strided):
        for bound in (1.2, 0.8, 1.0 + 0.2, 0.0, -0.0, math.inf, -math.inf, 1e-45):
            assert torch.equal(above(tensor, bound), tensor > bound), (tensor, bound)
            assert torch.equal(below(tensor, bound), tensor < bound), (tensor, bound)


def test_nonfinite_inputs_are_known_without_a_pass_when_every_sum_is_finite():
    data = batch(4)
    assert prepare(data).nonfinite_inputs() is None
    logp = torch.as_tensor(data.logp).clone()
    logp[0, 0] = math.nan
    mask = torch.as_tensor(data.mask).clone()
    mask[0, 0] = 1.0
    broken = prepare(PolicyBatch(logp=logp, logp_old=data.logp_old, advantages=data.advantages,
                                 mask=mask))  # fmt: skip
    unsafe = broken.nonfinite_inputs()
    assert unsafe is not None and unsafe.sum().item() == 1 and bool(unsafe[0])
    # A NaN on an unscored token is padding: nothing unsafe, coefficients finite.
    mask[0, 0] = 0.0
    padded = prepare(PolicyBatch(logp=logp, logp_old=data.logp_old, advantages=data.advantages,
                                 mask=mask))  # fmt: skip
    assert padded.nonfinite_inputs() is None
    assert get_policy("grpo").weights(padded).nonfinite.item() == 0
