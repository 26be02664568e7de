"""Each policy's coef and objective against torch.autograd of its surrogate objective.

The references below are written here, in the frameworks' own form (TRL `_compute_loss`, verl
`compute_policy_loss_*`, StableDRL's `compute_loss_spg`), with torch ops and Python loops over
groups; nothing of the package is imported for them. The package is only the thing under test.
Aggregation follows docs/policies.md: N counts sequences with at least one scored token (TRL's grpo
`.mean()` over rows would also count all-masked rows).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from stabledrl_cli import PolicyBatch, get_policy

F64 = torch.float64

# row layout: scored length, advantage, group. Covers: both signs and 0, single-token rows,
# an all-masked row alone in its group, a group of one, several groups.
ROWS = [
    (6, 1.0, 0),
    (1, -0.5, 0),
    (0, 0.7, 5),
    (6, -1.5, 1),
    (4, 0.0, 1),
    (5, 2.0, 2),
    (6, -0.8, 3),
    (2, 0.3, 3),
    (1, 1.1, 4),
    (6, -0.2, 4),
]
L = 7


def exact_log_ratio(a: float) -> float:
    """A log-ratio whose torch.exp is exactly a in float64 (a is then exactly on the bound).

    StableDRL clips in log space (log w vs log c): its bounds are given as ("log", c)."""
    if isinstance(a, tuple):
        return math.log(a[1])
    lr = math.log(a)
    for _ in range(8):
        if torch.exp(torch.tensor(lr, dtype=F64)).item() == a:
            return lr
        lr = math.nextafter(lr, math.inf if torch.exp(torch.tensor(lr, dtype=F64)) < a else -1)
    raise AssertionError(f"no float64 log-ratio gives exactly {a}")


def make_batch(seed: int, bounds: tuple[float, ...] = (), far: bool = True) -> dict:
    """[B, L] float64 arrays with random masks, log-ratios near 1, far out and at `bounds`."""
    gen = torch.Generator().manual_seed(seed)
    b = len(ROWS)
    mask = torch.zeros(b, L, dtype=F64)
    for i, (n, _, _) in enumerate(ROWS):
        mask[i, torch.randperm(L, generator=gen)[:n]] = 1.0
    logp = -torch.rand(b, L, generator=gen, dtype=F64) * 3.0
    log_ratio = torch.randn(b, L, generator=gen, dtype=F64) * 0.15
    if far:
        pick = torch.rand(b, L, generator=gen) < 0.3
        wide = (torch.rand(b, L, generator=gen, dtype=F64) - 0.5) * 12.0
        log_ratio = torch.where(pick, wide, log_ratio)
        log_ratio[6, :] = torch.where(mask[6] > 0, torch.tensor(50.0, dtype=F64), log_ratio[6])
        log_ratio[0, -1] = -50.0
    adv = torch.tensor([a for _, a, _ in ROWS], dtype=F64)
    # Inject exact bounds on scored tokens of rows with A > 0 (0, 5) and A < 0 (3, 9).
    for k, a in enumerate(bounds):
        lr = exact_log_ratio(a)
        for row in (0, 5, 3, 9):
            pos = torch.nonzero(mask[row]).flatten()
            j = pos[k % len(pos)]
            logp[row, j] = 0.0
            log_ratio[row, j] = lr
    logp_old = logp - log_ratio
    for row in (0, 5, 3, 9):
        for j in torch.nonzero(logp[row] == 0.0).flatten():
            logp_old[row, j] = -log_ratio[row, j]
    return {
        "logp": logp,
        "logp_old": logp_old,
        "adv": adv,
        "mask": mask,
        "group": torch.tensor([g for _, _, g in ROWS]),
        "logp_ref": logp + torch.randn(b, L, generator=gen, dtype=F64) * 0.3,
        "weight": torch.rand(b, L, generator=gen, dtype=F64)
        * (torch.rand(b, L, generator=gen) > 0.2),
        "loss_scale": 1.0 + torch.rand(b, L, generator=gen, dtype=F64) * 20.0,
        "reward": torch.rand(b, generator=gen, dtype=F64).round(decimals=1),
    }


# ---- the references ------------------------------------------------------------------------
MICRO = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
"""The micro-batch of each row (its three micro-batches hold 3, 3 and 4 rows)."""


def aggregate(term, mask, agg="token-mean", max_len=None, loss_scale=None, rows="scored"):
    """TRL / verl loss aggregation of a [B, L] per-token objective (docs/policies.md)."""
    n_seq = (mask.sum(-1) > 0).sum().clamp(min=1) if rows == "scored" else mask.shape[0]
    if agg == "token-mean":
        return (term * mask).sum() / mask.sum().clamp(min=1)
    if agg == "token-sum":
        return (term * mask).sum()
    if agg == "micro-token-mean":  # TRL bnpo: each micro-batch's token mean, / K
        parts = [aggregate(term[k == MICRO], mask[k == MICRO]) for k in MICRO.unique()]
        return sum(parts) / len(parts)
    if agg == "seq-mean-token-mean":
        return ((term * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return (term * mask).sum() / n_seq
    if agg == "seq-mean-token-sum-norm":  # verl: / global_batch_size / horizon of the micro-batch
        total = torch.zeros((), dtype=F64)
        for k in MICRO.unique():
            part = mask[k == MICRO]
            horizon = max_len if max_len is not None else part.sum(-1).max().clamp(min=1)
            total = total + (term[k == MICRO] * part).sum() / horizon
        return total / n_seq
    if agg == "constant":
        return (term * mask).sum() / (n_seq * max_len)
    if agg == "recorded":
        return (term * mask / loss_scale).sum()
    raise AssertionError(agg)


def ref_ppo(r, adv, eps_low=0.2, eps_high=0.2, **_):
    return torch.min(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv)


def ref_dual_clip(r, adv, eps_low=0.2, eps_high=0.2, c=3.0, **_):
    # verl: ratio = exp(clamp(log r, -20, 20)); pg_losses3 = -A c;
    # clip_pg_losses2 = min(pg_losses3, clip_pg_losses1) for A < 0.
    r = torch.exp(torch.clamp(torch.log(r), min=-20.0, max=20.0))
    loss1 = -torch.min(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv)
    loss = torch.where(adv < 0, torch.min(-adv * c, loss1), loss1)
    return -loss


def ref_two_sided(r, adv, eps_low=0.2, eps_high=0.2, delta=4.0, **_):
    coef_2 = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    coef_1 = torch.clamp(r, max=delta)
    return torch.min(coef_1 * adv, coef_2 * adv)


def ref_cispo(r, adv, logp, cap=None, eps_low=None, eps_high=None, **_):
    if eps_low is None:
        w = torch.clamp(r, max=cap if cap is not None else 5.0)
    else:
        w = torch.clamp(r, 1 - eps_low, 1 + eps_high)
    return w.detach() * adv * logp


def ref_sapo(r, adv, tau_pos=1.0, tau_neg=1.05, **_):
    tau = torch.where(adv > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))
    return torch.sigmoid(tau * (r - 1)) * 4 / tau * adv


def ref_is(r, adv, **_):
    return r * adv


def ref_reinforce(r, adv, logp, **_):
    return adv * logp


TOKEN_REFS = {
    "ppo": ref_ppo,
    "dual-clip": ref_dual_clip,
    "two-sided": ref_two_sided,
    "cispo": ref_cispo,
    "sapo": ref_sapo,
    "is": ref_is,
    "reinforce": ref_reinforce,
}


def ref_gspo(
    logp, logp_old, adv, mask, eps_low=3e-4, eps_high=4e-4, log_ratio_max=None, delta=None, **_
):
    # TRL: log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1);
    # coef_1 = torch.clamp(coef_1, max=delta) after coef_2 is taken;
    # log_ratio_max: verl's clamp of it (its max=10)
    log_ratio = logp - logp_old
    log_s = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    if log_ratio_max is not None:
        log_s = log_s.clamp(max=log_ratio_max)
    s = torch.exp(log_s)
    capped = s if delta is None else torch.clamp(s, max=delta)
    term = torch.min(capped * adv, torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv)
    return term


def ref_gspo_token(logp, logp_old, adv, mask, eps_low=3e-4, eps_high=4e-4, log_ratio_max=None, **_):
    """verl `compute_policy_loss_gspo`: s_i,t = sg(s_i) pi_t / sg(pi_t), in log space, log s
    clamped at log_ratio_max (verl's 10; none: unclamped)."""
    seq_lengths = torch.sum(mask, dim=-1).clamp(min=1)
    kl_seq = torch.sum((logp - logp_old) * mask, dim=-1) / seq_lengths
    log_s = logp - logp.detach() + kl_seq.detach().unsqueeze(-1)
    if log_ratio_max is not None:
        log_s = torch.clamp(log_s, max=log_ratio_max)
    s = torch.exp(log_s)
    return -torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - eps_low, 1 + eps_high))


