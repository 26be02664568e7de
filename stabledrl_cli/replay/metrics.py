"""Per-step indicators of every replayed policy on one prepared step (docs/replay-json.md).

All policies of a step are measured at once: their coefficients are stacked to [P, T] and the
update norms of the P policies (and of their importance-sampling references) come from one
product with the step's gradient geometry. The result stays on the device as a [P, M] tensor
(the device metrics of `columns.COLUMNS`), so a chunk of steps syncs with the host once.

Indicators run over the eligible tokens (mask = 1, A != 0, and loss_weight != 0, where the
REINFORCE reference A w / norm is defined). Effective weight w_t = coef_t / (A_t w_t / norm_t).
With beta > 0 the KL term's coefficient is taken out of coef_t first: the indicators measure
how the policy weighs the policy-gradient term, and the KL term (k3, or r k3 or s_i k3 with
kl_is=token or sequence) is the same for every policy of the same beta and kl_is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stabledrl_cli.policies import Policy, PreparedBatch, Weights
from stabledrl_cli.policies._base import kl_terms
from stabledrl_cli.policies._masked import as_bytes, count, counts, keep_times
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.columns import TRL_METRICS, VERL_METRICS
from stabledrl_cli.replay.framework import MicroBatches, framework_metrics
from stabledrl_cli.replay.step_geometry import StepGeometry


def varies_within_sequence(coef: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
    """[P, T] -> [P] bool: some sequence's scored tokens have different coefficients."""
    big = torch.finfo(coef.dtype).max
    masked_hi = torch.where(prep.mask, coef, -big)
    masked_lo = torch.where(prep.mask, coef, big)
    index = prep.seq.expand(coef.shape[0], -1)
    hi = torch.full((coef.shape[0], prep.n_seq), -big, dtype=coef.dtype, device=coef.device)
    lo = torch.full_like(hi, big)
    hi = hi.scatter_reduce(1, index, masked_hi, reduce="amax")
    lo = lo.scatter_reduce(1, index, masked_lo, reduce="amin")
    return ((hi - lo) > 1e-6 * hi.abs().clamp(min=1e-30)).any(dim=1)


def policy_gradient_coef(policy: Policy, weights: Weights, prep: PreparedBatch) -> torch.Tensor:
    """[T] coef without the KL term (beta > 0; docs/policies.md, KL term)."""
    if not policy.config.beta:
        return weights.coef
    _, kl_grad = kl_terms(prep, policy.config, weights.norm)
    return keep_times(prep.mask, weights.coef + kl_grad)


WIDE_BLOCK = 32768
"""Entries widened to float64 at a time: float64 sums without a full-size float64 copy (a
step's block stays in the cache while it is summed, a quarter faster on 262K positions)."""


def _sum64(values: torch.Tensor) -> torch.Tensor:
    """0-d float64 sum of a [T] tensor (float64 accumulators, a block at a time)."""
    if values.numel() <= WIDE_BLOCK:
        return torch.sum(values, dtype=torch.float64)
    return torch.stack(
        [block.sum(dtype=torch.float64) for block in torch.split(values, WIDE_BLOCK)]
    ).sum()


def _squares64(values: torch.Tensor) -> torch.Tensor:
    """0-d float64 sum of squares of a [T] tensor, each square exact (float32 values widened to
    float64 a block at a time; a dot product of the widened block)."""
    if values.numel() <= WIDE_BLOCK:
        wide = values.double()
        return torch.dot(wide, wide)
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    for block in torch.split(values, WIDE_BLOCK):
        wide = block.double()
        total += torch.dot(wide, wide)
    return total


def _norm64(values: torch.Tensor) -> torch.Tensor:
    """0-d float64 Euclidean norm of a [T] tensor (`_squares64`)."""
    return torch.sqrt(_squares64(values))


