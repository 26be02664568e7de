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
gone, keeps its i: `_index`); those after the run's last step are named on stderr at exit
(`_unrecorded_note`).
A step() inside another optimizer's step() is part of that step (`_nested`).
When the run's optimizer is gone (garbage-collected, at the latest
at another optimizer's first step: `_module_names`), the next optimizer that steps
becomes the run's optimizer and the numbering goes on. A process started (forked,
spawned) from the one whose optimizer became the run's records none of its steps: its first
optimizer step turns recording off there and fails `record` (`_step_stats`).

What each step records (all gradient norms are L2, taken before clipping):
- grad_norm: what `clip_grad_norm_` returned when the script clipped this optimizer's
  parameters by their L2 norm since its previous step (the root-sum-of-squares of the
  returned norms when it clipped several disjoint sets; a clip of gradients an earlier one
  clipped counts only for the others, measured before it, and a clip whose gradients were
  zeroed or made again since, its step skipped by the script, is no step's: `_clip_records`; a
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
  the exception, which goes on to it unchanged: `_raised`), or that the loop skipped after
  a clip measured its gradients (zero_grad() zeroes them unstepped:
  `_skipped_before_zeroing`): the step is recorded all the same,
  with the statistics of the unscaled gradients it found, and the numbering goes on (a
  fused optimizer unscales inside its step(), which the scaler calls with the scale and the
  inf found: `_amp_state`);
- with several parameter groups, `grad_norm/group_<g>` and `lr/group_<g>` for each group;
- `grad_norm/module/<name>` for the `TOP_MODULES` modules with the largest gradient norm
  (a module's norm is over the parameters it holds itself; names come from the optimizer's
  named parameters when none repeats, else from the root `torch.nn.Module` objects alive at
  the first step, prefixed `<k>:<class>.` when several roots hold its parameters: `_root_names`);
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
import gc
import inspect
import math
import numbers
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler
from torch.optim.optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from stabledrl_cli.capture import _fsdp1, _norms, bootstrap
from stabledrl_cli.capture._child_processes import ENV_HOOKS_RECORDER, descendant_stepped
from stabledrl_cli.capture._clip_records import (
    clip_totals,
    grad_states,
    take_clips,
    unchanged,
    wrap_clips,
)
from stabledrl_cli.capture._hook_state import (
    Clip,
    OptimizerView,
    OtherSteps,
    Stats,
    fail,
    root_sum_squares,
    state,
    uninstall,
)
from stabledrl_cli.capture._process_rank import rank_prefix
from stabledrl_cli.errors import warn

TOP_MODULES = 5
"""How many modules' gradient norms each step records (the largest at that step)."""


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
            state.scaler_wrapper = _wrap_scaler_step(GradScaler.step)
            GradScaler.step = state.scaler_wrapper  # type: ignore[method-assign]
            _watch_raising_steps()
            _watch_zero_grads()
            bootstrap.hooks_installed()
            atexit.register(_unrecorded_note)
        state.on = True
        state.installed_at = time.perf_counter()
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


def _wrap_scaler_step(original: Callable[..., float | None]) -> Callable[..., float | None]:
    @functools.wraps(original)
    def step(self: GradScaler, optimizer: Optimizer, *args: Any, **kwargs: Any) -> float | None:
        if not isinstance(optimizer, Optimizer):  # (any object with param_groups and step())
            return original(self, optimizer, *args, **kwargs)  # its optimizers record theirs
        view = state.views.get(optimizer)
        taken = view.steps_taken if view is not None else 0
        result = original(self, optimizer, *args, **kwargs)
        view = state.views.get(optimizer)
        if state.on and (view.steps_taken if view is not None else 0) == taken:
            _finish_step(optimizer, skipped=True)
        return result

    return step


def _optimizer_params(optimizer: Optimizer) -> Iterator[torch.Tensor]:
    """The optimizer's parameters, group by group."""
    return (p for group in optimizer.param_groups for p in group["params"])


def _view(optimizer: Optimizer) -> OptimizerView:
    view = state.views.get(optimizer)
    if view is None:
        view = OptimizerView(index=_index(optimizer), closure_at=_closure_position(optimizer))
        state.views[optimizer] = view
    return view


def _measured_view(optimizer: Optimizer) -> OptimizerView:
    """`_view(optimizer)` for a step that measures its parameters: looked at again, once a
    step (a group added, a parameter put in another's place since the previous one)."""
    view = _view(optimizer)
    params = tuple(map(id, _optimizer_params(optimizer)))
    if params != view.params:
        view.params, view.ids = params, frozenset(params)
        view.names = None
        view.shards = None
    return view