def ref_vespo(logp, logp_old, adv, mask, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0):
    """TRL `get_gamma_weights` (detached phi of the clamped sequence sum of log r), times A logp."""
    lower_clamp = math.log(1e-8)
    log_ratio_clamped = torch.clamp(logp - logp_old, -20.0, 20.0)
    seq_log_ratio = torch.sum(log_ratio_clamped * mask, dim=-1, keepdim=True)
    log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
    w_seq = torch.exp(log_w_seq)
    is_nonneg_adv = adv >= 0
    # TRL passes Python floats (torch.where then builds float32 tensors); float64 here.
    k_seq = torch.where(is_nonneg_adv, torch.tensor(k_pos, dtype=F64), k_neg)
    lambda_seq = torch.where(is_nonneg_adv, torch.tensor(lambda_pos, dtype=F64), lambda_neg)
    lambda_seq = lambda_seq.clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
    phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return phi_seq.detach() * adv * logp


def ref_stabledrl(
    logp,
    logp_old,
    adv,
    mask,
    group,
    weight,
    c=5.0,
    level="seq",
    norm="group",
    rows="scored",
    micro=None,
):
    """compute_loss_spg with use_snis: detached clipped log-weights, softmax per group
    (rows=all: a row without scored tokens has log w = 0, as in the public code); norm=micro:
    one compute_loss_spg a micro-batch `micro` (a round), the rounds' losses averaged."""
    segments = {"group": group, "micro": micro}.get(norm, torch.zeros_like(group))
    n_groups = 0
    total = torch.zeros((), dtype=F64)
    for g in segments.unique().tolist():
        scored = mask.sum(-1) > 0
        members = (segments == g) & (scored | torch.tensor(rows == "all"))
        idx = torch.nonzero(members).flatten()
        if len(idx) == 0:
            continue
        n_groups += 1
        m = mask[idx]
        if level == "seq":
            length = m.sum(-1).clamp(min=1)
            log_w = (((logp - logp_old)[idx] * m).sum(-1) / length).clamp(max=math.log(c))
            w = torch.softmax(log_w.detach(), dim=0)
            elbo = (weight[idx] * adv[idx] * logp[idx] * m).sum(-1) / length
            total = total + (w * elbo).sum()
        else:
            sel = m > 0
            log_w = (logp - logp_old)[idx][sel].clamp(max=math.log(c))
            w = torch.softmax(log_w.detach(), dim=0)
            total = total + (w * (weight[idx] * adv[idx] * logp[idx])[sel]).sum()
    return total / (max(n_groups, 1) if norm in ("group", "micro") else 1)