@dataclass(frozen=True)
class _Counted:
    """What the references of one advantages tensor share in a step, whatever their
    normalizer: the counted tokens, A w and r A w over every token, and the counts."""

    counted: torch.Tensor
    uncounted: torch.Tensor
    """[T] uint8: 1 where a token is not counted."""
    weighted: torch.Tensor
    """[T] A w."""
    ratio_weighted: torch.Tensor
    """[T] r A w."""
    n_counted: torch.Tensor
    tokens: torch.Tensor
    scored: torch.Tensor

    @classmethod
    def of(cls, prep: PreparedBatch, adv: torch.Tensor) -> _Counted:
        """Once per step and advantages tensor."""
        return prep.memo_of("counted", adv, lambda: cls._build(prep, adv))

    @classmethod
    def _build(cls, prep: PreparedBatch, adv: torch.Tensor) -> _Counted:
        eligible = prep.signs(adv)[0]
        counted = eligible
        if prep.loss_weight is not None:
            counted = eligible & (prep.loss_weight != 0)
        weighted = adv if prep.loss_weight is None else adv * prep.loss_weight
        ratio_weighted = prep.ratio * adv
        if prep.loss_weight is not None:
            ratio_weighted = ratio_weighted * prep.loss_weight
        return cls(
            counted=counted,
            uncounted=as_bytes(~counted),
            weighted=weighted,
            ratio_weighted=ratio_weighted,
            n_counted=count(counted).double(),
            tokens=count(eligible),
            scored=count(prep.mask),
        )


class References:
    """What every policy of one advantage and normalizer shares in a step: the eligible and
    counted tokens, the REINFORCE reference A w / norm and the IS reference r A w / norm
    (what does not depend on the normalizer is shared by every normalizer: `_Counted`)."""

    def __init__(self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor) -> None:
        shared = _Counted.of(prep, adv)
        self.eligible, self.positive, self.negative = prep.signs(adv)
        self.counted = shared.counted
        self.reinforce = keep_times(self.counted, shared.weighted / norm)
        """[T] A w / norm on counted tokens, else 0."""
        self.coef_is = keep_times(prep.mask, shared.ratio_weighted / norm)
        """[T] r A w / norm on scored tokens, else 0."""
        self.safe_ref = self.reinforce + shared.uncounted
        """[T] the REINFORCE reference on counted tokens, else 1 (a safe divisor)."""
        self.n_counted = shared.n_counted
        self.reinforce_sum = _sum64(self.reinforce)
        self.reinforce_abs = _sum64(self.reinforce.abs())
        self.is_abs = self.coef_is.abs()
        self.is_mass = _sum64(self.is_abs)
        self.tokens = shared.tokens
        self.scored = shared.scored


def _counted_weights(pg: torch.Tensor, refs: References) -> tuple[torch.Tensor, torch.Tensor]:
    """A policy's coefficients pg [T] -> (pg on the counted tokens, else 0; its weights w = that
    over the REINFORCE reference), [T] each."""
    pg_counted = keep_times(refs.counted, pg)
    return pg_counted, pg_counted / refs.safe_ref


def _counted_max(w: torch.Tensor, refs: References) -> torch.Tensor:
    """0-d float64 max of w [T] over the counted tokens: NaN when a weight is NaN, -inf when no
    token is counted."""
    neg_inf = torch.full((), -math.inf, dtype=w.dtype, device=w.device)
    top = torch.where(refs.counted, w, neg_inf).amax().double()
    # amax ignores NaN ordering on some backends: make a NaN weight show.
    return torch.where(torch.isnan(w).any(), math.nan, top)


