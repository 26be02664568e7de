"""Gradient norms for the optimizer hooks: each gradient's norm as this rank holds it
(`measure`), and the whole norms of sharded gradients, summed over the ranks in the step's one
collective, which carries this rank's stop flag (`whole_norms`, `_ranks.reduce`).

Sharded gradients: an FSDP1 shard's (`_fsdp1.Shard`: parts of one or more original parameters,
summed over its process group) and a DTensor (FSDP2's `fully_shard`, tensor parallelism): its
local shard, summed over the mesh dimensions it is sharded on. A DTensor with a Partial
placement (not reduced yet) is reduced whole by DTensor itself, once the flagged collective
has shown that every rank goes on; a clip, which scales it in place before the step, first
copies its local tensor (`unreduced_copies`), and the copy is reduced instead.

Nothing here imports torch.distributed.tensor: it is looked up in `sys.modules`, where a script
with DTensor gradients has put it (importing it would cost every recorded process a second).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from stabledrl_cli.capture._fsdp1 import Shard
from stabledrl_cli.capture._ranks import Reduction, reduce

DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensors() -> Any:
    return sys.modules.get(DTENSOR_MODULE)


def is_dtensor(tensor: object) -> bool:
    """Whether `tensor` is a DTensor (False at once in a process that never imported them)."""
    module = _dtensors()
    return module is not None and isinstance(tensor, module.DTensor)


def _is_partial(grad: Any) -> bool:
    """Whether a DTensor has a Partial placement (its ranks' local tensors sum to it)."""
    return any(p.is_partial() for p in grad.placements)


@torch.no_grad()
def gradient_norms(grads: list[torch.Tensor]) -> list[float]:
    """The L2 norm of each tensor (any shapes; plain tensors, e.g. a DTensor's local shard),
    accumulated in float32 (float64 for float64 tensors), as Python floats: one host sync per
    device and dtype. A complex tensor's norm is that of its real and imaginary parts."""
    by_kind: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
    for i, grad in enumerate(grads):
        by_kind.setdefault((grad.device, grad.dtype, grad.is_sparse), []).append(i)
    out = [0.0] * len(grads)
    for (_, dtype, sparse), indices in by_kind.items():
        wide = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
        tensors = [grads[i] for i in indices]
        if sparse:
            tensors = [t.coalesce().values() for t in tensors]
        if dtype.is_complex:
            tensors = [torch.view_as_real(t) for t in tensors]
        norms = torch._foreach_norm(tensors, 2, dtype=wide)
        for i, value in zip(indices, torch.stack(norms).tolist(), strict=True):
            out[i] = value
    return out


@dataclass(frozen=True)
class Sharding:
    """How a sharded parameter's gradient norms are summed over the ranks."""

    reduction: Reduction
    count: int
    """How many whole norms it has: its FSDP1 shard's original parameters, 1 for a DTensor."""
    partial: bool = False
    """A DTensor with a Partial placement: the collective carries only the flag, then DTensor
    reduces the gradient whole."""


@functools.cache
def _mesh_reduction(mesh: Any, sharded: tuple[bool, ...]) -> Reduction:
    """A SUM over each mesh dimension a DTensor is sharded on, a MAX over the others, on the
    mesh's device type (where its collectives run, even for gradients offloaded elsewhere)."""
    ops = [dist.ReduceOp.SUM if on else dist.ReduceOp.MAX for on in sharded]
    steps = tuple((mesh.get_group(dim), op) for dim, op in enumerate(ops))
    return Reduction(torch.device(mesh.device_type), steps)


def sharding(param: torch.Tensor, shards: dict[int, Shard]) -> Sharding | None:
    """How `param`'s gradient norms are summed over the ranks, or None for a plain one (an
    FSDP1 shard without a gradient still has one: its rank takes part in the collective)."""
    shard = shards.get(id(param))
    if shard is not None:
        return Sharding(shard.reduction, len(shard.names))
    grad: Any = param.grad
    if not is_dtensor(grad):
        return None
    partial = _is_partial(grad)
    sharded = tuple(p.is_shard() and not partial for p in grad.placements)
    return Sharding(_mesh_reduction(grad.device_mesh, sharded), 0 if partial else 1, partial)


def _parts(param: torch.Tensor, shards: dict[int, Shard]) -> list[torch.Tensor] | None:
    """What this rank holds of a sharded parameter's gradient (an FSDP1 shard's parts, a
    DTensor's local shard, [] for a Partial one), or None for a plain parameter."""
    shard = shards.get(id(param))
    if shard is not None:
        return shard.parts(param)
    grad: Any = param.grad
    if not is_dtensor(grad):
        return None
    return [] if _is_partial(grad) else [grad.to_local()]


def measure(
    params: Iterable[torch.Tensor], shards: dict[int, Shard]
) -> tuple[dict[int, float], dict[int, list[float]]]:
    """(id(parameter) -> its gradient's norm, for plain gradients; id(parameter) -> the local
    norms of its parts, for sharded ones), all measured together (`gradient_norms`).
    Parameters without a gradient are left out, except FSDP1 shards ([] each)."""
    plain: list[tuple[int, torch.Tensor]] = []
    held: list[tuple[int, list[torch.Tensor]]] = []
    for param in params:
        parts = _parts(param, shards)
        if parts is not None:
            held.append((id(param), parts))
        elif param.grad is not None:
            plain.append((id(param), param.grad))
    norms = iter(gradient_norms([g for _, g in plain] + [t for _, ts in held for t in ts]))
    return (
        {key: next(norms) for key, _ in plain},
        {key: [next(norms) for _ in parts] for key, parts in held},
    )


@torch.no_grad()
def unreduced_copies(params: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """id(parameter) -> a copy of its gradient, for each one that is a DTensor with a Partial
    placement: a copy of its local tensor (no collective; its memory is held until the
    step), to be reduced whole at the step (`whole_norms`) as it was before a clip."""
    copies: dict[int, torch.Tensor] = {}
    for param in params:
        grad: Any = param.grad
        if is_dtensor(grad) and _is_partial(grad):
            copies[id(param)] = _dtensors().DTensor.from_local(
                grad.to_local().clone(), grad.device_mesh, grad.placements,
                shape=grad.shape, stride=grad.stride(),
            )  # fmt: skip
    return copies


def whole_norms(
    params: list[torch.Tensor],
    shards: dict[int, Shard],
    local: dict[int, list[float]],
    *,
    unreduced: dict[int, torch.Tensor] | None = None,
    stop: bool = False,
) -> dict[int, list[float]]:
    """id(parameter) -> the whole norms of its parts (an FSDP1 shard's original parameters, a
    DTensor's one), for the sharded ones among `params` (the same on every rank): their
    `local` norms (zeros for those missing) summed over the ranks in the step's collective
    (`_ranks.reduce`: RankStopped when another rank stopped); a Partial DTensor is then
    reduced whole by DTensor: its copy in `unreduced` (taken before a clip:
    `unreduced_copies`) when there is one, else its gradient. {} at once without a sharded
    parameter; {} when `stop` (this rank's last collective, flagged)."""
    layout = [(p, how) for p in params if (how := sharding(p, shards)) is not None]
    if not layout:
        return {}
    entries = [
        (how.reduction, (None if stop else local.get(id(p))) or [0.0] * how.count)
        for p, how in layout
    ]
    summed = reduce(entries, stop=stop)
    if stop:
        return {}
    out = {id(p): norms for (p, _), norms in zip(layout, summed, strict=True)}
    copies = unreduced or {}
    for param, how in layout:
        if how.partial:
            grad: Any = copies.get(id(param), param.grad)
            out[id(param)] = [float(torch.linalg.vector_norm(grad.full_tensor().float()))]
    return out