def kl_k3(logp, logp_ref):
    return torch.exp(logp_ref - logp) - (logp_ref - logp) - 1


# ---- the harness -----------------------------------------------------------------------------
def reference_objective(name, params, data, logp, adv_tokens, weight):
    """J of the policy `name` with `params` over [B, L] data, differentiable in logp."""
    mask, logp_old = data["mask"], data["logp_old"]
    r = torch.exp(logp - logp_old)
    agg = params.get("agg", "token-mean")
    agg_kw = {
        "agg": agg,
        "max_len": params.get("max_len"),
        "loss_scale": data["loss_scale"],
        "rows": params.get("rows", "scored"),
    }
    if name == "gspo":
        agg_kw = {"agg": params.get("agg", "seq-mean-token-mean"), "rows": agg_kw["rows"]}
        term = ref_gspo(logp, logp_old, adv_tokens, mask, **params)
    elif name == "gspo-token":
        agg_kw = {"agg": params.get("agg", "seq-mean-token-mean"), "rows": agg_kw["rows"]}
        term = ref_gspo_token(logp, logp_old, adv_tokens, mask, **params)
    elif name == "vespo":
        vespo_keys = ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
        term = ref_vespo(
            logp, logp_old, adv_tokens, mask, **{k: v for k, v in params.items() if k in vespo_keys}
        )
    elif name == "stabledrl":
        j = ref_stabledrl(logp, logp_old, adv_tokens, mask, data["group"], weight, **params)
        return j
    else:
        term = TOKEN_REFS[name](r, adv_tokens, logp=logp, **params)
    j = aggregate(term * weight, mask, **agg_kw)
    beta = params.get("beta", 0.0)
    if beta:
        kl = kl_k3(logp, data["logp_ref"])
        if params.get("kl_is") == "token":  # TRL use_bias_correction_kl: per_token_kl * coef_1
            kl = kl * r
        if params.get("kl_is") == "sequence":  # ... with importance_sampling_level="sequence"
            seq_log_ratio = ((logp - logp_old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            kl = kl * torch.exp(seq_log_ratio)[:, None]
        if params.get("kl_weight") != "none":  # TRL adds the KL term after its weights
            kl = kl * weight
        j = j - beta * aggregate(kl, mask, **agg_kw)
    return j


def check_against_autograd(spec, name, params, data, *, weight=None, adv_tokens=None, **extra):
    """Runs the package and the reference; returns (weights, autograd grad [T])."""
    b = data["logp"].shape[0]
    if adv_tokens is None:
        adv_tokens = data["adv"][:, None].expand(b, L)
    lw = torch.ones_like(data["logp"]) if weight is None else weight
    logp = data["logp"].clone().requires_grad_(True)
    ref_params = {k: v for k, v in params.items() if k not in ("adv",)}
    j = reference_objective(name, ref_params, data, logp, adv_tokens, lw)
    (grad,) = torch.autograd.grad(j, logp)
    batch = PolicyBatch(
        logp=data["logp"],
        logp_old=data["logp_old"],
        advantages=extra.pop("advantages", data["adv"]),
        mask=data["mask"],
        group_id=data["group"],
        logp_ref=data["logp_ref"],
        loss_weight=weight,
        loss_scale=data["loss_scale"],
        **extra,
    )
    w = get_policy(spec).weights(batch)
    assert w.coef.dtype == F64
    assert_close(w.coef, grad.flatten(), rtol=1e-9, atol=1e-12)
    assert_close(w.objective, j.detach(), rtol=1e-9, atol=1e-12)
    return w, grad.flatten()


CASES = [
    # spec, reference name, reference params, exact bounds present in the batch
    ("ppo", "ppo", {}, (0.8, 1.2)),
    ("grpo", "ppo", {"agg": "seq-mean-token-mean"}, (0.8, 1.2)),
    ("dapo", "ppo", {"eps_high": 0.28}, (0.8, 1.28)),
    ("dual-clip", "dual-clip", {"c": 3.0}, (0.8, 1.2)),
    ("two-sided:delta=4", "two-sided", {"delta": 4.0}, (0.8, 1.2, 4.0)),
    # TRL takes a delta at or below 1 + eps_high (it recommends above)
    ("two-sided:delta=1.2", "two-sided", {"delta": 1.2}, (0.8, 1.2)),
    ("two-sided:delta=1.1", "two-sided", {"delta": 1.1}, (0.8, 1.1)),
    ("two-sided:delta=0.9", "two-sided", {"delta": 0.9}, (0.8, 0.9)),
    ("gspo", "gspo", {}, (0.9997, 1.0004)),
    ("gspo:log_ratio_max=0.5", "gspo", {"log_ratio_max": 0.5}, ()),
    ("gspo:delta=1.0001", "gspo", {"delta": 1.0001}, ()),
    ("gspo:delta=1.5", "gspo", {"delta": 1.5}, ()),
    ("gspo:form=token,log_ratio_max=0.5", "gspo-token", {"log_ratio_max": 0.5}, ()),
    ("cispo", "cispo", {}, (4.0,)),
    ("cispo:cap=4", "cispo", {"cap": 4.0}, (4.0,)),
    ("cispo:eps_low=0.2,eps_high=0.28", "cispo", {"eps_low": 0.2, "eps_high": 0.28}, (0.8, 1.28)),
    ("sapo", "sapo", {"agg": "seq-mean-token-mean"}, ()),
    ("sapo:agg=token-mean", "sapo", {}, ()),
    ("vespo", "vespo", {}, ()),
    (
        "vespo:k_pos=1.5,lambda_pos=0.5,k_neg=0.7,lambda_neg=4",
        "vespo",
        {"k_pos": 1.5, "lambda_pos": 0.5, "k_neg": 0.7, "lambda_neg": 4.0},
        (),
    ),
    ("is", "is", {}, ()),
    ("reinforce", "reinforce", {}, ()),
    ("stabledrl", "stabledrl", {}, (("log", 5.0),)),
    ("stabledrl:norm=batch", "stabledrl", {"norm": "batch"}, (("log", 5.0),)),
    ("stabledrl:level=token", "stabledrl", {"level": "token"}, (("log", 5.0),)),
    (
        "stabledrl:level=token,norm=batch",
        "stabledrl",
        {"level": "token", "norm": "batch"},
        (("log", 5.0),),
    ),
]
NO_UNDERFLOW = {
    "ppo",
    "dual-clip",
    "two-sided",
    "gspo",
    "gspo-token",
    "cispo",
    "is",
    "reinforce",
    "stabledrl",
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("spec", "name", "params", "bounds"), CASES, ids=[c[0] for c in CASES])
def test_coef_and_objective_match_autograd(spec, name, params, bounds, seed):
    data = make_batch(seed, bounds)
    w, grad = check_against_autograd(spec, name, params, data)
    mask = data["mask"].flatten() > 0
    adv = data["adv"][:, None].expand(-1, L).flatten()
    eligible = mask & (adv != 0)
    if name in NO_UNDERFLOW:
        # beta = 0 and no underflow: the rule's discards are exactly the zero gradients.
        assert torch.equal(w.discarded, (grad == 0) & eligible)
    assert not w.discarded[~eligible].any() and not w.clipped[~eligible].any()
    assert torch.all(w.coef[~mask] == 0)
    assert int(w.nonfinite) == 0


BOUND_CASES = [c for c in CASES if c[3]]


@pytest.mark.parametrize(
    ("spec", "name", "params", "bounds"), BOUND_CASES, ids=[c[0] for c in BOUND_CASES]
)
def test_ratios_exactly_on_a_bound_are_not_clipped(spec, name, params, bounds):
    data = make_batch(3, bounds)
    w, _ = check_against_autograd(spec, name, params, data)
    mask = data["mask"].flatten() > 0
    exact = torch.tensor([exact_log_ratio(a) for a in bounds], dtype=F64)

    def on_bounds(data):
        return torch.isin((data["logp"] - data["logp_old"]).flatten(), exact)

    r = torch.exp(data["logp"] - data["logp_old"]).flatten()
    on_bound = mask & on_bounds(data)
    if name in ("gspo", "stabledrl"):
        # sequence-level rules: only single-token sequences sit exactly on the bound.
        single = torch.tensor([n == 1 for n, _, _ in ROWS]).repeat_interleave(L)
        on_bound &= single
        # rows 1 (A < 0) and 8 (A > 0) are single-token: lower bound on 1, upper on 8.
        for k, a in enumerate(bounds):
            for row in (1, 8) if len(bounds) == 1 else ((1,) if k == 0 else (8,)):
                j = torch.nonzero(data["mask"][row]).flatten()[0]
                data["logp"][row, j] = 0.0
                data["logp_old"][row, j] = -exact_log_ratio(a)
        w, _ = check_against_autograd(spec, name, params, data)
        on_bound = mask & single & on_bounds(data)
    if name == "two-sided":
        # r == delta sits beyond 1 + eps_high, where A > 0 is discarded by the PPO rule itself.
        on_bound &= ~((data["adv"][:, None].expand(-1, L).flatten() > 0) & (r > 1.2))
    assert on_bound.sum() >= 2
    assert not w.discarded[on_bound].any()
    assert not w.clipped[on_bound].any()
    if name not in ("gspo", "stabledrl", "reinforce"):
        adv = data["adv"][:, None].expand(-1, L).flatten()
        ppo_like = name in ("ppo", "dual-clip", "two-sided")
        expected = r * adv if ppo_like else torch.clamp(r, max=4.0) * adv
        if ppo_like or name == "cispo":
            assert_close(w.coef[on_bound] * w.norm[on_bound], expected[on_bound])


def test_dual_clip_ratio_exactly_at_c_keeps_r_a():
    """At r == c the contract's bound rule gives r A (autograd of verl's max splits the tie)."""
    data = make_batch(4, (4.0,), far=False)
    w = get_policy("dual-clip:c=4").weights(
        PolicyBatch(
            logp=data["logp"], logp_old=data["logp_old"], advantages=data["adv"], mask=data["mask"]
        )
    )
    r = torch.exp(data["logp"] - data["logp_old"]).flatten()
    adv = data["adv"][:, None].expand(-1, L).flatten()
    at_c = (data["mask"].flatten() > 0) & (r == 4.0) & (adv < 0)
    assert at_c.sum() >= 2
    assert not w.discarded[at_c].any()
    assert_close(w.coef[at_c], (r * adv / data["mask"].sum())[at_c])
    above = (data["mask"].flatten() > 0) & (r > 4.0) & (adv < 0)
    assert torch.all(w.discarded[above])


EXPECTED_CLIPPED = {
    "cispo": lambda r, lr_seq, adv: r > 5.0,
    "cispo:cap=4": lambda r, lr_seq, adv: r > 4.0,
    "cispo:eps_low=0.2,eps_high=0.28": lambda r, lr_seq, adv: (r < 0.8) | (r > 1.28),
    "sapo": lambda r, lr_seq, adv: (
        4
        * torch.sigmoid(torch.where(adv > 0, 1.0, 1.05) * (r - 1))
        * torch.sigmoid(-torch.where(adv > 0, 1.0, 1.05) * (r - 1))
        < 0.5
    ),
    "stabledrl": lambda r, lr_seq, adv: lr_seq > math.log(5.0),
    "stabledrl:level=token": lambda r, lr_seq, adv: torch.log(r) > math.log(5.0),
}


@pytest.mark.parametrize("spec", list(EXPECTED_CLIPPED))
def test_clipped_sets(spec):
    data = make_batch(5, ())
    mask = data["mask"]
    w = get_policy(spec).weights(
        PolicyBatch(
            logp=data["logp"],
            logp_old=data["logp_old"],
            advantages=data["adv"],
            mask=mask,
            group_id=data["group"],
        )
    )
    log_ratio = data["logp"] - data["logp_old"]
    lr_seq = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    r = torch.exp(log_ratio)
    adv = data["adv"][:, None].expand(-1, L)
    expected = EXPECTED_CLIPPED[spec](r, lr_seq.expand(-1, L), adv) & (mask > 0) & (adv != 0)
    assert torch.equal(w.clipped, expected.flatten())
    assert expected.any() and not w.discarded.any()


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("ppo:agg=token-mean", {"agg": "token-mean"}),
        ("ppo:agg=seq-mean-token-mean", {"agg": "seq-mean-token-mean"}),
        ("ppo:agg=seq-mean-token-sum", {"agg": "seq-mean-token-sum"}),
        ("ppo:agg=constant,max_len=16", {"agg": "constant", "max_len": 16}),
        ("ppo:agg=recorded", {"agg": "recorded"}),
        ("sapo:agg=seq-mean-token-sum", {"agg": "seq-mean-token-sum"}),
        ("is:agg=constant,max_len=8", {"agg": "constant", "max_len": 8}),
        ("cispo:agg=recorded", {"agg": "recorded"}),
        ("reinforce:agg=seq-mean-token-mean", {"agg": "seq-mean-token-mean"}),
    ],
)
def test_aggregations(spec, params):
    name = spec.split(":")[0]
    check_against_autograd(spec, name, params, make_batch(6, (0.8, 1.2)))


