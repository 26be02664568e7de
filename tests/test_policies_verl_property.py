"""Property test of the catalogue's verl policies against verl 0.9.1's own registered loss
functions (`core_algos.get_policy_loss_fn`): on random shapes, masks (a row without a scored
token among them), advantages of both signs and 0 and log ratios near 0 and far out, the
policy's objective is minus verl's loss of one micro-batch (token-mean) and its coef minus
verl's autograd gradient on every scored token.

- gmpo (`geo_mean`), kl-cov (`kl_cov`), clip-cov (`clip_cov` with ratio 1: every candidate is
  drawn, so verl's random draw has one outcome), dppo (`dppo_tv`, `dppo_kl`), and the mapped
  policies of `vanilla`, `gspo`, `sapo`, `cispo` and `gpg`; verl gets a bool response mask,
  as its `ppo_loss` hands it over;
- gppo, which verl has not: its objective is verl's vanilla loss with the dual clip off
  (`clip_ratio_c=inf`), and its coef equals minus verl's gradient wherever the clip does not
  bind (where it binds, gppo keeps a bounded gradient and verl none).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from test_policies_newer import verl_loss_and_grad

from stabledrl_cli import PolicyBatch, get_policy

F64 = torch.float64

CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (verl loss_mode, ActorConfig overrides, PolicyLossConfig overrides, our spec)
    ("geo_mean", {"clip_ratio_low": 0.4, "clip_ratio_high": 0.4}, {}, "gmpo"),
    (
        "geo_mean",
        {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3},
        {},
        "gmpo:eps_low=0.1,eps_high=0.3",
    ),
    ("kl_cov", {}, {"kl_cov_ratio": 0.2}, "kl-cov:ratio=0.2"),
    ("kl_cov", {}, {"kl_cov_ratio": 0.05, "ppo_kl_coef": 1.0}, "kl-cov:ratio=0.05,kl_coef=1"),
    ("clip_cov", {}, {"clip_cov_ratio": 1.0, "clip_cov_lb": 0.0}, "clip-cov:ratio=1,lb=0"),
    (
        "clip_cov",
        {"clip_ratio_high": 0.28},
        {"clip_cov_ratio": 1.0, "clip_cov_lb": -0.5, "clip_cov_ub": 0.2},
        "clip-cov:ratio=1,lb=-0.5,ub=0.2,eps_high=0.28",
    ),
    ("dppo_tv", {"clip_ratio_c": 2.0}, {}, "dppo:c=2"),
    ("vanilla", {"clip_ratio_c": 1.5}, {}, "dual-clip:c=1.5"),
    ("vanilla", {"clip_ratio_high": 0.28}, {}, "dual-clip:eps_high=0.28"),
    ("gspo", {}, {}, "gspo:form=token,log_ratio_max=10,agg=token-mean,eps_low=0.2,eps_high=0.2"),
    ("sapo", {}, {}, "sapo"),
    ("cispo", {"clip_ratio_high": 0.28}, {}, "cispo:eps_low=0.2,eps_high=0.28"),
    ("gpg", {}, {}, "gpg"),
    ("dppo_kl", {"clip_ratio_low": 0.05}, {}, "dppo:divergence=kl,delta_low=0.05,delta_high=0.2"),
]


@st.composite
def batches(draw: Any) -> dict[str, torch.Tensor]:
    """[B, L] float64: log-probs of every size (at most 0), log ratios near 0, up to +-3 and
    exactly 0, per-row advantages of both signs and 0, a ragged mask (some rows unscored)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b, length = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    kind = rng.integers(0, 3, (b, length))
    log_ratio = np.select(
        [kind == 0, kind == 1],
        [rng.normal(0, 0.2, kind.shape), rng.uniform(-3, 3, kind.shape)],
        0.0,
    )
    logp_old = np.log(rng.uniform(1e-3, 1.0, (b, length)))
    logp = np.minimum(logp_old + log_ratio, 0.0)  # a probability: at most 1
    mask = rng.random((b, length)) < draw(st.sampled_from([0.5, 0.8, 1.0]))
    mask[0, 0] = True  # verl's token-mean of no scored token divides 0 by 0
    adv = rng.choice([0.0, 1.0, -1.0], b) * rng.uniform(0.1, 3.0, b)
    return {
        "logp": torch.tensor(logp, dtype=F64),
        "logp_old": torch.tensor(logp_old, dtype=F64),
        "adv": torch.tensor(adv, dtype=F64)[:, None].expand(b, length).clone(),
        "mask": torch.tensor(mask, dtype=F64),
    }


def verl_loss(
    mode: str, actor: dict[str, Any], loss: dict[str, Any], data: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's registered loss of `data` as one micro-batch (token-mean over its own scored
    tokens) and its gradient w.r.t. the log-probs; the mask a bool one, as `ppo_loss` hands
    it over (so a length |y| + 1e-8 is a float32 |y|)."""
    value, grad, _ = verl_loss_and_grad(mode, actor, loss, {**data, "mask": data["mask"] > 0})
    return value, grad


def ours(spec: str, data: dict[str, torch.Tensor]) -> Any:
    batch = PolicyBatch(
        logp=data["logp"], logp_old=data["logp_old"], advantages=data["adv"], mask=data["mask"]
    )
    return get_policy(spec).weights(batch)


EQUAL_ADVANTAGES = {  # verl's masked_mean leaves A - mean A = 1.2e-8 > 0: cov > lb = 0
    "logp": torch.tensor([[-0.0912, -0.4992]], dtype=F64),
    "logp_old": torch.tensor([[-0.0912, -2.3788]], dtype=F64),
    "adv": torch.tensor([[2.466, 2.466]], dtype=F64),
    "mask": torch.ones(1, 2, dtype=F64),
}


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batches())
@example(EQUAL_ADVANTAGES)
def test_verl_policies_equal_verls_registered_loss_functions(data: dict[str, torch.Tensor]) -> None:
    scored = data["mask"].reshape(-1) > 0
    for mode, actor, loss, spec in CASES:
        value, grad = verl_loss(mode, actor, loss, data)
        weights = ours(spec, data)
        # gmpo divides twice by |y_i| + 1e-8, verl by a float32 |y_i|: each row's term a
        # relative 2e-8 / |y_i| apart (docs/policies.md), the rows' mean a little more
        rtol, atol = (1e-7, 1e-8) if mode == "geo_mean" else (1e-9, 1e-12)
        msg = functools.partial("{}: {}".format, spec)
        assert_close(weights.objective, -value, rtol=rtol, atol=atol, msg=msg)
        coef = weights.coef[scored]
        assert_close(coef, -grad.reshape(-1)[scored], rtol=rtol, atol=atol, msg=msg)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(batches(), st.sampled_from([(0.2, 0.2), (0.1, 0.28)]))
def test_gppo_is_verls_vanilla_loss_without_the_dual_clip(
    data: dict[str, torch.Tensor], eps: tuple[float, float]
) -> None:
    low, high = eps
    actor = {"clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio_c": math.inf}
    value, grad = verl_loss("vanilla", actor, {}, data)
    weights = ours(f"gppo:eps_low={low},eps_high={high}", data)
    assert_close(weights.objective, -value, rtol=1e-9, atol=1e-12)
    unclipped = (data["mask"].reshape(-1) > 0) & ~weights.clipped
    assert_close(weights.coef[unclipped], -grad.reshape(-1)[unclipped], rtol=1e-9, atol=1e-12)
    # where the clip binds verl's gradient is 0 and gppo's is not (A != 0 there)
    assert torch.all(grad.reshape(-1)[weights.clipped] == 0)
