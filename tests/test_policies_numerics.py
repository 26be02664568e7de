"""Numerics: every policy's coefficient is finite wherever its mathematical value is.

Over log r in [-1e4, 1e4], in float32 and float64, with finite inputs:
- no coefficient is ever NaN (no 0 * inf: sapo's 4 s (1 - s) r A is computed in log space, a
  zero indicator never multiplies an overflowed ratio);
- a coefficient is infinite only on a policy's unbounded branch (`is` and kl-cov; ppo/grpo/
  dapo, gppo and clip-cov with A < 0 on the unclipped branch; gspo's and gmpo's kept sequences
  with A < 0) and only where |r A| exceeds the dtype's largest number (docs/policies.md,
  Numerics, which names the same policies).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.policies import REGISTRY, STANDARD_CATALOGUE, prepare

SPECS = [
    *STANDARD_CATALOGUE,
    *(name for name in REGISTRY if name != "two-sided"),
    "ppo",
    "dual-clip:c=1.5",
    "cispo:eps_low=0.2,eps_high=0.28",
    "sapo:agg=token-mean",
    "stabledrl:level=token",
    "stabledrl:norm=batch",
    "is:agg=constant,max_len=4",
    "ppo:agg=token-sum",
    "ppo:agg=micro-token-mean",
    "dual-clip:agg=seq-mean-token-sum-norm",
    "grpo:rows=all",
    "gspo:rows=all",
    "stabledrl:rows=all",
]

# Policies whose coefficient has an unbounded branch (r A with no bound on r).
UNBOUNDED = {"ppo", "grpo", "dapo", "is", "gspo", "gppo", "clip-cov", "kl-cov", "gmpo"}
EVERY_TOKEN = {"is", "kl-cov"}
"""Their unbounded branch is every token with A != 0 (no clip)."""


def unbounded_branch(name: str, w, prep) -> torch.Tensor:
    """[T] bool: tokens on the policy's unbounded branch (their coefficient is r A / norm)."""
    adv = w.advantages
    if name in EVERY_TOKEN:
        return adv != 0
    if name in UNBOUNDED:
        return (adv < 0) & ~w.discarded
    return torch.zeros_like(adv, dtype=torch.bool)


def log_ratio_of(name: str, prep, adv: torch.Tensor) -> torch.Tensor:
    """[T] the log ratio a policy's coefficient is r A of: the token's, gspo's sequence mean,
    or gmpo's sequence mean of the log ratios clipped on the side A exploits (default eps)."""
    if name == "gspo":
        return prep.seq_mean_log_ratio[prep.seq]
    if name == "gmpo":
        x = prep.log_ratio
        clipped = torch.where(adv < 0, torch.maximum(x, x.clamp(-0.4, 0.4)), x.clamp(max=0.4))
        return (prep.seq_sum(clipped) / prep.seq_len.clamp(min=1.0))[prep.seq]
    return prep.log_ratio


def test_the_docs_name_every_policy_with_an_unbounded_branch():
    text = " ".join((Path(__file__).parents[1] / "docs" / "policies.md").read_text().split())
    sentence = re.search(r"A coefficient is infinite only on a policy's.*?Every other policy", text)
    assert sentence is not None
    named = set(re.findall(r"`([a-z-]+)`", sentence.group(0))) & set(REGISTRY)
    assert named == UNBOUNDED