@pytest.mark.parametrize(
    ("spec", "name", "params"),
    [
        ("grpo:beta=0.04", "ppo", {"agg": "seq-mean-token-mean", "beta": 0.04}),
        ("dual-clip:beta=0.1", "dual-clip", {"beta": 0.1}),
        ("gspo:beta=0.04", "gspo", {"beta": 0.04}),
        ("sapo:beta=0.2", "sapo", {"agg": "seq-mean-token-mean", "beta": 0.2}),
        ("cispo:beta=0.1,agg=recorded", "cispo", {"beta": 0.1, "agg": "recorded"}),
        ("reinforce:beta=0.1", "reinforce", {"beta": 0.1}),
        ("vespo:beta=0.1", "vespo", {"beta": 0.1}),
        (
            "grpo:beta=0.04,kl_is=token",
            "ppo",
            {"agg": "seq-mean-token-mean", "beta": 0.04, "kl_is": "token"},
        ),
        ("dapo:beta=0.1,kl_is=token", "ppo", {"eps_high": 0.28, "beta": 0.1, "kl_is": "token"}),
        (
            "sapo:beta=0.2,kl_is=token",
            "sapo",
            {"agg": "seq-mean-token-mean", "beta": 0.2, "kl_is": "token"},
        ),
        ("cispo:beta=0.1,kl_is=token", "cispo", {"beta": 0.1, "kl_is": "token"}),
        ("vespo:beta=0.1,kl_is=token", "vespo", {"beta": 0.1, "kl_is": "token"}),
        ("gspo:beta=0.04,kl_is=sequence", "gspo", {"beta": 0.04, "kl_is": "sequence"}),
        (
            "gspo:beta=0.04,kl_is=sequence,agg=seq-mean-token-sum,rows=all",
            "gspo",
            {"beta": 0.04, "kl_is": "sequence", "agg": "seq-mean-token-sum", "rows": "all"},
        ),
        (
            "grpo:beta=0.04,kl_is=sequence",
            "ppo",
            {"agg": "seq-mean-token-mean", "beta": 0.04, "kl_is": "sequence"},
        ),
        ("vespo:beta=0.1,kl_is=sequence", "vespo", {"beta": 0.1, "kl_is": "sequence"}),
    ],
)
def test_kl_term(spec, name, params):
    w, grad = check_against_autograd(spec, name, params, make_batch(7, (0.8, 1.2)))
    # A KL term can keep a discarded token's coef non-zero: discards come from the rule.
    if name in ("ppo", "dual-clip", "gspo"):
        assert w.discarded.any()
        assert (grad[w.discarded] != 0).any()


