"""The end of an optimizer step (`optimizer_hooks`): the step recorded, as the run
optimizer's or summarised for the next one of it as another optimizer's."""

from __future__ import annotations

import time
from typing import Any

from torch.optim.optimizer import Optimizer

from stabledrl_cli.capture import bootstrap
from stabledrl_cli.capture._hook_state import OtherSteps, Stats, fail, state
from stabledrl_cli.capture._optimizers import is_run_optimizer, view_of
from stabledrl_cli.capture._pending_clips import take_clips
from stabledrl_cli.capture._step_stats import step_stats


def nested(optimizer: Optimizer) -> bool:
    """Whether `optimizer`'s step() runs inside another optimizer's in this thread: a wrapper's
    (ZeroRedundancyOptimizer's local optimizer, which holds this rank's shard of the
    parameters; SAM's base optimizer). The wrapper's step is the loop's, and the one
    recorded; this one is part of it."""
    outer = getattr(state.under_way, "step", None)
    return outer is not None and outer() not in (None, optimizer)


def outer_step_ends(optimizer: Optimizer) -> bool:
    """Whether `optimizer`'s step(), ending, is no other's part (`nested`): then no step is
    under way in this thread any more."""
    if nested(optimizer):
        return False
    state.under_way.step = None
    return True


def finish_step(optimizer: Optimizer, *, skipped: bool, measured: bool = False) -> None:
    """Records the step `optimizer` just took, or that was `skipped`: by a GradScaler or the
    guard (no hook ran: its statistics are taken now, from the unscaled gradients found), or
    as its step() raised (`measured`: the pre-hook took them, `_step_watchers._raised`)."""
    step = state.next_step
    try:
        view = view_of(optimizer)
        view.stepping = False
        if (skipped and not measured) or view.awaiting:  # (a closure never called: now)
            view.awaiting = False
            stats = step_stats(optimizer)
        else:
            stats, view.pending = view.pending, None
        if not skipped:
            view.steps_taken += 1
        if view.closure:  # the clips of the closure's later calls are not the next step's
            view.closure = False
            take_clips(view)
        end = time.perf_counter()
        step_time = end - view.last_end if view.last_end is not None else None
        view.last_end = end
        if stats is None:
            return
        if not is_run_optimizer(optimizer):
            other = state.others.setdefault(view.index, OtherSteps(stats))
            other.last, other.steps = stats, other.steps + 1
            other.skipped += skipped or stats.skipped
            return
        fields = _step_fields(stats, step_time)
        if skipped or stats.skipped:
            fields["scalars"]["optimizer_skipped"] = 1.0
        state.next_step += 1
    except Exception as exc:
        fail(exc, f"recording optimizer step {step}")
        return
    bootstrap.log_hook_step(step, fields)


def _step_fields(stats: Stats, step_time: float | None) -> dict[str, Any]:
    """Recorder.log_step keywords of a run step: its own statistics, and the other
    optimizers' since the previous run step (which are consumed)."""
    scalars: dict[str, float] = {}
    if len(stats.lrs) > 1:
        for g, (norm, lr) in enumerate(zip(stats.group_norms, stats.lrs, strict=True)):
            if norm is not None:
                scalars[f"grad_norm/group_{g}"] = norm
            if lr is not None:
                scalars[f"lr/group_{g}"] = lr
    for module, norm in stats.module_norms:
        scalars[f"grad_norm/module/{module}"] = norm
    for index, other in sorted(state.others.items()):
        prefix = f"optimizer_{index}"
        if other.last.grad_norm is not None:
            scalars[f"{prefix}/grad_norm"] = other.last.grad_norm
        if other.last.lrs[0] is not None:
            scalars[f"{prefix}/lr"] = other.last.lrs[0]
        scalars[f"{prefix}/nonfinite_grads"] = float(other.last.nonfinite)
        scalars[f"{prefix}/steps"] = float(other.steps)
        if other.skipped:
            scalars[f"{prefix}/skipped"] = float(other.skipped)
    state.others.clear()
    fields: dict[str, Any] = {"nonfinite_grads": stats.nonfinite, "scalars": scalars}
    if stats.grad_norm is not None:
        fields["grad_norm"] = stats.grad_norm
    if stats.lrs[0] is not None:
        fields["lr"] = stats.lrs[0]
    if step_time is not None:
        fields["step_time"] = step_time
    return fields