def _quantities(values: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`count` quantities of the P policies, listed one quantity after another (0-d float64
    each) -> one [P] float64 tensor a quantity: views of one stack (a call, not one a
    quantity)."""
    return list(torch.stack(values).view(count, -1).unbind(0))


def _weight_indicators(
    pgs: Sequence[torch.Tensor], refs: Sequence[References]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[P] float64 (weight_max, ess_frac, net_push) of the policies' coefficients pgs ([T] each;
    refs: each policy's references). The sums are taken a policy at a time (its weights summed
    while they are in the cache), the arithmetic on them for every policy at once. weight_max
    is NaN where a weight is NaN or no token is counted."""
    cpu = pgs[0].device.type == "cpu"
    sums, squares, tops, pushed = [], [], [], []
    for pg, r in zip(pgs, refs, strict=True):
        pg_counted, w = _counted_weights(pg, r)
        sums.append(_sum64(w))
        squares.append(_squares64(w))
        # On the CPU the plain max (checked below: w is 0 off the counted tokens); elsewhere
        # the counted one, with no sync.
        tops.append(w.amax().double() if cpu else _counted_max(w, r))
        pushed.append(_sum64(pg_counted))
    totals = [r.n_counted for r in refs] + [r.reinforce_sum for r in refs]
    totals += [r.reinforce_abs for r in refs]
    table = sums + squares + tops + pushed + totals
    sum_w, sum_w2, top, pushed_sum, n_counted, ref_sum, ref_abs = _quantities(table, 7)
    ess = torch.where(sum_w2 != 0, sum_w * sum_w / (n_counted * sum_w2), math.nan)
    ess = torch.where(torch.isnan(sum_w2), math.nan, ess)
    net_push = _net_push(pushed_sum, ref_sum, ref_abs)
    if cpu:
        # No NaN where the sum is not NaN. A positive max, or one over every token, is theirs
        # (a policy at a time on the host, from one read of the sums).
        numel = pgs[0].numel()
        host = torch.stack([sum_w, n_counted, top]).tolist()
        kept = [
            not math.isnan(s) and n > 0 and (t > 0 or n == numel)
            for s, n, t in zip(*host, strict=True)
        ]
        if all(kept):
            return top, ess, net_push
        top = torch.stack(
            [
                t if k else _counted_max(_counted_weights(pg, r)[1], r)
                for t, k, pg, r in zip(tops, kept, pgs, refs, strict=True)
            ]
        )
    return torch.where(n_counted > 0, top, math.nan), ess, net_push


def _net_push(pushed: torch.Tensor, ref_sum: torch.Tensor, ref_abs: torch.Tensor) -> torch.Tensor:
    """[P] float64 net_push of the policies (docs/replay-json.md) from `pushed`, [P] float64 sums
    of each policy's coefficients over its counted tokens, and the sums of its REINFORCE
    reference and of its absolute value ([P] float64 each)."""
    push = (pushed - ref_sum) / torch.where(ref_abs > 0, ref_abs, 1.0)
    return torch.where(ref_abs > 0, push, torch.where(torch.isfinite(push), 0.0, push))


def _discarded_masses(
    weights: Sequence[Weights], refs: Sequence[References], discarded: torch.Tensor
) -> torch.Tensor:
    """[P] float64 sums of |r A w / norm| over each policy's discarded tokens (`discarded`: [P]
    their counts). On the CPU, where the counts are read without a sync, a policy that
    discards no token has the sum 0 without a pass (the sum of its zeroed terms: +0.0)."""
    known = discarded.tolist() if discarded.device.type == "cpu" else [None] * len(weights)
    zero = torch.zeros((), dtype=torch.float64, device=discarded.device)
    return torch.stack(
        [
            zero if tokens == 0 else _sum64(keep_times(w.discarded, r.is_abs))
            for w, r, tokens in zip(weights, refs, known, strict=True)
        ]
    )


def step_metrics(
    prep: PreparedBatch,
    policies: Sequence[Policy],
    weights: Sequence[Weights],
    geometry: StepGeometry,
    own_index: int | None,
    micro: MicroBatches,
    *,
    lean: bool = False,
) -> torch.Tensor:
    """-> [P, M] float64 on prep.device: one row a policy, one column a device metric
    (`columns.device_metrics()`, in that order). micro: the step's micro-batches (the
    frameworks' clip metrics average over them). lean: what `tune` does not read is left
    out: the frameworks' clip metrics, weight_max and ess_frac (NaN; cosine_to_own too, its
    caller passing no own_index), the clipped counts and the per-sign discarded counts (0).

    The references of each distinct (advantages, normalizer) pair are computed once: the
    policies of one aggregation share them. Token arrays stay at the batch's dtype; sums use
    float64 accumulators. Without recorded geometry no [3P, T] block is built."""
    n = len(weights)
    shared: dict[tuple[int, int], int] = {}
    distinct: list[References] = []
    for w in weights:
        key = (id(w.advantages), id(w.norm))
        if key not in shared:
            shared[key] = len(distinct)
            distinct.append(References(prep, w.advantages, w.norm))
    group = [shared[(id(w.advantages), id(w.norm))] for w in weights]
    refs = [distinct[g] for g in group]
    pgs = [policy_gradient_coef(p, w, prep) for p, w in zip(policies, weights, strict=True)]

    cosine = torch.full((n,), math.nan, dtype=torch.float64, device=prep.device)
    objective_mass = torch.stack([r.is_mass for r in refs])
    discarded = counts([w.discarded for w in weights])
    if geometry.kind == "coef":
        update_norm = torch.stack([_norm64(w.coef) for w in weights])
        discarded_mass = _discarded_masses(weights, refs, discarded)
        is_mass = objective_mass
    else:
        rows = [w.coef for w in weights]
        rows += [keep_times(w.discarded, r.coef_is) for w, r in zip(weights, refs, strict=True)]
        rows += [r.coef_is for r in distinct]
        units = geometry.units(torch.stack(rows), prep)
        del rows
        norms, inner = geometry.measure(units, own_index, n)
        update_norm, discarded_mass = norms[:n], norms[n : 2 * n]
        is_mass = norms[2 * n :][torch.tensor(group, device=norms.device)]
        if inner is not None and own_index is not None:
            denom = update_norm * update_norm[own_index]
            cosine = torch.where(denom > 0, inner.double() / denom, math.nan)

    if lean:
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=prep.device)
        pushed = [_sum64(keep_times(r.counted, pg)) for pg, r in zip(pgs, refs, strict=True)]
        pushed += [r.reinforce_sum for r in refs] + [r.reinforce_abs for r in refs]
        weight_max, ess_frac, net_push = nan, nan, _net_push(*_quantities(pushed, 3))
        frameworks = {name: nan for name in (*TRL_METRICS, *VERL_METRICS)}
    else:
        weight_max, ess_frac, net_push = _weight_indicators(pgs, refs)
        frameworks = framework_metrics(prep, policies, weights, micro)
    pairs = list(zip(weights, refs, strict=True))
    zeros = torch.zeros(n, dtype=torch.float64, device=prep.device)

    clipped = zeros if lean else counts([w.clipped for w in weights])

    def split(
        mask_of: Callable[[Weights], torch.Tensor], side: str, total: torch.Tensor
    ) -> torch.Tensor:
        """[P] counts of a policy set on one side of A (left 0 when lean). total: [P] the
        sets' sizes; on the CPU, where they are read without a sync, an empty set counts 0
        without a pass."""
        if lean:
            return zeros
        if total.device.type != "cpu":
            return counts([mask_of(w) & getattr(r, side) for w, r in pairs])
        sized = [i for i, size in enumerate(total.tolist()) if size]
        tallies = torch.zeros(n, dtype=torch.int64)
        if sized:
            flags = [mask_of(pairs[i][0]) & getattr(pairs[i][1], side) for i in sized]
            tallies[sized] = counts(flags)
        return tallies

    computed = {
        "tokens": torch.stack([r.tokens for r in refs]),
        "discarded": discarded,
        "discarded_pos": split(lambda w: w.discarded, "positive", discarded),
        "discarded_neg": split(lambda w: w.discarded, "negative", discarded),
        "clipped": clipped,
        "scored_tokens": torch.stack([r.scored for r in refs]),
        "clipped_pos": split(lambda w: w.clipped, "positive", clipped),
        "clipped_neg": split(lambda w: w.clipped, "negative", clipped),
        "discarded_mass": discarded_mass,
        "is_mass": is_mass,
        "update_norm": update_norm,
        "cosine_to_own": cosine,
        "weight_max": weight_max,
        "ess_frac": ess_frac,
        "net_push": net_push,
        "nonfinite_coefs": torch.stack([w.nonfinite for w in weights]),
        "objective": torch.stack([w.objective for w in weights]),
        "objective_mass": objective_mass,
        **frameworks,
    }
    return torch.stack([computed[name].double() for name in columns.device_metrics()], dim=1)
