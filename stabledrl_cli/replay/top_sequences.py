"""The sequences contributing most to one policy's update of a flagged step (`--detail`):
each sequence's |coef| weighed by its units' gradient norms from the step's geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stabledrl_cli.policies import PreparedBatch, Weights
from stabledrl_cli.replay.step_geometry import StepGeometry


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
