"""The metadata of a step file the Recorder writes: the step's scalars, exactly, and the facts
a reader checks the file against (format version, rank, counts)."""

from __future__ import annotations

import numpy as np

from stabledrl_cli.dump._schema import (
    COUNT_FIELDS,
    EXTENSION_FIELDS,
    META_FORMAT,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_RANK,
    META_SCORED_REWARDS,
    META_SCORED_TOKENS,
    META_SKETCH_SEED,
    META_WORLD_SIZE,
)
from stabledrl_cli.dump._versions import written_version


def step_metadata(
    tensors: dict[str, np.ndarray],
    values: dict[str, float],
    num_sequences: int,
    *,
    rank: int,
    world_size: int,
    sketch_seed: int | None,
) -> dict[str, str]:
    """The metadata of a step of `tensors` (a scalar step without `logp`), its scalars
    `values` and `num_sequences` sequences, recorded by `rank` of `world_size`; the sketch's
    Omega seed, `sketch_seed`, with a `unit_grad_sketch`."""
    scalar_step = "logp" not in tensors
    # repr of a float round-trips exactly; 'nan' and 'inf' parse back with float()
    metadata = {name: repr(value) for name, value in values.items()}
    mask = tensors.get("mask")
    extended = not tensors.keys().isdisjoint(EXTENSION_FIELDS)
    counted = not tensors.keys().isdisjoint(COUNT_FIELDS)
    metadata.update({
        META_FORMAT: written_version(extended, scalar_step, counted),
        META_RANK: str(rank),
        META_WORLD_SIZE: str(world_size),
        META_NUM_TOKENS: str(mask.shape[0] if mask is not None else 0),
        META_NUM_SEQUENCES: str(num_sequences),
        META_SCORED_TOKENS: str(np.count_nonzero(mask) if mask is not None else 0),
    })  # fmt: skip
    if "reward" in tensors:
        scored = np.count_nonzero(~np.isnan(tensors["reward"]))
        metadata[META_SCORED_REWARDS] = str(scored)
    if "unit_grad_sketch" in tensors and sketch_seed is not None:
        metadata[META_SKETCH_SEED] = str(sketch_seed)
    return metadata
