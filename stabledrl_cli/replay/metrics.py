"""Per-step indicators of every replayed policy on one prepared step (docs/replay-json.md).

All policies of a step are measured at once: their coefficients are stacked to [P, T] and the
update norms of the P policies (and of their importance-sampling references) come from one
product with the step's gradient geometry. The result stays on the device as a [P, M] tensor
(the device metrics of `columns.COLUMNS`), so a chunk of steps syncs with the host once.

Indicators run over the eligible tokens (mask = 1, A != 0, and loss_weight != 0, where the
REINFORCE reference A w / norm is defined). Effective weight w_t = coef_t / (A_t w_t / norm_t).
With beta > 0 the KL term's coefficient is taken out of coef_t first: the indicators measure
how the policy weighs the policy-gradient term, and the KL term is the same for every policy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.geometry import decode_geometry, replayed_update_norm
from stabledrl_cli.policies import Policy, PreparedBatch, Weights
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.framework import MicroBatches, framework_metrics
from stabledrl_cli.vocab import StepGeometryKind


@dataclass(frozen=True, kw_only=True)
class TopSequence:
    """One sequence behind a flagged step's update (`detail`)."""

    seq_id: int
    """As recorded."""
    group: int | None
    """Its group id; None when the run records none."""
    reward: float | None
    advantage: float
    """Mean advantage over its scored entries."""
    log_ratio: float
    """Mean log r over its scored entries."""
    contribution: float
    """sum over its units of |coef_u| x ||grad_u|| (the coefficient alone without geometry)."""


