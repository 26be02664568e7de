"""Property test: random shapes, log-ratios up to +-50, NaN and inf sprinkled in.

No policy raises on such data; shapes, dtype and device are right; a NaN or inf input shows up
as a non-finite coef on its token and in the `nonfinite` count; and for beta = 0, on tokens with
finite inputs and coefficients, `discarded` is exactly "coef == 0 with mask = 1 and A != 0"
(except where float underflow can zero a coefficient: SAPO's gate once tau |r - 1| > 30).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.policies import STANDARD_CATALOGUE, prepare

SPECS = [
    *STANDARD_CATALOGUE,
    "ppo",
    "dual-clip:c=1.5",
    "cispo:eps_low=0.2,eps_high=0.28",
    "stabledrl:level=token",
    "stabledrl:norm=batch",
    "grpo:agg=seq-mean-token-sum",
    "is:agg=constant,max_len=4",
    "ppo:agg=token-sum",
    "ppo:agg=micro-token-mean",
    "dual-clip:agg=seq-mean-token-sum-norm",
    "grpo:rows=all",
    "gspo:rows=all",
    "stabledrl:rows=all",
]


@st.composite
def batches(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    two_d = draw(st.booleans())
    b, length = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    n_tokens = b * length
    kind = rng.integers(0, 4, n_tokens)
    log_ratio = np.select(
        [kind == 0, kind == 1, kind == 2],
        [rng.uniform(-50, 50, n_tokens), rng.choice([-50.0, 50.0], n_tokens), 0.0],
        rng.normal(0, 0.2, n_tokens),
    )
    logp = -rng.uniform(0, 20, n_tokens)
    logp_old = logp - log_ratio
    bad_frac = draw(st.sampled_from([0.0, 0.1, 0.3]))
    bad = rng.random(n_tokens) < bad_frac
    bad_values = rng.choice([np.nan, np.inf, -np.inf], n_tokens)
    which = rng.integers(0, 2, n_tokens)
    logp = np.where(bad & (which == 0), bad_values, logp)
    logp_old = np.where(bad & (which == 1), bad_values, logp_old)
    mask = (rng.random(n_tokens) < 0.75).astype(np.uint8)
    seq = np.repeat(np.arange(b), length) if two_d else np.sort(rng.integers(0, b, n_tokens))
    adv_seq = rng.choice([0.0, 1.0, -1.0], b) * rng.uniform(1e-3, 10, b)
    group = rng.integers(0, max(1, b // 2), b)
    arrays = {
        "logp": logp.astype(dtype),
        "logp_old": logp_old.astype(dtype),
        "advantages": adv_seq[seq].astype(dtype),
        "mask": mask,
    }
    if two_d:
        arrays = {k: v.reshape(b, length) for k, v in arrays.items()}
        extra = {}
    else:
        extra = {"seq_id": seq}
    batch = PolicyBatch(**arrays, group_id=group, **extra)
    return batch, bad


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batches())
def test_policies_on_extreme_and_nonfinite_inputs(case):
    batch, bad = case
    prep = prepare(batch)
    n_tokens = prep.num_tokens
    dtype = torch.as_tensor(batch.logp).dtype
    mask = prep.mask
    adv = prep.advantages("recorded")
    bad = torch.as_tensor(bad)
    eligible = mask & (adv != 0)
    ratio = prep.ratio
    for spec in SPECS:
        policy = get_policy(spec)
        w = policy.weights(prep)
        for arr in (w.coef, w.discarded, w.clipped, w.norm, w.advantages):
            assert arr.shape == (n_tokens,)
        assert w.coef.dtype == dtype and w.objective.shape == ()
        assert w.discarded.dtype == torch.bool and w.clipped.dtype == torch.bool
        assert torch.all(w.coef[~mask] == 0)
        # Non-finite inputs propagate to their token's coef and are counted.
        assert torch.all(~torch.isfinite(w.coef[bad & mask]))
        assert int(w.nonfinite) == int((mask & ~torch.isfinite(w.coef)).sum())
        assert int(w.nonfinite) >= int((bad & mask).sum())
        assert not (w.discarded & ~eligible).any() and not (w.clipped & ~eligible).any()
        assert not (w.discarded & w.clipped).any()
        if policy.family in ("sequence-clip", "self-normalized"):
            # A bad token moves its sequence's (GSPO) or group's (StableDRL) weight: an -inf
            # log-ratio gives the sequence weight 0, by the math, on finite sibling tokens too.
            bad_groups = torch.zeros(prep.n_groups_total, dtype=torch.bool)
            bad_groups[prep.seq_group[prep.seq[bad & mask]]] = True
            tainted = bad_groups[prep.seq_group[prep.seq]]
        else:
            tainted = bad
        finite = ~tainted & torch.isfinite(w.coef)
        zero = (w.coef == 0) & eligible & finite
        if policy.name == "sapo":
            tau = torch.where(adv > 0, 1.0, 1.05)
            zero &= tau * (ratio - 1).abs() <= 30
        assert torch.equal(w.discarded & finite, zero), spec


def test_nan_inputs_are_counted_not_raised():
    logp = torch.tensor([0.0, float("nan"), -1.0, float("inf")])
    batch = PolicyBatch(logp=logp, logp_old=torch.zeros(4), advantages=torch.ones(4))
    for spec in SPECS:
        w = get_policy(spec).weights(batch)
        assert torch.isnan(w.coef[1]) and not torch.isfinite(w.coef[3])
        assert int(w.nonfinite) >= 2
