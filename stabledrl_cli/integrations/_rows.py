"""What an integration records of a step's padded [B, L] token rows (framework-free)."""

from __future__ import annotations

import torch


def every_row(kept: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: `kept` plus the first position of each row that keeps no token, so that
    every sequence stays in the step (its reward and group, the rows a "rows=all" policy
    counts) with one token that its mask, 0 on the whole row, leaves unscored. A row keeps
    none when the framework masked it whole: TRL's `mask_truncated_completions`, a verl
    response without a scored token."""
    empty = ~kept.any(dim=-1)
    if kept.shape[-1] == 0 or not bool(empty.any()):
        return kept
    kept = kept.clone()
    kept[empty, 0] = True
    return kept
