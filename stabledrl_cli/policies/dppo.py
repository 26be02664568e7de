"""DPPO, a trust region on the probability itself (arXiv:2602.04879; verl `dppo_tv`,
`dppo_kl`; prime-rl's probability-difference masks).

J = sum_t sg(min(r, c)) A logp valid_t / norm_t: a REINFORCE term weighted by the truncated,
detached ratio, kept only where the token's probability p = exp(logp) has not left the trust
region in the direction the advantage pushes it:
- tv: A > 0 needs p - p_old <= delta_high, A <= 0 needs p - p_old >= -delta_low;
- kl: the binary KL, p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p +
  1e-8)), must stay <= delta_high (A > 0) or delta_low (A <= 0), unless p moved the other way.
Tokens outside are discarded; tokens whose ratio was truncated at c are clipped. As in verl,
log r is clamped to [-20, 20] before exp.
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import DPPOConfig
from stabledrl_cli.policies._masked import keep_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch
from stabledrl_cli.policies.ppo import VERL_LOG_RATIO_CLAMP


def prob_in(logp: torch.Tensor, logp_dtype: str) -> torch.Tensor:
    """[T] exp(logp) taken in the run's `logp_dtype` as verl takes it (float32: in logp's
    own), as a tensor of logp's dtype."""
    if logp_dtype == "float32":
        return torch.exp(logp)
    return torch.exp(logp.to(getattr(torch, logp_dtype)))


def binary_kl(logp_old: torch.Tensor, logp: torch.Tensor, logp_dtype: str) -> torch.Tensor:
    """[T] KL(Bernoulli(p_old) || Bernoulli(p)), verl's form with its 1e-8 guards; p and its
    1 - p + 1e-8 in the run's `logp_dtype` as verl computes them."""
    p_old, p = torch.exp(logp_old), prob_in(logp, logp_dtype)
    return p_old * (logp_old - logp) + (1.0 - p_old) * torch.log(
        (1.0 - p_old + 1e-8) / (1.0 - p + 1e-8).to(logp_old.dtype)
    )


def trust_region(
    prep: PreparedBatch, adv: torch.Tensor, cfg: DPPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ([T] bool valid: the token's probability stayed in the trust region in the direction
    of its A (A <= 0 on the lower side, as verl's `where(A > 0, ...)`), [T] verl's ratio
    exp(clamp(log r, -20, 20))), over every entry, scored or not. Once per step, bounds and
    advantages: the policy and replay's verl metrics share it."""
    assert cfg.delta_high is not None  # filled by the config
    high = cfg.delta_high

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        ratio = prep.clamped_ratio(VERL_LOG_RATIO_CLAMP)
        p, p_old = prob_in(prep.logp, cfg.logp_dtype).to(prep.dtype), torch.exp(prep.logp_old)
        if cfg.divergence == "tv":
            moved = p - p_old
            return torch.where(adv > 0, moved <= high, moved >= -cfg.delta_low), ratio
        kl = binary_kl(prep.logp_old, prep.logp, cfg.logp_dtype)
        up, down = p >= p_old, p <= p_old
        return torch.where(adv > 0, (kl <= high) | down, (kl <= cfg.delta_low) | up), ratio

    key = f"dppo_trust_region:{cfg.divergence}:{cfg.delta_low!r}:{high!r}:{cfg.logp_dtype}"
    return prep.memo_of(key, adv, build)


class DPPOPolicy(TokenPolicy):
    """DPPO-Binary-TV / -KL (verl `compute_policy_loss_dppo_tv` / `_dppo_kl`):
    `sg(min(r, c)) A logp valid / norm`; tokens whose probability left the trust region in the
    advantage's direction are discarded."""

    config: DPPOConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        valid, ratio = trust_region(prep, adv, cfg)
        weight = torch.clamp(ratio, max=cfg.c)
        dvalue = keep_times(valid, weight * adv)
        value = keep_times(valid, dvalue * prep.logp)
        return value, dvalue, ~valid, valid & (ratio > cfg.c)