@st.composite
def extreme_batches(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_seq = draw(st.integers(1, 6))
    lengths = rng.integers(1, 5, n_seq)
    seq = np.repeat(np.arange(n_seq), lengths)
    n = int(lengths.sum())
    kind = rng.integers(0, 4, n)
    log_ratio = np.select(
        [kind == 0, kind == 1, kind == 2],
        [rng.uniform(-1e4, 1e4, n), rng.choice([-1e4, 1e4], n), rng.uniform(80, 720, n)],
        rng.normal(0, 0.3, n),
    )
    logp = -rng.uniform(0, 5, n)
    adv_seq = rng.choice([0.0, 1.0, -1.0], n_seq) * rng.uniform(1e-3, 10, n_seq)
    batch = PolicyBatch(
        logp=logp.astype(dtype),
        logp_old=(logp - log_ratio).astype(dtype),
        advantages=adv_seq[seq].astype(dtype),
        mask=(rng.random(n) < 0.85).astype(np.uint8),
        seq_id=seq,
        group_id=rng.integers(0, 2, n_seq),
    )
    return batch


@settings(max_examples=60, deadline=None, derandomize=True)
@given(extreme_batches())
def test_coefficients_are_finite_where_the_maths_is(batch):
    prep = prepare(batch)
    log_max = math.log(torch.finfo(prep.dtype).max)
    for spec in SPECS:
        policy = get_policy(spec)
        w = policy.weights(prep)
        assert not torch.isnan(w.coef).any(), spec
        inf = torch.isinf(w.coef)
        log_ratio = log_ratio_of(policy.name, prep, w.advantages)
        magnitude = log_ratio + torch.log(w.advantages.abs())  # log |r A|, before 1 / norm
        may_overflow = unbounded_branch(policy.name, w, prep) & prep.mask
        assert not (inf & ~may_overflow).any(), spec
        # On the unbounded branch: finite whenever the true value fits the dtype.
        assert not (inf & (magnitude < log_max - 1.0)).any(), spec
        assert torch.isfinite(w.coef[may_overflow & (magnitude < log_max - 1.0)]).all(), spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sapo_and_two_sided_past_the_float32_overflow(dtype):
    """log r = 100 overflows r in float32: sapo's coefficient is 0 there (its maths tends to
    0), two-sided's discarded A < 0 token is 0, not 0 * inf."""
    log_ratio = torch.tensor([100.0, 100.0, 1e4, -1e4], dtype=dtype)
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=dtype)
    batch = PolicyBatch(logp=log_ratio, logp_old=torch.zeros(4, dtype=dtype), advantages=adv)
    for spec in ("sapo", "two-sided:delta=4", "grpo:adv=recorded", "dapo"):
        w = get_policy(spec).weights(batch)
        assert torch.isfinite(w.coef[[0, 3]]).all(), spec
    sapo = get_policy("sapo").weights(batch)
    assert torch.equal(sapo.coef, torch.zeros(4, dtype=dtype))
    assert int(sapo.nonfinite) == 0
    two_sided = get_policy("two-sided:delta=4").weights(batch)
    assert torch.equal(two_sided.coef, torch.zeros(4, dtype=dtype))
    assert (
        two_sided.discarded.all()
    )  # A > 0 past 1 + eps_high, A < 0 past delta or below 1 - eps_low
    # grpo's A < 0 unclipped branch with r = inf: its maths is infinite there.
    grpo = get_policy("grpo").weights(batch)
    assert torch.isinf(grpo.coef[2]) and grpo.coef[0] == 0


def test_a_sequence_sum_of_log_r_past_float32_is_counted_nonfinite_not_hidden():
    """The Numerics paragraph's one exception, held to it: float32 log-probs of -3e38 overflow
    stabledrl's per-sequence sum of log r; a group whose every sum is -inf has NaN
    coefficients, each counted in `nonfinite`. At -1e4 the same batch is finite."""
    policy = get_policy("stabledrl")

    def batch(logp: float) -> PolicyBatch:
        return PolicyBatch(
            logp=torch.full((2, 4), logp),
            logp_old=torch.zeros(2, 4),
            advantages=torch.tensor([1.0, -1.0]),
            group_id=torch.tensor([0, 0]),
        )

    past = policy.weights(batch(-3e38))
    assert torch.isnan(past.coef).all() and int(past.nonfinite) == 8
    within = policy.weights(batch(-1e4))
    assert torch.isfinite(within.coef).all() and int(within.nonfinite) == 0
