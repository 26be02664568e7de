"""The two references of the catalogue, under the same aggregation as any policy.

- `is`: plain importance sampling, J = sum_t r_t A_t / norm_t: nothing clipped or discarded. The
  reference for "how much gradient was thrown away".
- `reinforce` (verl `gpg`): J = sum_t A_t logp_t / norm_t, coef = A / norm, no ratio at all.
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._masked import ratio_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch


class ISPolicy(TokenPolicy):
    """Plain importance sampling, `r A / norm`: nothing clipped or discarded; the reference
    for the gradient other policies throw away."""

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        value = ratio_times(prep.ratio, adv)
        never = torch.zeros_like(prep.mask)
        return value, value, never, never


class ReinforcePolicy(TokenPolicy):
    """REINFORCE / GPG (verl `compute_policy_loss_gpg`): `A logp / norm`, coef = A / norm,
    no ratio."""

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        never = torch.zeros_like(prep.mask)
        return adv * prep.logp, adv, never, never
