"""StableDRL (arXiv:2603.06743; public code `networks/llada_svpo.py::compute_loss_spg`,
`use_snis=true`): unconditional clipping, then self-normalization.

level=seq (default), per sequence i of group g:
  log w_i = min(mean_{t in i} log r_t, log c)       (whatever the sign of A; detached)
  w~_i    = softmax of log w over the live sequences of g (norm=group), of the step (batch),
            or of micro-batch g (micro: each gradient-accumulation round's softmax over its
            own batch, the public code's `loss / grad_accumulation` the mean over rounds)
  J       = (1 / n_groups) sum_g sum_{i in g} w~_i ELBO_i(A),
            ELBO_i(A) = sum_{t in i} w_t A_t logp_t / |y_i|
  coef_t  = w~_i A_t w_t / (n_groups |y_i|)          (n_groups = 1 for norm=batch; the
            micro-batches for norm=micro; with loss_norm per_rank, R times the segments of
            the sequence's rank, a segment one rank's)
level=token (token units only): log w_t = min(log r_t, log c), softmax over the scored tokens of
the group (or step), coef_t = w~_t A_t w_t / n_groups.

Here w_t is loss_weight. n_groups counts groups with at least one scored token; all-masked
sequences take no share. It never discards; tokens whose log-weight the clip lowered are
`clipped`. norm_t (the REINFORCE-equivalent normalizer) is n_groups |G_g| |y_i| (seq, group),
N |y_i| (seq, batch), n_groups Z_g (token, group) or Z (token, batch), so that coef / (A / norm)
is the share times the size of the normalization set.
"""

from __future__ import annotations

import math

import torch

from stabledrl_cli.policies._base import Policy, PolicyTerms
from stabledrl_cli.policies._family_config import StableDRLConfig
from stabledrl_cli.policies._masked import above, masked_sum
from stabledrl_cli.policies._prepared_batch import PreparedBatch


def segment_softmax(
    log_w: torch.Tensor, index: torch.Tensor, live: torch.Tensor, n_segments: int
) -> torch.Tensor:
    """Softmax of log_w within each segment over the live entries; dead entries get 0.

    log_w, index, live: [M]; a segment with no live entry yields no weights (never NaN from it).
    """
    neg_inf = torch.full((), -math.inf, dtype=log_w.dtype, device=log_w.device)
    log_w = torch.where(live, log_w, neg_inf)
    seg_max = torch.full((n_segments,), -math.inf, dtype=log_w.dtype, device=log_w.device)
    seg_max = seg_max.scatter_reduce(0, index, log_w, reduce="amax", include_self=True)
    seg_count = torch.zeros(n_segments, dtype=log_w.dtype, device=log_w.device)
    seg_live = seg_count.index_add(0, index, live.to(log_w.dtype)) > 0
    seg_max = torch.where(seg_live, seg_max, torch.zeros_like(seg_max))
    expw = torch.exp(log_w - seg_max[index])
    total = torch.zeros(n_segments, dtype=log_w.dtype, device=log_w.device)
    total = total.index_add(0, index, expw)
    share = expw / total[index]
    return torch.where(live, share, torch.zeros_like(share))


