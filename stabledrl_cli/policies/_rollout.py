"""The rollout correction every policy can take (`tis=...`): reweighting each token by how far
the rollout engine's sampler (vLLM, SGLang) was from the trainer's pi_old.

w = exp(logp_old - logp_rollout) per token, or per sequence exp(sum over its scored tokens of
the same), then truncated to [tis_min, tis_max] (`*-truncate`: TRL token_truncate /
sequence_truncate, verl rollout_is with a threshold) or zeroed outside it (`*-mask`: TRL
token_mask / sequence_mask, verl's IcePop "lower_upper" threshold). The weight is detached:
it multiplies each token's loss_weight, as TRL multiplies `per_token_loss` and verl its
`pg_losses` by it. A difference whose rollout log-prob is NaN counts as 0 (weight 1), as in
TRL. Meant for runs recorded without a correction in their loss_weight (else it applies
twice).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._config import BaseConfig
from stabledrl_cli.policies._masked import above, below
from stabledrl_cli.policies._prepared_batch import PreparedBatch


def rollout_weight(prep: PreparedBatch, config: BaseConfig) -> torch.Tensor:
    """[T] the correction w of each token (1 where nothing is corrected)."""
    if prep.logp_rollout is None:
        raise UsageError(
            f"tis={config.tis} needs the recorded `logp_rollout`, which this batch lacks"
        )
    diff = torch.nan_to_num(prep.logp_old - prep.logp_rollout, nan=0.0)
    diff = torch.where(prep.mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    if config.tis.startswith("sequence"):
        diff = prep.per_token(prep.seq_sum(diff))
    weight = torch.exp(diff)
    low = -math.inf if config.tis_min is None else config.tis_min
    high = math.inf if config.tis_max is None else config.tis_max
    if config.tis.endswith("truncate"):
        return weight.clamp(min=None if config.tis_min is None else low, max=high)
    outside = below(weight, low) | above(weight, high)
    return torch.where(outside, torch.zeros((), dtype=weight.dtype, device=weight.device), weight)


def rollout_corrected(prep: PreparedBatch, config: BaseConfig) -> PreparedBatch:
    """The batch with each token's loss_weight multiplied by the correction (no-op when off)."""
    if config.tis == "off":
        return prep
    return dataclasses.replace(prep, loss_weight=prep.weight * rollout_weight(prep, config))
