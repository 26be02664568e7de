"""PPO conditional clipping and its two bounded variants (TRL `_compute_loss`, verl
`compute_policy_loss_vanilla`). GRPO and DAPO are PPO with other defaults (see _registry).

Per token, `min(r A, clip(r, 1-eps_low, 1+eps_high) A)`: gradient r A on the unclipped branch,
0 on the clipped one. Discard sets use strict inequalities: a ratio exactly on a bound keeps
its gradient r A (TRL's metrics compare strictly; autograd gives r A there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._base import TokenPolicy, keep_times
from stabledrl_cli.policies._batch import PreparedBatch
from stabledrl_cli.policies._config import AggConfig, check_min


@dataclass(frozen=True, kw_only=True)
class ClipConfig(AggConfig):
    eps_low: float = 0.2
    """Lower clip: the ratio's floor is 1 - eps_low (binds for A < 0)."""
    eps_high: float | None = None
    """Upper clip: the ratio's ceiling is 1 + eps_high (binds for A > 0); default eps_low."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)


def ppo_terms(
    ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (value of min(r A, clip(r) A), discarded by the conditional clip)."""
    low, high = 1.0 - eps_low, 1.0 + eps_high
    value = torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)
    discarded = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    return value, discarded


class PPOPolicy(TokenPolicy):
    """PPO conditional clip, per token `min(r A, clip(r, 1-eps_low, 1+eps_high) A) / norm`
    (TRL `GRPOTrainer._compute_loss`, verl `compute_policy_loss_vanilla`). Discards
    A > 0 with r > 1+eps_high and A < 0 with r < 1-eps_low; A < 0 with r > 1+eps_high keeps
    the unbounded weight r |A|."""

    Config = ClipConfig
    family = "ppo-clip"

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor):
        cfg = self.config
        value, discarded = ppo_terms(prep.ratio, adv, cfg.eps_low, cfg.eps_high)
        dvalue = keep_times(~discarded, prep.ratio * adv)
        return value, dvalue, discarded, torch.zeros_like(discarded)


VERL_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True, kw_only=True)
class DualClipConfig(ClipConfig):
    c: float = 3.0
    """Dual clip: for A < 0 the term is floored at c A, so r > c is discarded (c > 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("c", self.c, 1.0, strict=True)


class DualClipPolicy(TokenPolicy):
    """verl: for A < 0, `max(min(r A, clip(r) A), c A)`, with r = exp(clamp(log r, -20, 20)).
    At r == c exactly the term keeps r A (the bound rule; autograd of the max splits the tie
    and would give r A / 2)."""

    Config = DualClipConfig
    family = "ppo-clip"

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor):
        cfg = self.config
        # verl clamps log r to [-20, 20] before exp so the ratio cannot overflow; the clamp
        # also zeroes the gradient of the tokens outside it.
        outside = prep.log_ratio.abs() > VERL_LOG_RATIO_CLAMP
        ratio = torch.exp(prep.log_ratio.clamp(-VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP))
        value, discarded = ppo_terms(ratio, adv, cfg.eps_low, cfg.eps_high)
        value = torch.where(adv < 0, torch.maximum(value, cfg.c * adv), value)
        discarded = discarded | ((adv < 0) & (ratio > cfg.c)) | outside
        dvalue = keep_times(~discarded, ratio * adv)
        return value, dvalue, discarded, torch.zeros_like(discarded)


@dataclass(frozen=True, kw_only=True)
class TwoSidedConfig(ClipConfig):
    delta: float | None = None
    """Two-sided clip: r <- min(r, delta) in the unclipped branch (required, > 1 + eps_high;
    INTELLECT-2 used 4)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.delta is not None and not self.delta > 1.0 + self.eps_high:
            raise UsageError(
                f"delta must be > 1 + eps_high = {1.0 + self.eps_high:g}, got {self.delta!r}"
            )


class TwoSidedPolicy(TokenPolicy):
    """TRL `delta` (INTELLECT-2): `min(min(r, delta) A, clip(r) A)`; discards A < 0, r > delta
    as well (TRL's clip metrics do not count these)."""

    Config = TwoSidedConfig
    family = "ppo-clip"
    required_keys = {"delta": "4"}  # noqa: RUF012 (a ClassVar, read-only)

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor):
        cfg = self.config
        ratio = prep.ratio
        low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
        capped = torch.clamp(ratio, max=cfg.delta)
        value = torch.minimum(capped * adv, torch.clamp(ratio, low, high) * adv)
        discarded = ((adv > 0) & (ratio > high)) | (
            (adv < 0) & ((ratio < low) | (ratio > cfg.delta))
        )
        dvalue = keep_times(~discarded, ratio * adv)
        return value, dvalue, discarded, torch.zeros_like(discarded)
