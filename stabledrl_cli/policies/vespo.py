"""VESPO (TRL `loss_type="vespo"`): a smooth gamma weight of the sequence ratio in place of a clip.

log w_i = clamp(sum over scored t of clamp(log r_t, -20, 20), log 1e-8, 20) (a sum, not GSPO's
mean), phi_i = exp(lambda + k log w_i - lambda w_i) = e^lambda w_i^k e^(-lambda w_i), with
(k, lambda) = (k_pos, lambda_pos) where A >= 0 and (k_neg, lambda_neg) where A < 0, lambda
floored at 1e-4 and a NaN or inf phi taken as 0, all as TRL. phi(1) = 1; phi is detached, so
J = sum_t sg(phi_i) A_t logp_t w_t / norm_t and coef_t = phi_i A_t w_t / norm_t.

Nothing is bounded by a hard rule: `discarded` marks the tokens whose phi is exactly 0 (TRL's
nan_to_num, or an underflow far from w = 1) and `clipped` the others whose weight is under half
the importance weight w_i it replaces (phi < w / 2, SAPO's soft reading of "the clip binds").
"""

from __future__ import annotations

import math

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import VESPOConfig
from stabledrl_cli.policies._masked import as_bytes, below
from stabledrl_cli.policies._prepared_batch import PreparedBatch

LOG_RATIO_CLAMP = 20.0
"""TRL clamps each token's log r to [-20, 20] before the sum, and the sum to [log 1e-8, 20]."""
LOG_W_MIN = math.log(1e-8)
LAMBDA_MIN = 1e-4
"""TRL floors lambda at 1e-4."""


def _phi(log_w: torch.Tensor, adv: torch.Tensor, cfg: VESPOConfig) -> torch.Tensor:
    """phi(w) elementwise, on the side of each entry's advantage (A >= 0: k_pos, lambda_pos)."""
    # A sum of two products with 0/1 flags picks each side's parameter exactly.
    negative = as_bytes(below(adv, 0.0)).to(log_w.dtype)
    positive = 1.0 - negative
    k = negative * cfg.k_neg + positive * cfg.k_pos
    lam = negative * max(cfg.lambda_neg, LAMBDA_MIN) + positive * max(cfg.lambda_pos, LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _sequence_log_w(prep: PreparedBatch) -> torch.Tensor:
    """[N] log w_i: the clamped sum of each sequence's clamped log r over its scored tokens
    (once per step: the policy and replay's TRL metric share it)."""

    def build() -> torch.Tensor:
        summed = prep.seq_sum(prep.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        return summed.clamp(LOG_W_MIN, LOG_RATIO_CLAMP)

    return prep.memo("vespo_log_w", build)


def gamma_weights(
    prep: PreparedBatch, adv: torch.Tensor, cfg: VESPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ([T] phi, [T] log w_i): each token's sequence weight on the side of its own A."""
    log_w = prep.per_token(_sequence_log_w(prep))
    return _phi(log_w, adv, cfg), log_w


def sequence_gamma_weights(
    prep: PreparedBatch, adv: torch.Tensor, cfg: VESPOConfig
) -> torch.Tensor:
    """[N] phi_i, one a sequence (TRL's `phi_seq`), on the side of the sequence's advantage (the
    sign of its scored tokens' sum; a row without scored tokens has w = 1, so phi = 1)."""
    return _phi(_sequence_log_w(prep), prep.seq_sum(adv), cfg)


class VESPOPolicy(TokenPolicy):
    """VESPO (arXiv:2602.10693; TRL `GRPOTrainer.get_gamma_weights`, `loss_type="vespo"`):
    `sg(phi_i) A logp / norm`, phi_i = e^lambda w_i^k e^(-lambda w_i), w_i the clamped
    sequence sum of log r. Never discards by a bound; phi = 0 is discarded, phi < w/2 clipped."""

    config: VESPOConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        phi, log_w = gamma_weights(prep, adv, self.config)
        dvalue = phi * adv
        value = dvalue * prep.logp
        discarded = phi == 0
        clipped = ~discarded & below(torch.log(phi) - log_w, -math.log(2.0))
        return value, dvalue, discarded, clipped
