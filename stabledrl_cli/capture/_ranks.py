"""The collective the optimizer hooks make at a step of a sharded run (FSDP1 shards, DTensor
gradients): whole norms summed from the ranks' local ones, carrying each rank's stop flag.

Every rank makes it at the same step, with the same vectors in the same order. A rank that
stops recording makes it one last time, flagged (`stop=True`); the other ranks see the flag
in that same collective, raise RankStopped and stop recording too, so that no rank ever
waits for a collective the others no longer make, and the training's own collectives go on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class RankStopped(Exception):
    """Another rank stopped recording: this one stops too, at the same step, so that no rank
    waits for a collective the others no longer make."""


@dataclass(frozen=True)
class Reduction:
    """How the squared local norms of a sharded gradient's parts become whole ones: an
    all_reduce over each (process group, op) in turn (SUM over ranks that hold different
    parts, MAX over ranks that hold copies: the values stay, the stop flag spreads)."""

    device: torch.device
    """Where the groups' collectives run."""
    steps: tuple[tuple[Any, Any], ...]
    """(torch.distributed.ProcessGroup, torch.distributed.ReduceOp) pairs."""


def reduce(
    local: Sequence[tuple[Reduction, list[float]]], *, stop: bool = False
) -> list[list[float]]:
    """Whole L2 norms from local ones: for each entry (its Reduction, the local norms of its
    parts), the square root of its squares reduced over the ranks, in float64; one vector
    per distinct Reduction, in the order they first appear (the same on every rank). Each
    vector carries a flag: `stop` tells the other ranks that this one stops recording (it
    returns []); another rank's flag raises RankStopped, once every vector is reduced."""
    by_reduction: dict[Reduction, list[int]] = {}
    for i, (how, _) in enumerate(local):
        by_reduction.setdefault(how, []).append(i)
    out: list[list[float]] = [[] for _ in local]
    others_stopped = False
    for how, indices in by_reduction.items():
        squares = [norm * norm for i in indices for norm in local[i][1]]
        vector = torch.tensor([*squares, float(stop)], dtype=torch.float64, device=how.device)
        for group, op in how.steps:
            dist.all_reduce(vector, op=op, group=group)
        values = vector.tolist()
        others_stopped |= values[-1] > float(stop)
        offset = 0
        for i in indices:
            count = len(local[i][1])
            out[i] = [math.sqrt(v) for v in values[offset : offset + count]]
            offset += count
    if stop:
        return []
    if others_stopped:
        raise RankStopped("another rank stopped recording")
    return out
