"""Records every `optimizer.step()` of a PyTorch script that never imports stabledrl: the
optimizer hooks of `stabledrl record -- CMD` (docs/recording.md).

`install()` registers torch's global optimizer step hooks
(`torch.optim.optimizer.register_optimizer_step_pre_hook` / `_post_hook`) and wraps
torch's gradient clips (`_clip_records`) and `torch.amp.GradScaler.step`; the
sitecustomize that `record` puts on the child's PYTHONPATH calls it once the child has
imported torch, and `_clip_records.wrap_fsdp` (FSDP1's `FullyShardedDataParallel.clip_grad_norm_`)
once it has imported torch.distributed.fsdp. What the hooks keep is `_hook_state`.

Which steps. The first optimizer that steps is the run's optimizer: each of its `step()` calls
is one recorded step, numbered 0, 1, 2, ... in this process (a run's steps, like a rank's).
Another optimizer's steps since the previous recorded step are summarised in the next
recorded step as `optimizer_<i>/...` scalars (i: the order in which the optimizers first
stepped; the run's is 0; one made anew, of the class and parameter shapes of one that is
gone, keeps its i: `_optimizers`); those after the run's last step are named on stderr at exit
(`_unrecorded_note`).
A step() inside another optimizer's step() is part of that step (`_step_end.nested`).
When the run's optimizer is gone (garbage-collected, at the latest
at another optimizer's first step: `_param_names.module_names`), the next optimizer that steps
becomes the run's optimizer and the numbering goes on. A process started (forked,
spawned) from the one whose optimizer became the run's records none of its steps: its first
optimizer step turns recording off there and fails `record` (`_step_stats.step_stats`).

What each step records (all gradient norms are L2, taken before clipping):
- grad_norm: what `clip_grad_norm_` returned when the script clipped this optimizer's
  parameters by their L2 norm since its previous step (the root-sum-of-squares of the
  returned norms when it clipped several disjoint sets; a clip of gradients an earlier one
  clipped counts only for the others, measured before it, and a clip whose gradients were
  zeroed or made again since, its step skipped by the script, is no step's: `_pending_clips`; a
  clip of several optimizers' parameters gives each its own part: `take_clips`), or
  the `total_norm` it gave
  `clip_grads_with_norm_` (once, however many groups it clipped with it: accelerate's and
  transformers' clip of gradients on several DTensor meshes), else the norm of all its
  gradients, computed here (before a `clip_grad_value_` clamps them); absent when no
  parameter has a gradient. A step given a closure
  (LBFGS) is measured when the closure's first call returns, once it has made the gradients;
- nonfinite_grads: parameters whose gradient holds a NaN or an inf;
- lr: the first parameter group's learning rate; step_time: wall seconds from the end of the
  previous `step()` to the end of this one (absent on the first step);
- optimizer_skipped: 1 on a step a `torch.amp.GradScaler` skipped (its gradients held an inf
  or a NaN, so `scaler.step()` left the parameters alone), or that the guard skipped
  (`skipped_by_guard`: step() is not called), or whose step() raised (the script caught
  the exception, which goes on to it unchanged: `_step_watchers`), or that the loop skipped after
  a clip measured its gradients (zero_grad() zeroes them unstepped:
  `_step_watchers`): the step is recorded all the same,
  with the statistics of the unscaled gradients it found, and the numbering goes on (a
  fused optimizer unscales inside its step(), which the scaler calls with the scale and the
  inf found: `_step_stats._amp_state`);
- with several parameter groups, `grad_norm/group_<g>` and `lr/group_<g>` for each group;
- `grad_norm/module/<name>` for the `TOP_MODULES` modules with the largest gradient norm
  (a module's norm is over the parameters it holds itself; names come from the optimizer's
  named parameters when none repeats, else from the root `torch.nn.Module` objects alive at
  the first step, prefixed `<k>:<class>.` when several roots hold its parameters: `_param_names`);
- per other optimizer i: `optimizer_<i>/grad_norm`, `optimizer_<i>/lr`,
  `optimizer_<i>/nonfinite_grads` (of its last step), `optimizer_<i>/steps` and, when a
  GradScaler skipped some or their step() raised, `optimizer_<i>/skipped`.

A clip traced by torch.compile is torch's alone: recording it (`.tolist()`, the state kept)
would break the compiled graph, which a `fullgraph=True` compile refuses; the step's grad_norm
is then measured after the clip. The step hooks run uncompiled (`compile_safe`).

Sharded gradients count whole: a DTensor's (FSDP2) over its mesh, an FSDP1 shard's per
original parameter over its process group (`_norms`), so every rank records the same norms.

Recording never breaks training: a failure here warns once, turns recording off and is
reported to `record` (`_status.RecordingFailure`); the hooks are removed at the next step,
once it has made that step's collective of a sharded run, flagged as this rank's stop, so
that every rank stops recording at that step and none waits for the others (`_ranks`).
"""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler
from torch.optim.optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from stabledrl_cli.capture import bootstrap
from stabledrl_cli.capture._clip_records import (
    wrap_clips,
)
from stabledrl_cli.capture._hook_state import (
    fail,
    state,
)
from stabledrl_cli.capture._optimizers import run_optimizer, view_of
from stabledrl_cli.capture._process_rank import rank_prefix
from stabledrl_cli.capture._step_end import finish_step, nested, outer_step_ends
from stabledrl_cli.capture._step_stats import step_stats
from stabledrl_cli.capture._step_watchers import (
    watch_raising_steps,
    watch_zero_grads,
    wrap_scaler_step,
)
from stabledrl_cli.errors import warn


