"""PPO conditional clipping and its two bounded variants (TRL `_compute_loss`, verl
`compute_policy_loss_vanilla`). GRPO and DAPO are PPO with other defaults (see _registry);
the configs are in _config.

Per token, `min(r A, clip(r, 1-eps_low, 1+eps_high) A)`: gradient r A on the unclipped branch,
0 on the clipped one. Discard sets use strict inequalities: a ratio exactly on a bound keeps
its gradient r A (TRL's metrics compare strictly; autograd gives r A there).
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import ClipConfig, DualClipConfig, TwoSidedConfig
from stabledrl_cli.policies._masked import above, below, keep_times, ratio_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch


def ppo_terms(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (value of min(r A, clip(r) A), discarded by the conditional clip)."""
    low, high = 1.0 - eps_low, 1.0 + eps_high
    value = torch.minimum(ratio_times(ratio, adv), torch.clamp(ratio, low, high) * adv)
    discarded = (above(adv, 0.0) & above(ratio, high)) | (below(adv, 0.0) & below(ratio, low))
    return value, discarded


class PPOPolicy(TokenPolicy):
    """PPO conditional clip, per token `min(r A, clip(r, 1-eps_low, 1+eps_high) A) / norm`
    (TRL `GRPOTrainer._compute_loss`, verl `compute_policy_loss_vanilla`). Discards
    A > 0 with r > 1+eps_high and A < 0 with r < 1-eps_low; A < 0 with r > 1+eps_high keeps
    the unbounded weight r |A|."""

    config: ClipConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        value, discarded = ppo_terms(prep.ratio, adv, cfg.eps_low, cfg.high)
        dvalue = keep_times(~discarded, ratio_times(prep.ratio, adv))
        return value, dvalue, discarded, torch.zeros_like(discarded)


VERL_LOG_RATIO_CLAMP = 20.0


class DualClipPolicy(TokenPolicy):
    """verl: for A < 0, `max(min(r A, clip(r) A), c A)`, with r = exp(clamp(log r, -20, 20)).
    At r == c exactly the term keeps r A (the bound rule; autograd of the max splits the tie
    and would give r A / 2)."""

    config: DualClipConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        # verl clamps log r to [-20, 20] before exp so the ratio cannot overflow; the clamp
        # also zeroes the gradient of the tokens outside it.
        outside = above(prep.log_ratio.abs(), VERL_LOG_RATIO_CLAMP)
        ratio = prep.clamped_ratio(VERL_LOG_RATIO_CLAMP)
        value, discarded = ppo_terms(ratio, adv, cfg.eps_low, cfg.high)
        # max(., c A) only binds for A < 0: for A >= 0 the term is >= 0 = c min(A, 0).
        value = torch.maximum(value, cfg.c * torch.clamp(adv, max=0.0))
        discarded = discarded | (below(adv, 0.0) & above(ratio, cfg.c)) | outside
        dvalue = keep_times(~discarded, ratio * adv)
        return value, dvalue, discarded, torch.zeros_like(discarded)


class TwoSidedPolicy(TokenPolicy):
    """TRL `delta` (INTELLECT-2): `min(min(r, delta) A, clip(r) A)`, which is
    `min(r, delta, 1 + eps_high) A` for A > 0 and `max(min(r, delta), clip(r)) A` for A < 0:
    discards A > 0 with r > min(delta, 1 + eps_high), and A < 0 with r < 1 - eps_low or
    r > max(delta, 1 + eps_high) (TRL's clip metrics do not count the last)."""

    config: TwoSidedConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        assert cfg.delta is not None  # required: the catalogue refuses a spec without it
        ratio = prep.ratio
        low, high = 1.0 - cfg.eps_low, 1.0 + cfg.high
        capped = torch.clamp(ratio, max=cfg.delta)
        value = torch.minimum(capped * adv, torch.clamp(ratio, low, high) * adv)
        discarded = (above(adv, 0.0) & above(ratio, min(high, cfg.delta))) | (
            below(adv, 0.0) & (below(ratio, low) | above(ratio, max(high, cfg.delta)))
        )
        # r A only where the indicator keeps it: an overflowed r never meets a zero there.
        dvalue = keep_times(~discarded, ratio_times(ratio, adv))
        return value, dvalue, discarded, torch.zeros_like(discarded)
