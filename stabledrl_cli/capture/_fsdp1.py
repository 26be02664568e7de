"""FSDP1 (`torch.distributed.fsdp.FullyShardedDataParallel`) for the optimizer hooks: which of an
optimizer's parameters are shards, and how the whole gradient norm of each original parameter
is summed.

Under a sharded strategy an optimizer holds, on each rank, this rank's shard of every
`FlatParameter` (`use_orig_params=False`: one flattened parameter per FSDP instance, holding
parts of several original parameters) or a flattened view of this rank's part of each original
parameter (`use_orig_params=True`: empty on ranks that hold none of it). A gradient's local norm
is a partial one: the whole norm of an original parameter sums its parts' squares over the
handle's process group (`Shard.reduction`, made by `_ranks.reduce`).

Nothing here imports torch.distributed.fsdp: the module is looked up in `sys.modules`, where a
script that uses FSDP1 has put it.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stabledrl_cli.capture._ranks import Reduction

FSDP_MODULE = "torch.distributed.fsdp"
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_FLAGS = ("_is_flat_param", "_fsdp_flattened")
"""Attributes FSDP1 sets on its FlatParameters and on the original parameters it flattened."""


def clean_name(name: str) -> str:
    """A parameter's name without FSDP1's and activation checkpointing's wrapper segments:
    `_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.weight` -> `layers.0.weight`."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class Shard:
    """What one optimizer parameter holds of an FSDP1 instance's sharded FlatParameter on this
    rank: parts of one or more original parameters."""

    reduction: Reduction
    """A sum over the process group the FlatParameter is sharded over, on the FSDP instance's
    compute device."""
    names: tuple[str, ...]
    """The original parameters' qualified names (wrapper segments removed)."""
    bounds: tuple[tuple[int, int], ...]
    """Each original parameter's [start, stop) in this rank's flattened gradient (empty when
    this rank holds none of it)."""

    def parts(self, param: torch.Tensor) -> list[torch.Tensor]:
        """Each original parameter's part of `param.grad` (flat views; empty ones for a rank
        that holds none of it), or [] when `param` has no gradient."""
        if param.grad is None:
            return []
        flat = param.grad.reshape(-1)
        return [flat[start:stop] for start, stop in self.bounds]


_roots: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Shard]] = weakref.WeakKeyDictionary()


def shards_of(root: torch.nn.Module) -> dict[int, Shard]:
    """id(parameter) -> its Shard, for the parameters of the FSDP1 instances in `root` (itself
    included) that use a sharded strategy; names are relative to `root`. Cached per root."""
    known = _roots.get(root)
    if known is not None:
        return known
    fsdp = sys.modules[FSDP_MODULE].FullyShardedDataParallel
    out: dict[int, Shard] = {}
    for prefix, module in root.named_modules():
        handle = getattr(module, "_handle", None) if isinstance(module, fsdp) else None
        if handle is None or not handle.uses_sharded_strategy:
            continue
        flat = handle.flat_param
        names = [clean_name(f"{prefix}.{fqn}" if prefix else fqn) for fqn in flat._fqns]
        bounds = [
            (info.offset_in_shard, info.offset_in_shard + info.numel_in_shard)
            if info.in_shard
            else (0, 0)
            for info in flat._shard_param_infos
        ]
        summed = Reduction(handle.device, ((handle.process_group, dist.ReduceOp.SUM),))
        if handle._use_orig_params:
            for param, name, (start, stop) in zip(flat._params, names, bounds, strict=True):
                out[id(param)] = Shard(summed, (name,), ((0, stop - start),))
        else:
            out[id(flat)] = Shard(summed, tuple(names), tuple(bounds))
    _roots[root] = out
    return out


def optimizer_shards(params: Iterable[torch.Tensor]) -> dict[int, Shard]:
    """id(parameter) -> Shard for those of an optimizer's parameters that are FSDP1 shards;
    {} at once when the process has not imported FSDP1 or no parameter carries its marks
    (else one scan of the objects alive for the FSDP1 instances)."""
    params = list(params)
    module = sys.modules.get(FSDP_MODULE)
    if module is None or not any(getattr(p, f, False) for p in params for f in _FLAGS):
        return {}
    fsdp = module.FullyShardedDataParallel
    instances = [obj for obj in gc.get_objects() if issubclass(type(obj), fsdp)]
    nested = {id(m) for f in instances for m in f.modules() if m is not f}
    found: dict[int, Shard] = {}
    for root in instances:
        if id(root) not in nested:
            found.update(shards_of(root))
    return {id(p): found[id(p)] for p in params if id(p) in found}
