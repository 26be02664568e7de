"""GMPO, geometric-mean policy optimization (arXiv:2507.20673; verl `loss_mode=geo_mean`).

Each token's log-ratio x_t is clipped on the side its advantage would exploit,
x'_t = sgn(A) min(sgn(A) x_t, sgn(A) clamp(x_t, -eps_low, eps_high)); a sequence's ratio is
the geometric mean s_i = exp(sum_t x'_t / (|y_i| + 1e-8)) and its advantage the mean
A_i = sum_t A_t / (|y_i| + 1e-8); J = sum over rows of A_i s_i g_i / N_i, with g_i the
geometric mean of the sequence's loss weights (verl aggregates its rollout weights so). Hence
coef_t = A_i s_i g_i kept_t / (N_i (|y_i| + 1e-8)): tokens with A > 0 and x > eps_high, or
A < 0 and x < -eps_low, are discarded. N_i counts every row (torch.mean over the batch, as
verl: rows=all), or the scored rows with rows=scored: of the whole step (mean=step, one mean),
or of the row's recorded micro-batch (mean=micro: each micro-batch's mean, summed over the
micro-batches, as verl's `compute_policy_loss_geo_mean` called once per micro-batch). A step
joined from R data-parallel ranks (`ranks`) holds each rank's micro-batches apart: mean=micro
then divides by R too, as the gradient all-reduce averages the ranks' sums (N_i = R times
the micro-batch's rows). A step without a recorded `micro_batch` is one micro-batch, where
mean=micro is mean=step whatever R (the joined ranks' parts cannot be told apart: taken as of
equal size, each rank's one mean averaged over R is the step's mean).
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import Policy, PolicyTerms, num_sequences, rank_sum
from stabledrl_cli.policies._family_config import GMPOConfig
from stabledrl_cli.policies._masked import above, below, keep_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch

_LENGTH_GUARD = 1e-8  # verl's response_mask_sum + 1e-8
_WEIGHT_GUARD = 1e-10  # verl's log(rollout_is_weights + 1e-10)


class GMPOPolicy(Policy):
    """GMPO (arXiv:2507.20673; verl `compute_policy_loss_geo_mean`): mean over rows (of the
    step, or of each micro-batch, summed) of A_i exp(mean_t clipped log r_t); the clip binds on
    the side the advantage exploits."""

    config: GMPOConfig

    def row_counts(self, prep: PreparedBatch) -> torch.Tensor:
        """[N] N_i, the rows of the mean each sequence's term is in (clamped to >= 1), times
        the step's ranks with mean=micro on recorded micro-batches (once per step, mean and
        rows). A step without a recorded `micro_batch` is one micro-batch: mean=micro is
        mean=step, on any number of ranks (its ranks' parts cannot be told apart), but for
        a run whose ranks each normalised their own part (`seq_rank`): R times its rank's."""
        mean, rows = self.config.mean, self.config.rows

        def build() -> torch.Tensor:
            counted = prep.seq_live if rows == "scored" else torch.ones_like(prep.seq_live)
            if mean == "step" and prep.seq_rank is not None:  # each rank's one mean
                return rank_sum(prep, counted.to(prep.dtype), prep.seq_rank)
            if mean == "step" or prep.micro_batch is None:  # one micro-batch: mean=step
                return num_sequences(prep, rows).expand(prep.n_seq)
            rows_per_micro = prep.micro_sum(counted.to(prep.dtype)).clamp(min=1.0)
            return (rows_per_micro * float(prep.ranks))[prep.seq_micro]

        return prep.memo(("gmpo_rows", mean, rows), build)

    def norm(self, prep: PreparedBatch) -> torch.Tensor:
        length = prep.per_token(prep.seq_len) + _LENGTH_GUARD
        return prep.per_token(self.row_counts(prep)) * length

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        cfg = self.config
        x = prep.log_ratio
        sign = torch.sign(adv)
        clamped = x.clamp(-cfg.eps_low, cfg.eps_high)
        x_clipped = sign * torch.minimum(sign * x, sign * clamped)
        length = prep.seq_len + _LENGTH_GUARD
        seq_ratio = torch.exp(prep.seq_sum(x_clipped) / length)
        seq_adv = prep.seq_sum(adv) / length
        if prep.loss_weight is None:
            seq_weight = torch.ones_like(seq_ratio)
        else:
            seq_weight = torch.exp(prep.seq_sum(torch.log(prep.weight + _WEIGHT_GUARD)) / length)
        per_seq = keep_times(seq_adv != 0, seq_adv * seq_ratio) * seq_weight
        objective = (per_seq / self.row_counts(prep)).sum()
        discarded = (above(adv, 0.0) & above(x, cfg.eps_high)) | (
            below(adv, 0.0) & below(x, -cfg.eps_low)
        )
        kept = (sign != 0) & ~discarded
        coef = keep_times(kept, prep.per_token(per_seq) / norm)
        return PolicyTerms(
            coef=coef, objective=objective, discarded=discarded, clipped=torch.zeros_like(kept)
        )