def test_stabledrl_kl_term():
    data = make_batch(7, ())
    logp = data["logp"].clone().requires_grad_(True)
    mask, lw = data["mask"], torch.ones_like(data["logp"])
    adv = data["adv"][:, None].expand(-1, L)
    beta = 0.05
    j = ref_stabledrl(logp, data["logp_old"], adv, mask, data["group"], lw)
    kl = kl_k3(logp, data["logp_ref"]) * mask
    # norm_t = n_groups |G_g| |y_i| over live sequences and groups.
    live = mask.sum(-1) > 0
    sizes = {g: int(((data["group"] == g) & live).sum()) for g in data["group"].tolist()}
    n_groups = sum(1 for s in sizes.values() if s > 0)
    for i in range(len(ROWS)):
        if live[i]:
            j = j - beta * kl[i].sum() / (n_groups * sizes[int(data["group"][i])] * mask[i].sum())
    (grad,) = torch.autograd.grad(j, logp)
    w = get_policy(f"stabledrl:beta={beta}").weights(
        PolicyBatch(
            logp=data["logp"],
            logp_old=data["logp_old"],
            advantages=data["adv"],
            mask=mask,
            group_id=data["group"],
            logp_ref=data["logp_ref"],
        )
    )
    assert_close(w.coef, grad.flatten(), rtol=1e-9, atol=1e-12)
    assert_close(w.objective, j.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("spec", "name", "params"),
    [
        ("ppo", "ppo", {}),
        ("gspo", "gspo", {}),
        ("stabledrl", "stabledrl", {}),
        ("stabledrl:level=token", "stabledrl", {"level": "token"}),
        ("sapo:agg=seq-mean-token-mean", "sapo", {"agg": "seq-mean-token-mean"}),
    ],
)
def test_loss_weight(spec, name, params):
    data = make_batch(8, (0.8, 1.2))
    check_against_autograd(spec, name, params, data, weight=data["weight"])
    assert (data["weight"] == 0).any()