def _index(optimizer: Optimizer) -> int:
    """The index of a new optimizer: that of one of the same class and parameter shapes that
    is gone (a script that makes its optimizer anew at each step, over the same parameters or
    new ones, keeps one `optimizer_<i>`), else the next one."""
    groups = tuple(tuple(p.shape for p in group["params"]) for group in optimizer.param_groups)
    kind = (type(optimizer).__qualname__, groups)
    live = {view.index for view in state.views.values()}
    for index in state.indices.get(kind, ()):
        if index not in live:
            return index
    index, state.optimizers_seen = state.optimizers_seen, state.optimizers_seen + 1
    state.indices.setdefault(kind, []).append(index)
    return index


_WRAPPER_ROOTS = ("module.", "_orig_mod.")
"""How the names a wrapper gives (DDP's and DataParallel's, torch.compile's: `_unwrapped`)
begin: `AdamW(ddp.named_parameters())` names its parameters `module.<the model's name>`."""


def _param_names(optimizer: Optimizer) -> dict[int, str]:
    """id(parameter) -> its qualified name: from the optimizer's named parameter groups when
    no name repeats and none is a wrapper's, else from the root modules alive now
    (`_root_names`; a wrapper's names where those miss a parameter)."""
    names: dict[int, str] = {}
    for group in optimizer.param_groups:
        for name, param in zip(group.get("param_names", ()), group["params"], strict=False):
            names[id(param)] = _fsdp1.clean_name(name)
    unique = len(set(names.values())) == len(names)
    if names and unique and not any(n.startswith(_WRAPPER_ROOTS) for n in names.values()):
        return names
    rooted = _root_names(list(_optimizer_params(optimizer)))
    return rooted if not unique or rooted.keys() >= names.keys() else names


def _root_names(params: list[torch.Tensor]) -> dict[int, str]:
    """`_scanned_root_names(params)`, kept for the next optimizer of the same parameters: a
    scan lists every object alive (0.03 s with transformers imported), at the first step of
    each of them in a script that makes its optimizer anew at each step."""
    rooted = state.rooted
    if (
        rooted is not None
        and len(rooted[0]) == len(params)
        and all(ref() is param for ref, param in zip(rooted[0], params, strict=True))
    ):
        return rooted[1]
    names = _scanned_root_names(params)
    state.rooted = ([weakref.ref(param) for param in params], names)
    return names


def _scanned_root_names(params: list[torch.Tensor]) -> dict[int, str]:
    """id(parameter) -> its name in the root `torch.nn.Module` (one no other module holds)
    alive now that holds it, for each of `params` a root holds (in the model a wrapper root
    holds: `_unwrapped`, so that DDP and torch.compile add no `module.` or `_orig_mod.` to
    the names the model gives alone). When one root holds them all,
    its names as they are; else (an actor and a reference model in one optimizer: their names
    repeat) each root's are prefixed `<k>:<its class name>.`, k numbering the roots from 0 in
    the order of their first parameter in `params` (one that two roots hold is the first's)."""
    order: dict[int, int] = {}
    for i, param in enumerate(params):
        order.setdefault(id(param), i)
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.nn.Module)]
    children = {id(child) for module in modules for child in module.children()}
    roots: list[tuple[str, dict[int, str]]] = []
    for root in modules:
        if id(root) not in children:
            module = _unwrapped(root)
            named = {
                id(param): _fsdp1.clean_name(name)
                for name, param in module.named_parameters()
                if id(param) in order
            }
            if named:
                roots.append((type(module).__name__, named))
    roots.sort(key=lambda root: (min(order[key] for key in root[1]), -len(root[1])))
    held = set().union(*(named.keys() for _, named in roots))
    if not roots or len(roots[0][1]) == len(held):
        return roots[0][1] if roots else {}
    names: dict[int, str] = {}
    count = 0
    for kind, named in roots:
        fresh = [(key, name) for key, name in named.items() if key not in names]
        names.update((key, f"{count}:{kind}.{name}") for key, name in fresh)
        count += bool(fresh)
    return names


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model that a wrapper holds, whose parameter names are the model's own: the
    `module` of DistributedDataParallel and DataParallel, the `_orig_mod` of torch.compile's
    OptimizedModule (looked for only once the process has imported torch._dynamo); else
    `module`."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while True:
        if isinstance(module, parallel) and isinstance(module.module, torch.nn.Module):
            module = module.module
        elif compiled is not None and isinstance(module, compiled):
            module = module._orig_mod
        else:
            return module


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
        every = list(_optimizer_params(optimizer))
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
    names = _module_names(optimizer, view)
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