def install() -> None:
    """Registers the global optimizer hooks and wraps clip_grad_norm_ (once; idempotent; again
    after `uninstall`). A failure warns once and leaves training alone."""
    if state.on or not bootstrap.hooks_wanted():
        return
    try:
        state.handles = [
            register_optimizer_step_pre_hook(_registered_pre_hook),
            register_optimizer_step_post_hook(_registered_post_hook),
        ]
        if state.scaler_wrapper is None:
            wrap_clips()
            state.scaler_wrapper = wrap_scaler_step(GradScaler.step)
            GradScaler.step = state.scaler_wrapper  # type: ignore[method-assign]
            watch_raising_steps()
            watch_zero_grads()
            bootstrap.hooks_installed()
            atexit.register(_unrecorded_note)
        state.on = True
    except Exception as exc:
        fail(exc, "installing the optimizer hooks")


def _unrecorded_note() -> None:
    """At exit: the steps other optimizers took after the run optimizer's last step, which no
    recorded step holds, are named in one line on stderr (a line a rank: each rank's may
    differ)."""
    if not state.on or not state.others or not bootstrap.hooks_wanted():
        return
    lost = ", ".join(
        f"optimizer_{index}'s last " + ("step" if other.steps == 1 else f"{other.steps} steps")
        for index, other in sorted(state.others.items())
    )
    warn(
        f"stabledrl: note: {rank_prefix()}not recorded: {lost}, taken after the run "
        "optimizer's last step "
        "(another optimizer's steps are recorded with the run optimizer's next step)\n"
    )


def _forked() -> None:
    """In a child forked from this process: the other optimizers' steps held are the
    parent's, recorded by its next step or named by its `_unrecorded_note`, not the child's."""
    state.others.clear()


os.register_at_fork(after_in_child=_forked)


def _pre_hook(
    optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Takes the step's statistics now, or, for a step given a closure, has the closure take
    them once its first call has produced the gradients (then returns step()'s arguments with
    the closure wrapped, as torch lets a pre-hook)."""
    if not state.on or nested(optimizer):
        return None
    state.under_way.step = weakref.ref(optimizer)
    try:
        view = view_of(optimizer)
        view.stepping = True
        at = view.closure_at
        if at is not None and len(args) <= at:
            at = None  # (not given by position)
        closure = args[at] if at is not None else kwargs.get("closure")
        if callable(closure) and bootstrap.hooks_wanted():
            view.pending, view.closure, view.awaiting = None, True, True
            measured = _measured(optimizer, closure)
            if at is not None:
                return (*args[:at], measured, *args[at + 1 :]), kwargs
            return args, {**kwargs, "closure": measured}
        view.pending = step_stats(optimizer)
    except Exception as exc:
        fail(exc, "reading the gradients before optimizer.step()")
    return None


def _measured(optimizer: Optimizer, closure: Callable[..., Any]) -> Callable[..., Any]:
    """`closure`, which at its first call (it produces the gradients at the parameters the
    step starts from) then takes the step's statistics."""

    @functools.wraps(closure)
    def measured(*args: Any, **kwargs: Any) -> Any:
        result = closure(*args, **kwargs)
        view = state.views.get(optimizer)
        if state.on and view is not None and view.awaiting:
            view.awaiting = False
            try:
                view.pending = step_stats(optimizer)
            except Exception as exc:
                fail(exc, "reading the gradients of optimizer.step()'s closure")
        return result

    return measured


def _post_hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if state.on and outer_step_ends(optimizer):
        finish_step(optimizer, skipped=False)


_step_hooks: dict[str, Callable[..., Any]] = {"pre": _pre_hook, "post": _post_hook}
"""What the registered hooks call: the hooks themselves, or, once the process has imported
torch's compiler (`compile_safe`), the same hooks kept out of its compiled code."""


def _registered_pre_hook(
    optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    return _step_hooks["pre"](optimizer, args, kwargs)  # type: ignore[no-any-return]


def _registered_post_hook(
    optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    _step_hooks["post"](optimizer, args, kwargs)


def compile_safe(_dynamo: ModuleType) -> None:
    """Once the process imports torch._dynamo (`torch.compile`; the sitecustomize waits for
    it: importing it here would cost every recorded process seconds): the hooks run as they
    are inside a compiled step(), which Dynamo would otherwise trace into, down to the
    Recorder, recompiling at each step and warning on the training's stderr."""
    try:
        for name, hook in (("pre", _pre_hook), ("post", _post_hook)):
            _step_hooks[name] = torch.compiler.disable(hook)  # type: ignore[no-untyped-call]
    except Exception as exc:
        fail(exc, "keeping the optimizer hooks out of torch.compile")


def skipped_by_guard() -> None:
    """A step the guard skipped (`stabledrl_cli.guard`): the script leaves the run optimizer's
    step() uncalled, and the step is recorded as a GradScaler's skip is (optimizer_skipped 1,
    the statistics of the gradients it found), so that the numbering keeps pace with the
    loop's steps and each batch pairs with its own optimizer step. Before any optimizer has
    stepped (which one would have is not known), a step of that scalar alone. Never raises."""
    if not state.on:
        return
    run = run_optimizer()
    if run is not None:
        finish_step(run, skipped=True)
        return
    step = state.next_step
    state.next_step += 1
    state.clips.clear()  # the skipped step's: never the next step's
    bootstrap.log_hook_step(step, {"scalars": {"optimizer_skipped": 1.0}})
