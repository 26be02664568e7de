"""GPPO, gradient-preserving clipping (Klear-Reasoner arXiv:2508.07629).

The value is PPO's, min(r A, clip(r, 1-eps_low, 1+eps_high) A), but the clip bound is written
b / sg(r) * r, so a token past the bound keeps a gradient of the bound's size instead of none:
coef = r A inside the trust region and on the side the clip does not bind, (1 + eps_high) A
for A > 0 with r > 1 + eps_high, (1 - eps_low) A for A < 0 with r < 1 - eps_low. Nothing is
discarded; the bounded tokens are `clipped`.
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import GPPOConfig
from stabledrl_cli.policies._masked import ratio_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch
from stabledrl_cli.policies.ppo import ppo_terms


class GPPOPolicy(TokenPolicy):
    """GPPO (arXiv:2508.07629, Kwai-Klear/KlearReasoner `compute_policy_loss`): PPO's value,
    with the gradient of a token past the clip kept at the bound, b A (b = 1 + eps_high for
    A > 0, 1 - eps_low for A < 0)."""

    config: GPPOConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        value, bound_binds = ppo_terms(prep.ratio, adv, cfg.eps_low, cfg.high)
        bound = torch.where(
            adv > 0, torch.full_like(adv, 1.0 + cfg.high), torch.full_like(adv, 1.0 - cfg.eps_low)
        )
        dvalue = torch.where(bound_binds, bound * adv, ratio_times(prep.ratio, adv))
        return value, dvalue, torch.zeros_like(bound_binds), bound_binds