@pytest.mark.parametrize(
    ("spec", "name", "params"),
    [
        ("dapo:beta=0.1", "ppo", {"eps_high": 0.28, "beta": 0.1}),
        (
            "dapo:beta=0.1,kl_weight=none",
            "ppo",
            {"eps_high": 0.28, "beta": 0.1, "kl_weight": "none"},
        ),
        (
            "grpo:beta=0.04,kl_is=token,kl_weight=none",
            "ppo",
            {"agg": "seq-mean-token-mean", "beta": 0.04, "kl_is": "token", "kl_weight": "none"},
        ),
        ("gspo:beta=0.04,kl_is=sequence", "gspo", {"beta": 0.04, "kl_is": "sequence"}),
        (
            "gspo:beta=0.04,kl_is=sequence,kl_weight=none",
            "gspo",
            {"beta": 0.04, "kl_is": "sequence", "kl_weight": "none"},
        ),
    ],
)
def test_loss_weight_with_the_kl_term(spec, name, params):
    """kl_weight=recorded weighs the KL term by loss_weight as the policy term; none leaves it
    unweighted, as TRL adds it after its entropy, off-policy and vLLM weights."""
    data = make_batch(8, (0.8, 1.2))
    check_against_autograd(spec, name, params, data, weight=data["weight"])


def _ref_advantages(reward, group, mode):
    """verl's estimators: a group of one has mean 0 and std 1 (so A = r_i)."""
    out = torch.zeros_like(reward)
    for g in group.unique().tolist():
        idx = torch.nonzero(group == g).flatten()
        r = reward[idx]
        n = len(idx)
        mean = r.mean() if n > 1 else torch.tensor(0.0, dtype=F64)
        if mode == "center":
            out[idx] = r - mean
        elif mode == "zscore":
            std = r.std() if n > 1 else torch.tensor(1.0, dtype=F64)
            out[idx] = (r - mean) / (std + 1e-4)
        else:
            out[idx] = torch.stack(
                [r[k] - (r.sum() - r[k]) / (n - 1) if n > 1 else r[k] for k in range(n)]
            )
    return out


@pytest.mark.parametrize("mode", ["center", "zscore", "rloo"])
@pytest.mark.parametrize(("spec", "name"), [("grpo", "ppo"), ("stabledrl", "stabledrl")])
def test_advantage_recomputation(mode, spec, name):
    data = make_batch(9, (0.8, 1.2))
    adv = _ref_advantages(data["reward"], data["group"], mode)
    params = {"agg": "seq-mean-token-mean"} if spec == "grpo" else {}
    w, _ = check_against_autograd(
        f"{spec}:adv={mode}",
        name,
        params,
        data,
        adv_tokens=adv[:, None].expand(-1, L),
        reward=data["reward"],
    )
    assert_close(w.advantages, adv[:, None].expand(-1, L).flatten())