class StableDRLPolicy(Policy):
    """StableDRL (arXiv:2603.06743; `networks/llada_svpo.py::compute_loss_spg`, use_snis):
    `mean_g sum_i softmax_g(min(mean_t log r_t, log c)) A_i ELBO_i`. Clips whatever the sign
    of A, self-normalizes within each group; never discards."""

    config: StableDRLConfig

    def _members(self, prep: PreparedBatch) -> torch.Tensor:
        """[N] bool: the sequences the softmax runs over (rows=all: an unscored one too, with
        log w = 0, as the public code gives it)."""
        if self.config.rows == "scored":
            return prep.seq_live
        return torch.ones_like(prep.seq_live)

    def _segments(self, prep: PreparedBatch) -> tuple[torch.Tensor, int, torch.Tensor]:
        """-> (segment of each sequence [N], number of segments, divisor [N]: n_groups, or of a
        run whose ranks each normalised their own part, R times its rank's segments)."""
        if prep.seq_rank is not None:
            return self._rank_segments(prep, prep.seq_rank)
        n = torch.ones_like(prep.seq_len)
        if self.config.norm == "group":
            if self.config.rows == "scored":
                return prep.seq_group, prep.n_groups_total, prep.num_live_groups * n
            return prep.seq_group, prep.n_groups_total, prep.n_groups_total * n
        if self.config.norm == "micro":
            members = prep.micro_sum(self._members(prep).to(prep.dtype))
            return prep.seq_micro, prep.num_micro, (members > 0).sum().to(prep.dtype) * n
        return torch.zeros_like(prep.seq_group), 1, n

    def _rank_segments(
        self, prep: PreparedBatch, rank: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """`_segments` of a step whose ranks each ran their own loss (loss_norm per_rank): a
        segment is one rank's (its batch, group or micro-batch), and each rank's objective
        averages over its own segments with a member, the all-reduce over the R ranks."""
        within = {"group": prep.seq_group, "micro": prep.seq_micro}.get(self.config.norm)
        if within is None:
            seg, n_seg = rank, prep.ranks
        else:
            pairs = rank * (int(within.max()) + 1 if len(within) else 1) + within
            seg_ids, seg = torch.unique(pairs, return_inverse=True)
            n_seg = len(seg_ids)
        members = torch.zeros(n_seg, dtype=prep.dtype, device=prep.device)
        members = members.index_add(0, seg, self._members(prep).to(prep.dtype)) > 0
        if self.config.norm == "group" and self.config.rows == "all":
            members = torch.ones_like(members)
        seg_rank = torch.zeros(n_seg, dtype=torch.int64, device=prep.device)
        seg_rank = seg_rank.scatter_reduce(0, seg, rank, reduce="amax")
        counted = torch.zeros(prep.ranks, dtype=prep.dtype, device=prep.device)
        counted = counted.index_add(0, seg_rank, members.to(prep.dtype)).clamp(min=1.0)
        return seg, n_seg, (counted * prep.ranks)[rank]

    def norm(self, prep: PreparedBatch) -> torch.Tensor:
        cfg = self.config
        return prep.memo(("stabledrl", cfg.level, cfg.norm, cfg.rows), lambda: self._norm(prep))

    def _norm(self, prep: PreparedBatch) -> torch.Tensor:
        seg_of_seq, n_seg, n_groups = self._segments(prep)
        if self.config.level == "seq":
            live = self._members(prep).to(prep.dtype)
            seg_size = torch.zeros(n_seg, dtype=prep.dtype, device=prep.device)
            seg_size = seg_size.index_add(0, seg_of_seq, live).clamp(min=1.0)
            return prep.per_token(n_groups * seg_size[seg_of_seq]) * prep.seq_len_tokens
        seg_tokens = torch.zeros(n_seg, dtype=prep.dtype, device=prep.device)
        seg_tokens = seg_tokens.index_add(0, seg_of_seq, prep.seq_len).clamp(min=1.0)
        return prep.per_token(n_groups * seg_tokens[seg_of_seq])

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        cfg = self.config
        seg_of_seq, n_seg, n_groups = self._segments(prep)
        log_c = math.log(cfg.c)
        if cfg.level == "seq":
            mean_log_ratio = prep.seq_mean_log_ratio
            share = prep.per_token(
                segment_softmax(
                    torch.clamp(mean_log_ratio, max=log_c), seg_of_seq, self._members(prep), n_seg
                )
            )
            clipped = prep.per_token(mean_log_ratio > log_c)
            per_token = share / prep.seq_len_tokens
        else:
            share = segment_softmax(
                torch.clamp(prep.log_ratio, max=log_c), prep.per_token(seg_of_seq), prep.mask, n_seg
            )
            clipped = above(prep.log_ratio, log_c)
            per_token = share
        coef = per_token * adv * prep.weight / prep.per_token(n_groups)
        objective = masked_sum(prep.mask, coef * prep.logp)
        return PolicyTerms(
            coef=coef, objective=objective, discarded=torch.zeros_like(clipped), clipped=clipped
        )
