"""CISPO (MiniMax-M1): J = sum_t sg(w_t) A_t logp_t / norm_t. It clips the importance weight,
never the gradient: no token is discarded; tokens whose weight was bounded are `clipped`.

Two forms, chosen by the keys given:
- TRL (default): w = min(r, cap), an absolute cap (`epsilon_high`, 5.0 recommended);
- verl / slime (eps_low or eps_high given): w = clamp(r, 1 - eps_low, 1 + eps_high).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._base import TokenPolicy
from stabledrl_cli.policies._batch import PreparedBatch
from stabledrl_cli.policies._config import AggConfig, check_min

# TRL's recommended absolute cap on the CISPO weight.
DEFAULT_CAP = 5.0


@dataclass(frozen=True, kw_only=True)
class CISPOConfig(AggConfig):
    cap: float | None = None
    """TRL form: absolute ceiling of the weight, w = min(r, cap); default 5.0."""
    eps_low: float | None = None
    """verl form: floor 1 - eps_low of the weight (default 0.2 once the verl form is chosen)."""
    eps_high: float | None = None
    """verl form: ceiling 1 + eps_high of the weight (default eps_low)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps_low is None and self.eps_high is None:
            if self.cap is None:
                object.__setattr__(self, "cap", DEFAULT_CAP)
            check_min("cap", self.cap, 0.0, strict=True)
            return
        if self.cap is not None:
            raise UsageError(
                "give cap (TRL form) or eps_low/eps_high (verl form), not both; "
                "valid keys: cap | eps_low, eps_high"
            )
        if self.eps_low is None:
            object.__setattr__(self, "eps_low", 0.2)
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)


class CISPOPolicy(TokenPolicy):
    """CISPO (MiniMax-M1 arXiv:2506.13585): `sg(w) A logp / norm`, w = min(r, cap) (TRL
    `loss_type="cispo"`) or clamp(r, 1-eps_low, 1+eps_high) (verl `compute_policy_loss_cispo`).
    Never discards; bounded weights are `clipped`."""

    Config = CISPOConfig
    family = "clipped-is"

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor):
        cfg = self.config
        ratio = prep.ratio
        if cfg.cap is not None:
            weight = torch.clamp(ratio, max=cfg.cap)
            clipped = ratio > cfg.cap
        else:
            low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
            weight = torch.clamp(ratio, low, high)
            clipped = (ratio < low) | (ratio > high)
        dvalue = weight * adv
        value = dvalue * prep.logp
        return value, dvalue, torch.zeros_like(clipped), clipped