@pytest.mark.parametrize("spec", ["grpo", "dapo", "gspo", "sapo", "stabledrl", "cispo", "is"])
def test_flat_and_numpy_inputs_agree_with_2d(spec):
    data = make_batch(10, (0.8, 1.2))
    two_d = get_policy(spec).weights(
        PolicyBatch(
            logp=data["logp"],
            logp_old=data["logp_old"],
            advantages=data["adv"],
            mask=data["mask"],
            group_id=data["group"],
        )
    )
    b = len(ROWS)
    flat_all = PolicyBatch(
        logp=data["logp"].flatten(),
        logp_old=data["logp_old"].flatten(),
        advantages=data["adv"][:, None].expand(b, L).flatten(),
        mask=data["mask"].flatten(),
        seq_id=torch.arange(b).repeat_interleave(L),
        group_id=data["group"],
    )
    assert_close(get_policy(spec).weights(flat_all).coef, two_d.coef)
    # Only the scored tokens, flat: the masked positions were never part of the objective.
    keep = data["mask"].flatten() > 0
    flat_scored = PolicyBatch(
        logp=data["logp"].flatten()[keep],
        logp_old=data["logp_old"].flatten()[keep],
        advantages=data["adv"][:, None].expand(b, L).flatten()[keep],
        seq_id=torch.arange(b).repeat_interleave(L)[keep],
        group_id=data["group"],
    )
    w = get_policy(spec).weights(flat_scored)
    assert_close(w.coef, two_d.coef[keep])
    assert_close(w.objective, two_d.objective)
    as_numpy = PolicyBatch(
        logp=data["logp"].numpy(),
        logp_old=data["logp_old"].numpy(),
        advantages=data["adv"].numpy(),
        mask=data["mask"].numpy().astype(np.uint8),
        group_id=data["group"].numpy(),
    )
    w_np = get_policy(spec).weights(as_numpy)
    assert isinstance(w_np.coef, torch.Tensor) and w_np.coef.device.type == "cpu"
    assert_close(w_np.coef, two_d.coef)


def test_float32_input_stays_float32_and_half_is_promoted():
    data = make_batch(11, ())
    for dtype, expected in ((torch.float32, torch.float32), (torch.float16, torch.float32)):
        w = get_policy("grpo").weights(
            PolicyBatch(
                logp=data["logp"].to(dtype),
                logp_old=data["logp_old"].to(dtype),
                advantages=data["adv"].to(dtype),
                mask=data["mask"],
            )
        )
        assert w.coef.dtype == expected and w.objective.dtype == expected


def test_sequence_units_each_entry_is_a_sequence():
    """unit: sequence runs give one entry a sequence: flat, no seq_id, group_id per entry."""
    gen = torch.Generator().manual_seed(12)
    logp = -torch.rand(8, generator=gen, dtype=F64) * 5
    log_ratio = torch.tensor([0.1, 2.5, -0.3, 0.0, 3.0, -1.0, 0.4, 0.2], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0], dtype=F64)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    batch = PolicyBatch(
        logp=logp, logp_old=logp - log_ratio, advantages=adv, group_id=group, unit="sequence"
    )
    w = get_policy("stabledrl").weights(batch)
    expected = torch.zeros(8, dtype=F64)
    for g in range(3):
        idx = group == g
        share = torch.softmax(log_ratio[idx].clamp(max=math.log(5)), 0)
        expected[idx] = share * adv[idx] / 3
    assert_close(w.coef, expected)
    assert torch.equal(w.clipped, (log_ratio > math.log(5)) & (adv != 0))
    from stabledrl_cli.errors import UsageError

    with pytest.raises(UsageError, match="level=token"):
        get_policy("stabledrl:level=token").weights(batch)
    assert get_policy("stabledrl:level=token").required_fields("token") == set()


AGG_CASES = [
    ("ppo:agg=token-sum", "ppo", {"agg": "token-sum"}),
    ("ppo:agg=micro-token-mean", "ppo", {"agg": "micro-token-mean"}),
    ("ppo:agg=seq-mean-token-sum-norm", "ppo", {"agg": "seq-mean-token-sum-norm"}),
    (
        "ppo:agg=seq-mean-token-sum-norm,max_len=9",
        "ppo",
        {"agg": "seq-mean-token-sum-norm", "max_len": 9},
    ),
    ("grpo:rows=all", "ppo", {"agg": "seq-mean-token-mean", "rows": "all"}),
    ("sapo:rows=all,beta=0.1", "sapo", {"agg": "seq-mean-token-mean", "rows": "all", "beta": 0.1}),
    ("ppo:agg=seq-mean-token-sum,rows=all", "ppo", {"agg": "seq-mean-token-sum", "rows": "all"}),
    (
        "is:agg=constant,max_len=8,rows=all",
        "is",
        {"agg": "constant", "max_len": 8, "rows": "all"},
    ),
    ("gspo:rows=all", "gspo", {"rows": "all"}),
    (
        "gspo:agg=seq-mean-token-sum,rows=all",
        "gspo",
        {"agg": "seq-mean-token-sum", "rows": "all"},
    ),
    ("gspo:agg=token-mean", "gspo", {"agg": "token-mean"}),
    (
        "vespo:agg=seq-mean-token-sum,rows=all",
        "vespo",
        {"agg": "seq-mean-token-sum", "rows": "all"},
    ),
    ("stabledrl:rows=all", "stabledrl", {"rows": "all"}),
    ("stabledrl:rows=all,norm=batch", "stabledrl", {"rows": "all", "norm": "batch"}),
    ("stabledrl:norm=micro", "stabledrl", {"norm": "micro", "micro": MICRO}),
    (
        "stabledrl:rows=all,norm=micro",
        "stabledrl",
        {"rows": "all", "norm": "micro", "micro": MICRO},
    ),
    (
        "stabledrl:level=token,norm=micro",
        "stabledrl",
        {"level": "token", "norm": "micro", "micro": MICRO},
    ),
]


@pytest.mark.parametrize(("spec", "name", "params"), AGG_CASES, ids=[c[0] for c in AGG_CASES])
def test_aggregations_and_rows_match_autograd(spec, name, params):
    """The per-micro-batch aggregations (micro_batch given per row) and rows=all."""
    data = make_batch(4, (0.8, 1.2))
    w, _ = check_against_autograd(spec, name, params, data, micro_batch=MICRO)
    assert int(w.nonfinite) == 0


