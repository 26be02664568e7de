"""SAPO (TRL `loss_type="sapo"`): a soft, smooth gate instead of a hard clip.

f(r) = sigmoid(tau (r - 1)) * 4 / tau, per token term f(r) A, tau = tau_pos for A > 0 and
tau_neg otherwise; coef = A * 4 s (1 - s) * r with s = sigmoid(tau (r - 1)). It never zeroes a
gradient by rule (only float underflow of s (1 - s) can). `clipped` marks the tokens whose gate
removed more than half of the importance-sampling weight: 4 s (1 - s) < 1/2, i.e.
tau |r - 1| > 1.763 (SAPO has no hard band; this is its soft analogue of "the clip binds").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import SAPOConfig
from stabledrl_cli.policies._masked import above, as_bytes
from stabledrl_cli.policies._prepared_batch import PreparedBatch

# The gate 4 s (1 - s) is 1 at r = 1; below this it has removed over half of r's weight.
CLIPPED_GATE = 0.5


class SAPOPolicy(TokenPolicy):
    """SAPO (TRL `loss_type="sapo"`): `sigmoid(tau (r-1)) 4/tau A / norm`, tau = tau_pos for
    A > 0 else tau_neg; coef = 4 s (1-s) r A / norm. Never discards by rule."""

    config: SAPOConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        ratio = prep.ratio
        # tau_pos where A > 0, else tau_neg: a sum of two products with 0/1 flags is exact.
        positive = as_bytes(above(adv, 0.0)).to(ratio.dtype)
        tau = positive * cfg.tau_pos + (1 - positive) * cfg.tau_neg
        x = tau * (ratio - 1.0)
        # The gate 4 s (1 - s) and the coefficient 4 s (1 - s) r A in log space: as r grows,
        # s (1 - s) underflows and r overflows, but their product tends to 0 (never 0 * inf).
        log_gate = math.log(4.0) + F.logsigmoid(x) + F.logsigmoid(-x)
        gate = torch.exp(log_gate)
        value = torch.sigmoid(x) * 4.0 / tau * adv
        dvalue = adv * torch.exp(log_gate + prep.log_ratio)
        clipped = gate < CLIPPED_GATE
        return value, dvalue, torch.zeros_like(clipped), clipped
