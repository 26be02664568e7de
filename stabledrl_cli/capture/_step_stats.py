"""The gradient statistics of an optimizer step (`optimizer_hooks`), taken before the
optimizer touches the gradients."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from stabledrl_cli.capture import _fsdp1, _norms, bootstrap
from stabledrl_cli.capture._child_processes import ENV_HOOKS_RECORDER, descendant_stepped
from stabledrl_cli.capture._hook_state import (
    Clip,
    OptimizerView,
    Stats,
    fail,
    root_sum_squares,
    state,
    uninstall,
)
from stabledrl_cli.capture._optimizers import measured_view, optimizer_params, view_of
from stabledrl_cli.capture._param_names import module_names
from stabledrl_cli.capture._pending_clips import clip_totals, take_clips

TOP_MODULES = 5
"""How many modules' gradient norms each step records (the largest at that step)."""


def _holds_nonfinite(grad: torch.Tensor) -> bool:
    """Whether a gradient with a non-finite norm holds a NaN or an inf (not a finite overflow);
    a DTensor's norm is over all its shards, so only a NaN or inf can make it non-finite."""
    return _norms.is_dtensor(grad) or not bool(torch.isfinite(grad).all())


def _module_norms(named: Iterable[tuple[str | None, float]]) -> list[tuple[str, float]]:
    """The TOP_MODULES (module name, gradient norm) with the largest norms, non-finite first,
    from (parameter name or None, its gradient norm)."""
    squares: dict[str, float] = {}
    for name, norm in named:
        if name is not None:
            module = name.rpartition(".")[0] or name
            squares[module] = squares.get(module, 0.0) + norm * norm
    finite = sorted(
        ((m, math.sqrt(s)) for m, s in squares.items() if math.isfinite(s)),
        key=lambda item: (-item[1], item[0]),
    )
    nonfinite = sorted((m, math.sqrt(s)) for m, s in squares.items() if not math.isfinite(s))
    return (nonfinite + finite)[:TOP_MODULES]


def _step_params(
    optimizer: Optimizer, view: OptimizerView
) -> tuple[list[int], list[torch.Tensor], dict[int, _fsdp1.Shard]]:
    """(group index of each, the parameters a step measures, id -> FSDP1 Shard): those with a
    gradient, and every FSDP1 shard (a rank that holds none of one still sums it)."""
    if view.shards is None:
        every = list(optimizer_params(optimizer))
        view.shards = _fsdp1.optimizer_shards(every)
    shards = view.shards
    groups: list[int] = []
    params: list[torch.Tensor] = []
    for g, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            if param.grad is not None or id(param) in shards:
                groups.append(g)
                params.append(param)
    return groups, params, shards


def _stats(optimizer: Optimizer, view: OptimizerView) -> Stats:
    """The step's gradient statistics, before the optimizer touches the gradients. The
    step's collective is made even when measuring fails, flagged as this rank's stop, and the
    hooks go (`_norms.whole_norms`)."""
    groups, params, shards = _step_params(optimizer, view)
    clips: list[Clip] = []
    seen: dict[int, float] = {}
    local: dict[int, list[float]] = {}
    unreduced: dict[int, torch.Tensor] = {}
    held_nonfinite: set[int] = set()
    failure: Exception | None = None
    state.l2_total = None
    try:
        clips = take_clips(view)
        for clip in clips:
            seen.update(clip.norms)
            local.update(clip.local)
            unreduced.update(clip.unreduced)
            held_nonfinite |= clip.nonfinite
        missing = [
            p for p in params if id(p) not in local and (id(p) in shards or id(p) not in seen)
        ]
        plain, held = _norms.measure(missing, shards)
        seen.update(plain)
        local.update(held)
    except Exception as exc:
        failure = exc
    whole = _norms.whole_norms(params, shards, local, unreduced=unreduced, stop=failure is not None)
    if failure is not None:
        uninstall()
        raise failure
    parts = {
        key: list(zip(shards[key].names, norms, strict=True))
        for key, norms in whole.items()
        if key in shards
    }
    for key, norms in whole.items():
        seen[key] = root_sum_squares(norms)
    norms = [seen[id(p)] for p in params]
    plain_norms = [(p, n) for p, n in zip(params, norms, strict=True) if id(p) not in parts]
    pieces = [piece for key in parts for piece in parts[key]]
    nonfinite = sum(
        1
        for param, norm in plain_norms
        if not math.isfinite(norm)
        and (
            id(param) in held_nonfinite or (param.grad is not None and _holds_nonfinite(param.grad))
        )
    ) + sum(1 for _, norm in pieces if not math.isfinite(norm))
    group_squares: list[float | None] = [None] * len(optimizer.param_groups)
    for g, norm in zip(groups, norms, strict=True):
        group_squares[g] = (group_squares[g] or 0.0) + norm * norm
    names = module_names(optimizer, view)
    totals = clip_totals(clips, seen)
    clipped = root_sum_squares(totals) if len(totals) > 1 else next(iter(totals), None)
    if clipped is None and params:
        clipped = root_sum_squares(norms)
    scale, skipped = _amp_state(optimizer)
    modules = _module_norms([*((names.get(id(p)), n) for p, n in plain_norms), *pieces])
    return Stats(
        grad_norm=clipped / scale if clipped is not None else None,
        nonfinite=nonfinite,
        lrs=[_group_lr(group) for group in optimizer.param_groups],
        group_norms=[math.sqrt(s) / scale if s is not None else None for s in group_squares],
        module_norms=[(module, norm / scale) for module, norm in modules],
        skipped=skipped,
    )


def _group_lr(group: dict[str, Any]) -> float | None:
    """A parameter group's learning rate: a number or a one-element tensor (a capturable
    optimizer's); None for a group without one, or whose `lr` is something else
    (transformers' Adafactor with its relative step keeps None there)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and not lr.is_complex():
        return float(lr)
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return float(lr)
    return None


def _amp_state(optimizer: Optimizer) -> tuple[float, bool]:
    """(the factor its gradients are scaled by, whether its step() skips the update) for an
    optimizer that unscales inside its step() (`_step_supports_amp_scaling`: torch's fused
    Adam, AdamW, SGD): a GradScaler hands it the scale and the inf it found as the
    `grad_scale` and `found_inf` attributes for the length of the step. Else (1.0, False):
    the scaler unscaled the gradients itself and calls no step() it skips."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return 1.0, False
    scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    return 1.0 if scale is None else float(scale), found_inf is not None and bool(found_inf)


def _leave(optimizer: Optimizer) -> None:
    """The first step after this rank stopped recording: the step's collective of a sharded
    run, flagged as its stop (the other ranks stop with it, at this step), then the hooks
    go."""
    try:
        _, params, shards = _step_params(optimizer, view_of(optimizer))
        _norms.whole_norms(params, shards, {}, stop=True)
    finally:
        uninstall()


def step_stats(optimizer: Optimizer) -> Stats | None:
    """The statistics of the step `optimizer` is about to take, or None when recording is off
    here (`_leave`) or this process was started from the recording one
    (`_child_processes.ENV_HOOKS_RECORDER`)."""
    if not bootstrap.hooks_wanted():
        _leave(optimizer)
        return None
    recording = os.environ.get(ENV_HOOKS_RECORDER, "")
    if recording.isdigit() and int(recording) != os.getpid():
        fail(descendant_stepped(int(recording)), "an optimizer step in a child process")
        uninstall()
        return None
    return _stats(optimizer, measured_view(optimizer))