@dataclass
class StepGeometry:
    """A step's recorded gradient geometry on the device.

    kind: "gram" (`matrix` [U, U]), "sketch" (`matrix` [U, k]) or "coef" (none: norms are
    coefficient norms, a proxy). `per_sequence`: U counts sequences while the step has token
    entries (token coefficients are summed per sequence).
    """

    kind: StepGeometryKind
    matrix: torch.Tensor | None = None
    per_sequence: bool = False

    @classmethod
    def from_arrays(
        cls,
        gram: torch.Tensor | None,
        sketch: torch.Tensor | None,
        scale: float | None,
        prep: PreparedBatch,
        step: int,
    ) -> StepGeometry:
        kind: StepGeometryKind = "gram" if gram is not None else "sketch"
        stored = gram if gram is not None else sketch
        if stored is None:
            return cls("coef")
        rows = stored.shape[0]
        if kind == "gram" and (stored.ndim != 2 or stored.shape[1] != rows):
            raise InputError(f"step {step}: unit_grad_gram has shape {list(stored.shape)}")
        if kind == "sketch" and stored.ndim != 2:
            raise InputError(f"step {step}: unit_grad_sketch has shape {list(stored.shape)}")
        if rows == prep.num_tokens:
            per_sequence = False
        elif rows == prep.n_seq:
            per_sequence = True
        else:
            raise InputError(
                f"step {step}: {kind} geometry has {rows} units but the step has "
                f"{prep.num_tokens} entries and {prep.n_seq} sequences"
            )
        matrix = decode_geometry(stored, scale).to(prep.device)
        return cls(kind, matrix, per_sequence)

    def units(self, coef: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
        """[P, T] token coefficients -> [P, U] unit coefficients of the geometry."""
        if not self.per_sequence:
            return coef
        out = torch.zeros(coef.shape[0], prep.n_seq, dtype=coef.dtype, device=coef.device)
        return out.index_add_(1, prep.seq, torch.where(prep.mask, coef, 0.0))

    def norms(self, coef_units: torch.Tensor) -> torch.Tensor:
        """[R, U] -> [R] norm of sum_u c_u grad_u (the coefficient norm without geometry)."""
        if self.matrix is None:
            norm: torch.Tensor = torch.linalg.vector_norm(coef_units.double(), dim=-1)
            return norm
        if self.kind == "gram":
            return replayed_update_norm(coef_units, gram=self.matrix).double()
        return replayed_update_norm(coef_units, sketch=self.matrix).double()

    def inner(self, coef_units: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """[R, U], [U] -> [R] inner products of the updates; None without geometry."""
        if self.matrix is None:
            return None
        wide = torch.float32 if coef_units.device.type == "mps" else torch.float64
        matrix, c, o = self.matrix.to(wide), coef_units.to(wide), other.to(wide)
        if self.kind == "gram":
            return (c @ matrix) @ o
        return (c @ matrix) @ (matrix.T @ o)

    def unit_scale(self) -> torch.Tensor | None:
        """[U] ||grad_u||: sqrt(K_uu) or the sketch row norm; None without geometry."""
        if self.matrix is None:
            return None
        if self.kind == "gram":
            return torch.diagonal(self.matrix).clamp(min=0).sqrt()
        norm: torch.Tensor = torch.linalg.vector_norm(self.matrix, dim=-1)
        return norm


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
    """[T] coef without the KL term (beta > 0), the k3 estimator of docs/policies.md."""
    beta = getattr(policy.config, "beta", 0.0)
    if not beta:
        return weights.coef
    assert prep.logp_ref is not None
    delta = prep.logp_ref - prep.logp
    kl = beta * prep.weight / weights.norm * (torch.exp(delta) - 1.0)
    return torch.where(prep.mask, weights.coef - kl, 0.0)


def step_metrics(
    prep: PreparedBatch,
    policies: Sequence[Policy],
    weights: Sequence[Weights],
    geometry: StepGeometry,
    own_index: int | None,
    micro: MicroBatches,
) -> torch.Tensor:
    """-> [P, M] float64 on prep.device: one row a policy, one column a device metric
    (`columns.device_metrics()`, in that order). micro: the step's micro-batches (the
    frameworks' clip metrics average over them)."""
    zero = torch.zeros((), dtype=prep.dtype, device=prep.device)
    coef = torch.stack([w.coef for w in weights])  # [P, T]
    adv = torch.stack([w.advantages for w in weights])
    norm = torch.stack([w.norm for w in weights])
    discarded = torch.stack([w.discarded for w in weights])
    clipped = torch.stack([w.clipped for w in weights])
    pg = torch.stack(
        [policy_gradient_coef(p, w, prep) for p, w in zip(policies, weights, strict=True)]
    )

    scored = prep.mask.expand_as(coef)
    eligible = scored & (adv != 0)
    counted = eligible & (prep.weight != 0)
    reinforce = torch.where(counted, adv * prep.weight / norm, zero)
    coef_is = torch.where(scored, prep.ratio * adv * prep.weight / norm, zero)
    coef_is_discarded = torch.where(discarded, coef_is, zero)

    units = geometry.units(torch.cat([coef, coef_is_discarded, coef_is]), prep)
    n = coef.shape[0]
    norms = geometry.norms(units)
    update_norm, discarded_mass, is_mass = norms[:n], norms[n : 2 * n], norms[2 * n :]
    if geometry.kind == "coef":
        is_abs = coef_is.abs().double()
        discarded_mass = torch.where(discarded, is_abs, 0.0).sum(-1)
        is_mass = is_abs.sum(-1)

    cosine = torch.full((n,), math.nan, dtype=torch.float64, device=prep.device)
    if own_index is not None:
        inner = geometry.inner(units[:n], units[own_index])
        if inner is not None:
            denom = update_norm * update_norm[own_index]
            cosine = torch.where(denom > 0, inner.double() / denom, math.nan)

    safe_ref = torch.where(counted, reinforce, 1.0)
    w = torch.where(counted, pg / safe_ref, zero).double()
    n_counted = counted.sum(-1).double()
    neg_inf = torch.full((), -math.inf, dtype=torch.float64, device=prep.device)
    weight_max = torch.where(counted, w, neg_inf).amax(-1)
    # amax ignores NaN ordering on some backends: make a NaN weight show in weight_max.
    weight_max = torch.where(torch.isnan(w).any(-1), math.nan, weight_max)
    weight_max = torch.where(n_counted > 0, weight_max, math.nan)
    sum_w, sum_w2 = w.sum(-1), (w * w).sum(-1)
    ess = torch.where(sum_w2 != 0, sum_w * sum_w / (n_counted * sum_w2), math.nan)
    ess = torch.where(torch.isnan(sum_w2), math.nan, ess)
    ref_abs = reinforce.abs().double().sum(-1)
    push = (torch.where(counted, pg, zero).double().sum(-1) - reinforce.double().sum(-1)) / (
        torch.where(ref_abs > 0, ref_abs, 1.0)
    )
    push = torch.where(ref_abs > 0, push, torch.where(torch.isfinite(push), 0.0, push))

    computed = {
        "tokens": eligible.sum(-1),
        "discarded": discarded.sum(-1),
        "discarded_pos": (discarded & (adv > 0)).sum(-1),
        "discarded_neg": (discarded & (adv < 0)).sum(-1),
        "clipped": clipped.sum(-1),
        "scored_tokens": scored.sum(-1),
        "clipped_pos": (clipped & (adv > 0)).sum(-1),
        "clipped_neg": (clipped & (adv < 0)).sum(-1),
        "discarded_mass": discarded_mass,
        "is_mass": is_mass,
        "update_norm": update_norm,
        "cosine_to_own": cosine,
        "weight_max": weight_max,
        "ess_frac": ess,
        "net_push": push,
        "nonfinite_coefs": torch.stack([w.nonfinite for w in weights]),
        "objective": torch.stack([w.objective for w in weights]),
        **framework_metrics(prep, policies, weights, micro),
    }
    return torch.stack([computed[name].double() for name in columns.device_metrics()], dim=1)


def top_sequences(
    prep: PreparedBatch,
    coef: torch.Tensor,
    weights: Weights,
    geometry: StepGeometry,
    raw_seq_id: torch.Tensor,
    group_id: torch.Tensor | None,
    reward: torch.Tensor | None,
    k: int = 5,
) -> list[TopSequence]:
    """The k sequences contributing most to one policy's update of a step.

    Score of sequence i: sum over its units of |coef_u| * ||grad_u|| (||grad_u|| = sqrt(K_uu)
    with a gram, the sketch row norm with a sketch, 1 without geometry: then |coef_u|).
    coef: [T]; raw_seq_id: [T] as recorded; group_id, reward: [N] or None.
    """
    scale = geometry.unit_scale()
    if geometry.per_sequence:
        per_seq_coef = geometry.units(coef[None], prep)[0].abs()
        score = per_seq_coef * (scale if scale is not None else 1.0)
    else:
        token_score = coef.abs() * (scale if scale is not None else 1.0)
        score = prep.seq_sum(token_score)
    score = torch.where(prep.seq_live, score, torch.full_like(score, -math.inf))
    # A NaN contribution sorts first: a non-finite sequence is the prime suspect of its step.
    ranked = torch.where(torch.isnan(score), math.inf, score)
    order = torch.argsort(ranked, descending=True)[:k]
    raw = torch.zeros(prep.n_seq, dtype=torch.int64, device=prep.device)
    raw = raw.index_copy(0, prep.seq, raw_seq_id.to(prep.device, torch.int64))
    mean_adv = prep.seq_sum(weights.advantages) / prep.seq_len.clamp(min=1.0)
    rows = []
    for i in order.tolist():
        if not bool(prep.seq_live[i]):
            continue
        rows.append(
            TopSequence(
                seq_id=int(raw[i]),
                group=int(group_id[i]) if group_id is not None else None,
                reward=float(reward[i]) if reward is not None else None,
                advantage=float(mean_adv[i]),
                log_ratio=float(prep.seq_mean_log_ratio[i]),
                contribution=float(score[i]),
            )
        )
    return rows
