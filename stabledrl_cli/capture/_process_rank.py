"""The rank this process of the command runs as, for its run and its lines on stderr."""

from __future__ import annotations

import os
import sys

from stabledrl_cli.errors import UsageError, quoted

ENV_TORCH_RANK = "RANK"
ENV_TORCH_WORLD_SIZE = "WORLD_SIZE"


_group_rank: dict[str, int] = {}
"""The default process group's rank and world size, once seen (`launcher_rank`): a rank
that destroys its group at its end, as torch asks, still names itself at exit."""


def rank_prefix() -> str:
    """`rank R: ` for a line on stderr of one rank of a run of several (`launcher_rank`),
    which tells the ranks' lines apart; else '' (also for a RANK that is no integer)."""
    try:
        ranks = launcher_rank()
    except UsageError:
        return ""
    return f"rank {ranks['rank']}: " if ranks.get("world_size", 1) > 1 else ""


def launcher_rank() -> dict[str, int]:
    """{"rank", "world_size"} from torch.distributed's RANK and WORLD_SIZE (set by torchrun),
    else from the default process group this process initialized (ranks that
    torch.multiprocessing.spawn started, which gave init_process_group their rank
    themselves; once destroyed, the one it had), else {} (one process). A value that is not
    an integer is a UsageError."""
    rank, world_size = os.environ.get(ENV_TORCH_RANK), os.environ.get(ENV_TORCH_WORLD_SIZE)
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")  # (never imported here)
        if dist is not None and dist.is_available() and dist.is_initialized():
            _group_rank.update(rank=dist.get_rank(), world_size=dist.get_world_size())
        return dict(_group_rank)
    try:
        return {"rank": int(rank), "world_size": int(world_size)}
    except ValueError:
        raise UsageError(
            f"{ENV_TORCH_RANK}={quoted(rank)} and {ENV_TORCH_WORLD_SIZE}={quoted(world_size)} must "
            "be integers"
        ) from None
