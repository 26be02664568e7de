"""One optimizer step's arrays as given (`PolicyBatch`), before `prepare` makes them the
`PreparedBatch` every policy consumes.

Shapes and defaults of `PolicyBatch`:
- `logp`, `logp_old`: [T] (flat) or [B, L]; `[B, L]` is flattened row-major and every output
  is [T] = [B * L] in that order.
- `advantages`: same shape as `logp`, or [B] or [B, 1] (one per row) with [B, L] `logp`.
- `mask`: same shape as `logp`, nonzero = scored; default all ones. Unscored tokens get
  `coef = 0` whatever their values (padding may hold anything).
- `seq_id`: [T] (or [B, L]) integer sequence of each token. Default: the row index for
  [B, L] input; for flat input each token is its own sequence, which is what runs recorded
  with `unit: sequence` give (one entry per sequence). When `group_id` or `reward` is given,
  seq_id indexes them and must lie in [0, N); otherwise any integers, densified in sorted order.
- `group_id`: [N] per sequence; default: one group.
- `reward`: [N] per sequence (needed by `adv=center|zscore|rloo`).
- `micro_batch`: [N] per sequence, the micro-batch of the optimizer step it was in (any
  integers); default: the step is one micro-batch (`agg=micro-token-mean` and
  `agg=seq-mean-token-sum-norm` normalize per micro-batch).
- `group_split`: [N] per sequence, nonzero where the sequence's prompt group is known to be
  split across optimizer steps or ranks: `adv=center|zscore|rloo` refuses to recompute a
  baseline from such a group's part (it would silently treat one group as two).
- `logp_ref`, `loss_weight`, `loss_scale`: same shape as `logp`; `loss_scale` may also be one
  number (a 0-d tensor, say `completion_length.sum()`), the normaliser of every unit, as
  `Recorder.log_step` takes it.
- `unit`: "token" or "sequence" (what one entry is; see docs/run-format.md). Under "sequence"
  each entry is a whole sequence: a `seq_id` that repeats is refused (InputError).
- `ranks`: how many data-parallel ranks' files the step joins (a run's `world_size`, 1 to
  4096); default 1. A loss each rank sums over its own micro-batches (`gmpo:mean=micro`) is
  averaged over them, as the ranks' gradient all-reduce averages.
- `rank`: [N] per sequence, the data-parallel rank in [0, ranks) whose part of the step the
  sequence was in, for a step whose ranks each normalised their loss over their own part (a
  run recorded with `loss_norm="per_rank"`); default None: the normalisers count the whole
  step. Given, every `agg` normaliser is counted over each rank's part alone and multiplied by
  `ranks` (each rank's mean, averaged over the ranks as the all-reduce does), and a
  micro-batch is one rank's: a rank's part is one micro-batch without a `micro_batch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stabledrl_cli.vocab import Unit

ArrayLike = torch.Tensor | np.ndarray[Any, Any] | Sequence[float] | float
"""What a batch field accepts: a torch tensor (any device), a numpy array, a list, a scalar."""


@dataclass(frozen=True, kw_only=True)
class PolicyBatch:
    """One step's arrays: torch tensors (any device) or numpy arrays of real numbers.
    `Policy.weights` (`prepare`) raises InputError naming the field for shapes that disagree,
    ids out of range, and an array of text, objects or complex values, a sparse one, or a
    tensor on the meta device."""

    logp: ArrayLike
    """log pi_theta of each scored unit: [T] or [B, L]."""
    logp_old: ArrayLike
    """log pi_old (the sampler, or its recompute): same shape as logp."""
    advantages: ArrayLike
    """Per token (same shape as logp) or per row ([B] with [B, L] logp)."""
    mask: ArrayLike | None = None
    """Nonzero = scored; default all ones."""
    seq_id: ArrayLike | None = None
    """[T] sequence of each token; default row index ([B, L]) or one sequence a token (flat)."""
    group_id: ArrayLike | None = None
    """[N] group (prompt) of each sequence; default one group."""
    logp_ref: ArrayLike | None = None
    """log pi_ref, for the KL term (beta > 0)."""
    logp_rollout: ArrayLike | None = None
    """log pi of the rollout engine (vLLM, SGLang), for the rollout correction (tis=...)."""
    reward: ArrayLike | None = None
    """[N] reward of each sequence, for adv=center|zscore|rloo."""
    loss_weight: ArrayLike | None = None
    """Per-token multiplier the run applied to each token's term; default 1."""
    loss_scale: ArrayLike | None = None
    """Per-token normalizer the run actually used (agg=recorded), or one number for every
    token."""
    micro_batch: ArrayLike | None = None
    """[N] micro-batch of each sequence within the step; default one micro-batch."""
    group_split: ArrayLike | None = None
    """[N] nonzero where the sequence's group is split across steps or ranks."""
    unit: Unit = "token"
    """What one entry is: "token", or "sequence" for sequence-level likelihood estimators."""
    ranks: int = 1
    """Data-parallel ranks whose micro-batches the step joins (a run's world_size)."""
    rank: ArrayLike | None = None
    """[N] data-parallel rank of each sequence, when each rank normalised its own loss."""