def _module_names(optimizer: Optimizer, view: OptimizerView) -> dict[int, str]:
    """id(parameter) -> its name (`_param_names`), for a step of the run's optimizer or of one
    about to become it; {} for another optimizer's, whose module norms no step records
    (naming scans every object alive: 0.1 s, at every step of a script that makes a new inner
    optimizer each step, 300 steps in 37 s instead of 0.09)."""
    first = view.steps_taken == 0
    if _another_runs(optimizer) and not (first and _collected_run_optimizer()):
        return {}
    if view.names is None:
        view.names = _param_names(optimizer)
    return view.names


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
        _, params, shards = _step_params(optimizer, _view(optimizer))
        _norms.whole_norms(params, shards, {}, stop=True)
    finally:
        uninstall()


def _step_stats(optimizer: Optimizer) -> Stats | None:
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
    return _stats(optimizer, _measured_view(optimizer))


def _pre_hook(
    optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Takes the step's statistics now, or, for a step given a closure, has the closure take
    them once its first call has produced the gradients (then returns step()'s arguments with
    the closure wrapped, as torch lets a pre-hook)."""
    if not state.on or _nested(optimizer):
        return None
    state.under_way.step = weakref.ref(optimizer)
    try:
        view = _view(optimizer)
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
        view.pending = _step_stats(optimizer)
    except Exception as exc:
        fail(exc, "reading the gradients before optimizer.step()")
    return None


def _closure_position(optimizer: Optimizer) -> int | None:
    """Where step()'s arguments (self first) hold the closure: the position of its parameter
    named `closure` (torch's convention), or None when it has none to take by position."""
    try:
        names = list(inspect.signature(type(optimizer).step).parameters)
    except (TypeError, ValueError):  # a step() without a signature to read
        return None
    return names.index("closure") if "closure" in names else None


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
                view.pending = _step_stats(optimizer)
            except Exception as exc:
                fail(exc, "reading the gradients of optimizer.step()'s closure")
        return result

    return measured


def _run_optimizer() -> Optimizer | None:
    return state.run_optimizer() if state.run_optimizer is not None else None


def _another_runs(optimizer: Optimizer) -> bool:
    """Whether the run's optimizer is another one than `optimizer` (no reference kept)."""
    run = _run_optimizer()
    return run is not None and run is not optimizer


def _is_run_optimizer(optimizer: Optimizer) -> bool:
    """Whether `optimizer` is the run's, which it becomes when there is none (the run's was
    garbage-collected, at the latest at this one's first step: `_module_names`)."""
    run = _run_optimizer()
    if run is None:
        state.run_optimizer = weakref.ref(optimizer)
        os.environ[ENV_HOOKS_RECORDER] = str(os.getpid())
        return True
    return run is optimizer


COLLECT_SECONDS = 1.0
COLLECT_SHARE = 0.01
"""`_collected_run_optimizer`'s collections take at most COLLECT_SECONDS, plus COLLECT_SHARE
of the wall time since the hooks were installed."""


def _collected_run_optimizer() -> bool:
    """At another optimizer's first step (`_module_names`): whether the run's optimizer is
    garbage, collected now. A script that makes a new optimizer for its next phase often drops
    the old one in a reference cycle (a trainer object holding a bound method of its own),
    which only the cyclic collector frees; until it ran, the new optimizer's steps were another
    optimizer's, recorded only in a run step that never came. A collection takes 0.1 s in a
    process that imported transformers: a script making an optimizer a step gets a few, then
    fewer."""
    start = time.perf_counter()
    if state.collect_seconds > COLLECT_SECONDS + COLLECT_SHARE * (start - state.installed_at):
        return False
    gc.collect()
    state.collect_seconds += time.perf_counter() - start
    return _run_optimizer() is None


def _post_hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if state.on and _outer_step_ends(optimizer):
        _finish_step(optimizer, skipped=False)


def _nested(optimizer: Optimizer) -> bool:
    """Whether `optimizer`'s step() runs inside another optimizer's in this thread: a wrapper's
    (ZeroRedundancyOptimizer's local optimizer, which holds this rank's shard of the
    parameters; SAM's base optimizer). The wrapper's step is the loop's, and the one
    recorded; this one is part of it."""
    outer = getattr(state.under_way, "step", None)
    return outer is not None and outer() not in (None, optimizer)


def _outer_step_ends(optimizer: Optimizer) -> bool:
    """Whether `optimizer`'s step(), ending, is no other's part (`_nested`): then no step is
    under way in this thread any more."""
    if _nested(optimizer):
        return False
    state.under_way.step = None
    return True


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


def _finish_step(optimizer: Optimizer, *, skipped: bool, measured: bool = False) -> None:
    """Records the step `optimizer` just took, or that was `skipped`: by a GradScaler or the
    guard (no hook ran: its statistics are taken now, from the unscaled gradients found), or
    as its step() raised (`measured`: the pre-hook took them, `_raised`)."""
    step = state.next_step
    try:
        view = _view(optimizer)
        view.stepping = False
        if (skipped and not measured) or view.awaiting:  # (a closure never called: now)
            view.awaiting = False
            stats = _step_stats(optimizer)
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
        if not _is_run_optimizer(optimizer):
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


def _watch_raising_steps() -> None:
    """Has every optimizer class's step(), as torch wraps it with the step hooks
    (`Optimizer.profile_hook_step`, at the first construction of the class), call `_raised`
    when it raises; the exception goes on to the script unchanged. Left alone (a raising
    step unrecorded) in a torch without that wrapper."""
    hook_step = Optimizer.__dict__.get("profile_hook_step")
    if not isinstance(hook_step, staticmethod):
        return
    original = hook_step.__func__

    @functools.wraps(original)
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        hooked = original(func)

        @functools.wraps(hooked)
        def step(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
            try:
                return hooked(self, *args, **kwargs)
            except BaseException:
                _raised(self)
                raise

        return step

    Optimizer.profile_hook_step = staticmethod(profile_hook_step)  # type: ignore[method-assign]


def _raised(optimizer: Optimizer) -> None:
    """An optimizer's step() raised (its pre-hook ran, its post-hook did not): the step is
    recorded as not applied, a GradScaler's skip is (optimizer_skipped 1, the statistics of
    the gradients it found), so that the numbering keeps pace with the loop's steps when the
    script catches the exception and goes on. Never raises."""
    view = state.views.get(optimizer)
    if _outer_step_ends(optimizer) and state.on and view is not None and view.stepping:
        _finish_step(optimizer, skipped=True, measured=True)


def _watch_zero_grads() -> None:
    """Has `Optimizer.zero_grad` and `torch.nn.Module.zero_grad` see, before they zero the
    gradients, whether a clip measured them for a step the loop then skipped
    (`_skipped_before_zeroing`). Inside torch.compile they are left as torch's."""

    def wrapped(
        original: Callable[..., None], params: Callable[[Any], Iterable[torch.Tensor]]
    ) -> Callable[..., None]:
        @functools.wraps(original)
        def zero_grad(self: Any, *args: Any, **kwargs: Any) -> None:
            if state.on and state.clips and not torch.compiler.is_compiling():
                _skipped_before_zeroing(self if isinstance(self, Optimizer) else None, params(self))
            return original(self, *args, **kwargs)

        return zero_grad

    Optimizer.zero_grad = wrapped(Optimizer.zero_grad, _optimizer_params)  # type: ignore[method-assign]
    module_params = torch.nn.Module.parameters
    torch.nn.Module.zero_grad = wrapped(torch.nn.Module.zero_grad, module_params)  # type: ignore[method-assign]


def _skipped_before_zeroing(zeroing: Optimizer | None, params: Iterable[torch.Tensor]) -> None:
    """zero_grad() (of `zeroing`, an optimizer, or of a module: None) is about to zero
    gradients of the run optimizer's parameters that a clip measured and left as they are,
    with no step() of that optimizer since: the loop skipped its step (its own rule on a
    non-finite grad norm, say). The step is recorded as a GradScaler's skip is
    (optimizer_skipped 1, the statistics of the gradients the clip found), so that the
    numbering keeps pace with the loop's iterations. Before any optimizer has stepped, an
    optimizer's own zero_grad() makes it the run's. Never raises."""
    try:
        run = _run_optimizer()
        optimizer = run if run is not None else zeroing
        if optimizer is None or (zeroing is not None and zeroing is not optimizer):
            return
        view = state.views.get(optimizer)
        if view is not None and view.stepping:  # a closure's zero_grad(), inside step()
            return
        ids = view.ids if view is not None else {id(p) for p in _optimizer_params(optimizer)}
        clipped = {key for clip in state.clips for key in clip.parameters() if key in ids}
        now = grad_states(p for p in params if id(p) in clipped)
        if any(
            unchanged(clip.after.get(key), state_now)
            for clip in state.clips
            for key, state_now in now.items()
            if key in clip.after
        ):
            _finish_step(optimizer, skipped=True)
    except Exception as exc:
        fail(exc, "recording the optimizer step the loop skipped")


def skipped_by_guard() -> None:
    """A step the guard skipped (`stabledrl_cli.guard`): the script leaves the run optimizer's
    step() uncalled, and the step is recorded as a GradScaler's skip is (optimizer_skipped 1,
    the statistics of the gradients it found), so that the numbering keeps pace with the
    loop's steps and each batch pairs with its own optimizer step. Before any optimizer has
    stepped (which one would have is not known), a step of that scalar alone. Never raises."""
    if not state.on:
        return
    run = _run_optimizer()
    if run is not None:
        _finish_step(run, skipped=True)
        return
    step = state.next_step
    state.next_step += 1
    state.clips.clear()  # the skipped step's: never the next step's
    bootstrap.log_hook_step(step, {"scalars": {"optimizer_skipped": 1.0}})


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
