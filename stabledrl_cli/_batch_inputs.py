"""What a policy batch's arrays may be given as, shared by the Recorder (`dump._inputs`) and
`prepare` (`policies._prepare`). Nothing here imports torch: a Recorder given numpy arrays
does not load it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    import torch

WORLD_SIZE_LIMIT = 4096
"""The most ranks a run may have (a Recorder's world_size; a larger one in a manifest is
corrupt) and so a policy batch may come from (`PolicyBatch.ranks`)."""


def is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """Whether `value` is a torch tensor: never when torch is not loaded (a Recorder given
    numpy arrays does not load it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def stack_tensors(value: object) -> torch.Tensor | None:
    """A list or tuple of torch tensors (a loop's per-sequence ELBOs, 0-d and still in the
    autograd graph; rows of one length) as the one tensor they stack into, detached, on the
    first one's device (a number among them too); None for anything else (checked by its first
    item). numpy cannot read such a list when a tensor requires grad, is bfloat16 or is off
    the CPU. torch's RuntimeError or TypeError for items that do not stack (shapes or devices
    that differ, text)."""
    if not isinstance(value, list | tuple) or not value or not is_tensor(value[0]):
        return None
    loaded = sys.modules["torch"]  # (loaded: the list holds a tensor)
    device = value[0].device
    items = [
        item.detach() if is_tensor(item) else loaded.as_tensor(item, device=device)
        for item in value
    ]
    stacked: torch.Tensor = loaded.stack(items)
    return stacked


def rows_of_entries(shape: tuple[int, ...]) -> str:
    """Why a [B, L] logp (L > 1) without seq_id cannot be a unit 'sequence' step: each of its
    rows would be one sequence of L entries, where such a step has one entry a sequence (a
    [1, N] ELBO given without its [0], or an [N, K] of K Monte Carlo masks' estimates, whose
    mean over the masks is the sequence's estimate), or a loop's [B, L] per-token log-probs,
    which are unit 'token'."""
    masks = f"the mean over its {shape[1]} masks of an [N, K] of Monte Carlo estimates"
    example = "per_seq_elbo[0] of a [1, N] ELBO" if shape[0] == 1 else f"{masks}, .mean(-1)"
    tokens = "" if shape[0] == 1 else "; per-token log-probs are unit 'token'"
    return (
        f"logp: shape {list(shape)} holds {shape[1]} entries a row, but unit 'sequence' "
        f"records one entry a sequence: pass [N] arrays, one per sequence ({example}), or "
        f"seq_id{tokens}"
    )
