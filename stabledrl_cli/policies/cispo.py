"""CISPO (MiniMax-M1): J = sum_t sg(w_t) A_t logp_t / norm_t. It clips the importance weight,
never the gradient: no token is discarded; tokens whose weight was bounded are `clipped`.

Two forms, chosen by the keys given:
- TRL (default): w = min(r, cap), an absolute cap (`epsilon_high`, 5.0 recommended);
- verl / slime (eps_low or eps_high given): w = clamp(r, 1 - eps_low, 1 + eps_high).
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import CISPOConfig
from stabledrl_cli.policies._masked import above, below
from stabledrl_cli.policies._prepared_batch import PreparedBatch


class CISPOPolicy(TokenPolicy):
    """CISPO (MiniMax-M1 arXiv:2506.13585): `sg(w) A logp / norm`, w = min(r, cap) (TRL
    `loss_type="cispo"`) or clamp(r, 1-eps_low, 1+eps_high) (verl `compute_policy_loss_cispo`).
    Never discards; bounded weights are `clipped`."""

    config: CISPOConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        ratio = prep.ratio
        if cfg.cap is not None:
            weight = torch.clamp(ratio, max=cfg.cap)
            clipped = above(ratio, cfg.cap)
        else:
            assert cfg.eps_low is not None and cfg.eps_high is not None  # the verl form
            low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
            weight = torch.clamp(ratio, low, high)
            clipped = below(ratio, low) | above(ratio, high)
        dvalue = weight * adv
        value = dvalue * prep.logp
        return value, dvalue, torch.zeros_like(clipped), clipped
