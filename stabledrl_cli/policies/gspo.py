"""GSPO: the PPO rule on a sequence ratio (TRL `importance_sampling_level="sequence"`).

s_i = exp(mean over scored t of log r_t), broadcast to the sequence's tokens; each token's term
is `min(s_i A_t, clip(s_i) A_t)`, aggregated by default as TRL's `grpo` loss (N |y_i|):
J = sum_i sum_{t in i} w_t min(s_i A_t, clip(s_i) A_t) / norm_t.
Since d s_i / d logp_t = s_i / |y_i|, the token coefficient is
coef_t = (s_i / |y_i|) * sum_{u in i, kept} w_u A_u / norm_u, i.e. s_i A_i / (N |y_i|) for a
per-sequence advantage under the default, and 0 for the whole sequence when its clip binds.
TRL's sequence-level `luspo` is this with agg=seq-mean-token-sum, rows=all (s_i A_i / N).
form=token is verl's GSPO-token form, s_i,t = sg(s_i) pi_t / sg(pi_t): the same loss, and
coef_t = s_i A_t w_t / norm_t on a kept token (equal to the above for a per-sequence A and w).
log_ratio_max=M caps the sequence log-ratio, log s_i = min(mean_t log r_t, M), as verl's
compute_policy_loss_gspo clamps it at M = 10: a sequence past the cap has s_i = e^M and
coef 0 (discarded), one exactly at it keeps its gradient (torch.clamp's). The paper and TRL
(grpo_trainer's log_importance_weights) do not cap it: the default, none.
delta=D is TRL's two-sided clip (`GRPOConfig.delta`) on the sequence ratio: each token's term
is min(min(s_i, D) A_t, clip(s_i) A_t), so a sequence with A < 0 and s_i above both D and
1 + eps_high is discarded, and one with A > 0 and s_i > D (TRL 1.16 grpo_trainer:
`coef_1 = torch.clamp(coef_1, max=delta)` after the sequence ratio).
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import Policy, PolicyTerms
from stabledrl_cli.policies._family_config import GSPOConfig
from stabledrl_cli.policies._masked import above, below, keep_times, masked_sum, ratio_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch


class GSPOPolicy(Policy):
    """GSPO (arXiv:2507.18071; TRL importance_sampling_level="sequence"): per token
    `min(s_i A, clip(s_i, 1-eps_low, 1+eps_high) A) / norm` (default N |y_i|),
    s_i = exp(min(mean_t log r_t, log_ratio_max)), s_i capped at delta in the first term when
    given; a sequence whose clip binds, past the cap, with A > 0 past delta or with A < 0 past
    both delta and 1 + eps_high, is discarded whole."""

    config: GSPOConfig

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        cfg = self.config
        low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        log_seq_ratio = prep.seq_mean_log_ratio
        past_cap = None
        if cfg.log_ratio_max is not None:
            past_cap = prep.per_token(above(log_seq_ratio, cfg.log_ratio_max))
            log_seq_ratio = log_seq_ratio.clamp(max=cfg.log_ratio_max)
        seq_ratio = prep.per_token(torch.exp(log_seq_ratio))
        unclipped = seq_ratio if cfg.delta is None else torch.clamp(seq_ratio, max=cfg.delta)
        value = torch.minimum(ratio_times(unclipped, adv), torch.clamp(seq_ratio, low, high) * adv)
        # the two-sided cap: min(s, delta, high) A for A > 0, max(min(s, delta), clip(s)) A below
        top = high if cfg.delta is None else min(high, cfg.delta)
        discarded = (above(adv, 0.0) & above(seq_ratio, top)) | (
            below(adv, 0.0) & below(seq_ratio, low)
        )
        if cfg.delta is not None:
            discarded = discarded | (below(adv, 0.0) & above(seq_ratio, max(high, cfg.delta)))
        if past_cap is not None:  # the clamp zeroes those sequences' gradient
            discarded = discarded | past_cap
        scale = prep.weight_over(norm)
        objective = masked_sum(prep.mask, scale * value)
        if cfg.form == "token":  # each token's own s_i A_t w_t / norm_t, as PPO's with r = s_i
            coef = scale * keep_times(~discarded, ratio_times(seq_ratio, adv))
        else:
            kept = prep.per_token(prep.seq_sum(keep_times(~discarded, scale * adv)))
            # 0 for a discarded sequence even when s_i overflowed (never 0 * inf).
            coef = keep_times(kept != 0, seq_ratio * kept / prep.seq_len_tokens)
        return PolicyTerms(
            coef=coef, objective=objective, discarded=discarded, clipped=torch.zeros_like(discarded)
        )