def test_micro_batch_aggregations_without_micro_batch_are_one_micro_batch():
    data = make_batch(5)
    batch = {
        "logp": data["logp"],
        "logp_old": data["logp_old"],
        "advantages": data["adv"],
        "mask": data["mask"],
    }
    one = get_policy("ppo:agg=micro-token-mean").weights(PolicyBatch(**batch))
    same = get_policy("ppo").weights(PolicyBatch(**batch))
    assert_close(one.coef, same.coef, rtol=0, atol=0)


def test_singleton_groups_follow_verl():
    """A group of one: mean 0 and std 1 (verl's GRPO and RLOO estimators), so A = r_i."""
    reward = torch.tensor([1.0, 0.0, 0.5, 0.7], dtype=F64)
    batch = PolicyBatch(
        logp=torch.zeros(4, dtype=F64),
        logp_old=torch.zeros(4, dtype=F64),
        advantages=torch.zeros(4, dtype=F64),
        reward=reward,
        group_id=torch.tensor([0, 0, 1, 2]),
    )
    center = get_policy("is:adv=center").weights(batch).advantages
    assert center.tolist() == [0.5, -0.5, 0.5, 0.7]
    rloo = get_policy("is:adv=rloo").weights(batch).advantages
    assert rloo.tolist() == [1.0, -1.0, 0.5, 0.7]
    zscore = get_policy("is:adv=zscore").weights(batch).advantages
    assert_close(zscore[2:], reward[2:] / (1.0 + 1e-4))


@pytest.mark.parametrize("mode", ["center", "zscore", "rloo"])
def test_a_group_of_equal_float32_rewards_has_advantage_zero(mode):
    """64 float32 rewards of 0.9 a group: their float32 sum, added one by one, is off their
    mean by 9 ulps, which zscore's 1e-4 made A = -5.3e-3 (TRL's own float32 noise: -6e-4).
    The statistics are float64's: every advantage is 0, in the reward's dtype."""
    reward = torch.full((128,), 0.9, dtype=torch.float32)
    batch = PolicyBatch(
        logp=torch.zeros(128),
        logp_old=torch.zeros(128),
        advantages=torch.ones(128),
        reward=reward,
        group_id=torch.arange(128) // 64,
    )
    advantages = get_policy(f"is:adv={mode}").weights(batch).advantages
    assert advantages.dtype == torch.float32
    assert advantages.tolist() == [0.0] * 128


def test_vespo_discards_a_zero_weight_and_clips_a_weight_below_half_the_ratio():
    """One scored token per sequence, so log w is that token's log r. phi(w) = e^l w^k e^(-l w):
    w = 1 keeps phi = 1; log w = 20 (TRL's clamp) underflows phi to 0 (discarded); w = e with
    A > 0 gives e^(5 - 3e) ~ 0.043 < e / 2 (clipped); w = 1/e gives e^(1 - 3/e) ~ 0.90 > w,
    and w = 1 with A < 0 gives 1: neither is clipped."""
    log_w = torch.tensor([0.0, 25.0, 1.0, -1.0, 0.0], dtype=F64)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0], dtype=F64)
    logp = torch.full((5, 1), -1.0, dtype=F64)
    batch = PolicyBatch(
        logp=logp, logp_old=logp - log_w[:, None], advantages=adv, mask=torch.ones(5, 1)
    )
    w = get_policy("vespo:agg=token-sum").weights(batch)
    clamped = log_w.clamp(max=20.0)
    phi = torch.exp(3.0 + 2.0 * clamped - 3.0 * torch.exp(clamped))
    phi[4] = 1.0
    assert_close(w.coef, (phi * adv).nan_to_num(0.0), rtol=1e-12, atol=0.0)
    assert w.discarded.tolist() == [False, True, False, False, False]
    assert w.clipped.tolist() == [False, False, True, False, False]


@pytest.mark.parametrize(
    ("spec", "params"),
    [
        ("gspo:form=token", {}),
        (
            "gspo:form=token,agg=token-mean,eps_low=0.2,eps_high=0.28",
            {"agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28},
        ),
    ],
)
def test_gspo_token_form_matches_verls_gradient_with_token_advantages_and_weights(spec, params):
    """verl's GSPO-token form: the same loss as the sequence form, and each token's own
    gradient s_i A_t w_t / norm_t; with advantages and weights that vary within a sequence the
    two forms' coefficients differ (the sequence form spreads its sequence's sum)."""
    data = make_batch(12, (0.9997, 1.0004) if not params else (0.8, 1.28))
    gen = torch.Generator().manual_seed(12)
    adv_tokens = data["adv"][:, None] + 0.5 * torch.randn(len(ROWS), L, generator=gen, dtype=F64)
    weight = data["weight"]
    w, _ = check_against_autograd(
        spec,
        "gspo-token",
        params,
        data,
        weight=weight,
        adv_tokens=adv_tokens,
        advantages=adv_tokens,
    )
    sequence_form = get_policy(spec.replace("form=token", "form=sequence")).weights(
        PolicyBatch(
            logp=data["logp"],
            logp_old=data["logp_old"],
            advantages=adv_tokens,
            mask=data["mask"],
            loss_weight=weight,
        )
    )
    assert_close(sequence_form.objective, w.objective, rtol=1e-12, atol=0.0)
    assert not torch.allclose(sequence_form.coef, w.coef)
