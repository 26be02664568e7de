"""Records every `optimizer.step()` of a PyTorch script that never imports stabledrl: the
optimizer hooks of `stabledrl record -- CMD` (docs/recording.md).

`install()` registers torch's global optimizer step hooks
(`torch.optim.optimizer.register_optimizer_step_pre_hook` / `_post_hook`) and wraps
`torch.nn.utils.clip_grad_norm_`, `torch.nn.utils.clip_grads_with_norm_` (with
`get_total_norm`, for the norm type of its total) and `torch.amp.GradScaler.step`; the
sitecustomize that `record` puts on the child's PYTHONPATH calls it once the child has
imported torch, and `wrap_fsdp` (FSDP1's `FullyShardedDataParallel.clip_grad_norm_`) once it
has imported torch.distributed.fsdp.

Which steps. The first optimizer that steps is the run's optimizer: each of its `step()` calls
is one recorded step, numbered 0, 1, 2, ... in this process (a run's steps, like a rank's).
Another optimizer's steps since the run optimizer's previous step are summarised in the next
recorded step as `optimizer_<i>/...` scalars (i: the order in which the optimizers first
stepped; the run's is 0). When the run's optimizer is garbage-collected, the next optimizer
that steps becomes the run's optimizer and the numbering goes on. A process started (forked,
spawned) from the one whose optimizer became the run's records none of its steps: its first
optimizer step turns recording off there and fails `record` (`_step_stats`).

What each step records (all gradient norms are L2, taken before clipping):
- grad_norm: what `clip_grad_norm_` returned when the script clipped this optimizer's
  parameters by their L2 norm since its previous step (the root-sum-of-squares of the
  returned norms when it clipped several disjoint sets; a clip of gradients an earlier one
  clipped counts only for the others, measured before it, and a clip whose gradients were
  zeroed or made again since, its step skipped by the script, is no step's: `_keep`; a
  clip of several optimizers' parameters gives each its own part: `_take_clips`), or
  the `total_norm` it gave
  `clip_grads_with_norm_` (once, however many groups it clipped with it: accelerate's and
  transformers' clip of gradients on several DTensor meshes), else the norm of all its
  gradients, computed here; absent when no parameter has a gradient. A step given a closure
  (LBFGS) is measured when the closure's first call returns, once it has made the gradients;
- nonfinite_grads: parameters whose gradient holds a NaN or an inf;
- lr: the first parameter group's learning rate; step_time: wall seconds from the end of the
  previous `step()` to the end of this one (absent on the first step);
- optimizer_skipped: 1 on a step a `torch.amp.GradScaler` skipped (its gradients held an inf
  or a NaN, so `scaler.step()` left the parameters alone), or that the guard skipped
  (`skipped_by_guard`: step() is not called), or whose step() raised (the script caught
  the exception, which goes on to it unchanged: `_raised`): the step is recorded all the same,
  with the statistics of the unscaled gradients it found, and the numbering goes on (a
  fused optimizer unscales inside its step(), which the scaler calls with the scale and the
  inf found: `_amp_state`);
- with several parameter groups, `grad_norm/group_<g>` and `lr/group_<g>` for each group;
- `grad_norm/module/<name>` for the `TOP_MODULES` modules with the largest gradient norm
  (a module's norm is over the parameters it holds itself; names come from the optimizer's
  named parameters when none repeats, else from the root `torch.nn.Module` objects alive at
  the first step, prefixed `<k>:<class>.` when several roots hold its parameters: `_root_names`);
- per other optimizer i: `optimizer_<i>/grad_norm`, `optimizer_<i>/lr`,
  `optimizer_<i>/nonfinite_grads` (of its last step) and `optimizer_<i>/steps`.

A clip traced by torch.compile is torch's alone: recording it (`.tolist()`, the state kept)
would break the compiled graph, which a `fullgraph=True` compile refuses; the step's grad_norm
is then measured after the clip. The step hooks run uncompiled (`compile_safe`).

Sharded gradients count whole: a DTensor's (FSDP2) over its mesh, an FSDP1 shard's per
original parameter over its process group (`_norms`), so every rank records the same norms.

Recording never breaks training: a failure here warns once, turns recording off and is
reported to `record` (bootstrap.RecordingFailure); the hooks are removed at the next step,
once it has made that step's collective of a sharded run, flagged as this rank's stop, so
that every rank stops recording at that step and none waits for the others (`_ranks`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import numbers
import os
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.amp.grad_scaler import GradScaler
from torch.optim.optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.hooks import RemovableHandle

from stabledrl_cli.capture import _fsdp1, _norms, bootstrap
from stabledrl_cli.capture._ranks import RankStopped
from stabledrl_cli.errors import warn

TOP_MODULES = 5
"""How many modules' gradient norms each step records (the largest at that step)."""
PENDING_CLIPS = 8
"""clip_grad_norm_ results kept for an optimizer step to claim (the oldest are dropped)."""


def _root_sum_squares(values: Iterable[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


_GradState = tuple["weakref.ref[torch.Tensor]", int]
"""A gradient, weakly held (a gradient freed by zero_grad() is no step's), and its version."""


@dataclass
class _Clip:
    """One clip_grad_norm_ or clip_grads_with_norm_ call: its parameters' pre-clip gradient
    norms and its total norm."""

    norms: dict[int, float]
    """id(parameter) -> the L2 norm of its gradient before clipping (plain gradients)."""
    total: torch.Tensor | float | None
    """What it returned (or was given), when that is an L2 norm read without a collective
    (else None)."""
    local: dict[int, list[float]] = field(default_factory=dict)
    """id(sharded parameter) -> the local norms of its parts before clipping (an FSDP1 shard's
    parts, a DTensor's local shard: `_norms.measure`), summed over the ranks at the step."""
    summed: bool = False
    """Its L2 result is summed at the step from its parameters' whole norms: reading the
    DTensor it returned would be a collective of the hooks' own, which a rank that stopped
    recording would not make."""
    shared: bool = False
    """Its total is the total_norm given to clip_grads_with_norm_, which the calls clipping
    each group of one clip share: a step counts each such total once."""
    unreduced: dict[int, torch.Tensor] = field(default_factory=dict)
    """id(parameter) -> a copy of its Partial DTensor gradient before clipping
    (`_norms.unreduced_copies`), reduced whole at the step instead of the clipped one."""
    after: dict[int, _GradState] = field(default_factory=dict)
    """id(parameter) -> its gradient as the clip left it (`_grad_states`)."""

    def parameters(self) -> set[int]:
        """id() of each parameter it clipped (that had a gradient)."""
        return {*self.norms, *self.local}

    def beyond(self, clipped: set[int]) -> _Clip:
        """This clip without the parameters in `clipped` (another clip's: `_keep`): its L2
        result is then summed from the other parameters' norms, taken before it clipped
        them."""
        return _Clip(
            {key: norm for key, norm in self.norms.items() if key not in clipped},
            None,
            {key: norms for key, norms in self.local.items() if key not in clipped},
            summed=True,
            unreduced={key: copy for key, copy in self.unreduced.items() if key not in clipped},
            after=self.after,
        )

    def l2(self, whole: dict[int, float]) -> float | None:
        """Its L2 result (`whole`: id(parameter) -> whole gradient norm), or None."""
        if self.total is not None:
            return float(self.total)
        if not self.summed:
            return None
        held = (whole[key] for key in self.local if key in whole)
        return _root_sum_squares([*self.norms.values(), *held])


@dataclass
class _Stats:
    """One optimizer step's gradient statistics (taken in the pre-hook)."""

    grad_norm: float | None
    """None when no parameter had a gradient (and nothing was clipped)."""
    nonfinite: int
    lrs: list[float | None]
    """Each group's learning rate (None for a group without one)."""
    group_norms: list[float | None]
    """Each group's gradient norm (None for a group with no gradient)."""
    module_norms: list[tuple[str, float]]
    skipped: bool = False
    """A GradScaler found an inf or a NaN: the optimizer's step() skips the update itself
    (`_amp_state`)."""


@dataclass
class _View:
    """What the hooks keep about one optimizer."""

    index: int
    names: dict[int, str] | None = None
    shape: tuple[int, ...] = ()
    ids: frozenset[int] = frozenset()
    shards: dict[int, _fsdp1.Shard] | None = None
    """id(parameter) -> its FSDP1 Shard, for the parameters that are one (None: not looked)."""
    pending: _Stats | None = None
    last_end: float | None = None
    steps_since_run_step: int = 0
    last: _Stats | None = None
    steps_taken: int = 0
    """Its `step()` calls that ran (the post-hook's count)."""
    closure_at: int | None = None
    """Where its step()'s arguments hold the closure (`_closure_position`)."""
    stepping: bool = False
    """A step() is under way: its pre-hook ran, its post-hook not yet (`_raised`)."""
    closure: bool = False
    """The step under way was given a closure (`_measured`)."""
    awaiting: bool = False
    """That closure has not returned yet: the step's statistics are still to take."""


@dataclass
class _State:
    """The hooks' state in this process."""

    handles: list[RemovableHandle] = field(default_factory=list)
    views: weakref.WeakKeyDictionary[Optimizer, _View] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    run_optimizer: weakref.ref[Optimizer] | None = None
    optimizers_seen: int = 0
    next_step: int = 0
    clips: list[_Clip] = field(default_factory=list)
    clip_wrapper: Callable[..., torch.Tensor] | None = None
    torch_clipping: int = 0
    """Depth of the hooks' own clip wrappers running torch's clip: the clip_grads_with_norm_
    and get_total_norm calls made inside it are that clip's, already recorded."""
    l2_total: bool | None = None
    """Whether the latest get_total_norm call since the last step took an L2 norm (None:
    none)."""
    fsdp_clip_wrapper: Callable[..., torch.Tensor] | None = None
    scaler_wrapper: Callable[..., float | None] | None = None
    on: bool = False


_state = _State()


def install() -> None:
    """Registers the global optimizer hooks and wraps clip_grad_norm_ (once; idempotent; again
    after `uninstall`). A failure warns once and leaves training alone."""
    if _state.on or not bootstrap.hooks_wanted():
        return
    try:
        _state.handles = [
            register_optimizer_step_pre_hook(_registered_pre_hook),
            register_optimizer_step_post_hook(_registered_post_hook),
        ]
        if _state.clip_wrapper is None:
            _state.clip_wrapper = _wrap_clip(torch.nn.utils.clip_grad.clip_grad_norm_)
            torch.nn.utils.clip_grad.clip_grad_norm_ = _state.clip_wrapper
            torch.nn.utils.clip_grad_norm_ = _state.clip_wrapper
            _wrap_utils("get_total_norm", _wrap_total_norm)
            _wrap_utils("clip_grads_with_norm_", _wrap_clip_with_norm)
            _state.scaler_wrapper = _wrap_scaler_step(GradScaler.step)
            GradScaler.step = _state.scaler_wrapper  # type: ignore[method-assign]
            _watch_raising_steps()
            bootstrap.hooks_installed()
        _state.on = True
    except Exception as exc:
        _fail(exc, "installing the optimizer hooks")


def uninstall() -> None:
    """Removes the optimizer hooks; the clip_grad_norm_ and GradScaler.step wrappers stay, as
    pass-throughs."""
    _state.on = False
    for handle in _state.handles:
        handle.remove()
    _state.handles = []
    _state.clips.clear()


def _fail(exc: BaseException, context: str) -> None:
    """Recording is off here: the hooks go at this rank's next step, after its last collective
    (`_leave`); at once when another rank stopped (RankStopped)."""
    if isinstance(exc, RankStopped):  # that rank reported its failure; this one stops
        uninstall()
        warn(f"stabledrl: warning: {context}: {exc}; recording is off here too\n")
        return
    bootstrap.hook_failed(exc, context)


def _clip_signature(
    parameters: list[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> None:
    """The arguments of torch.nn.utils.clip_grad_norm_ (for binding a call)."""


_CLIP_ARGUMENTS = inspect.signature(_clip_signature)


def _is_l2(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether `clip_grad_norm_(parameters, *args, **kwargs)` takes an L2 norm."""
    try:
        norm_type = _CLIP_ARGUMENTS.bind([], *args, **kwargs).arguments.get("norm_type", 2.0)
        return float(norm_type) == 2.0
    except (TypeError, ValueError):
        return False


def clip_norms(
    parameters: list[torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, list[float], float, bool | None] | None:
    """The first half of `clip_grad_norm_(parameters, *args, **kwargs)` as torch documents and
    computes it (`get_total_norm`; the second half is `clip_grads_with_norm_`), keeping the
    per-gradient norms: (total norm, each gradient's norm, max_norm, foreach). None outside
    the common case (an L2 norm of plain dense gradients on one CPU or CUDA device in one
    dtype, no error_if_nonfinite) or for arguments torch would refuse."""
    try:
        bound = _CLIP_ARGUMENTS.bind(parameters, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    options = bound.arguments
    grads = [p.grad for p in parameters if p.grad is not None]
    if (
        not hasattr(torch.nn.utils, "clip_grads_with_norm_")
        or options["norm_type"] != 2.0
        or options["error_if_nonfinite"]
        or options["foreach"] is False
        or not grads
        or any(type(g) is not torch.Tensor or g.is_sparse for g in grads)
        or grads[0].device.type not in ("cpu", "cuda")
        or any(g.device != grads[0].device or g.dtype != grads[0].dtype for g in grads)
    ):
        return None
    with torch.no_grad():
        norms = torch.stack(torch._foreach_norm(grads, 2.0))
        total = torch.linalg.vector_norm(norms, 2.0)
    return total, norms.tolist(), options["max_norm"], options["foreach"]


@contextlib.contextmanager
def _torch_clip() -> Iterator[None]:
    """While one of the hooks' clip wrappers runs torch's clip (`_State.torch_clipping`)."""
    _state.torch_clipping += 1
    try:
        yield
    finally:
        _state.torch_clipping -= 1


def _wrap_clip(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced by torch.compile (module docstring)
            return original(*args, **kwargs)
        args, kwargs = _generator_listed(args, kwargs)
        with _torch_clip():
            return _recorded_clip(original, args, kwargs)

    return clip_grad_norm_


_SPENT_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."
"""torch's clip_grad_norm_ warning of parameters given as an empty generator (one the script
spent already, making its optimizer: it clips nothing)."""


def _generator_listed(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """clip_grad_norm_'s arguments, its parameters given as a generator made a list (which the
    hooks read, then torch's clip). An empty one warns as torch does, naming the line that
    called the clip: torch's own warning would name the hooks' line, or, given the list,
    never come."""
    keyword = "parameters" in kwargs
    given = kwargs["parameters"] if keyword else args[0] if args else None
    if not isinstance(given, types.GeneratorType):
        return args, kwargs
    params = list(given)
    if not params:
        warnings.warn(_SPENT_GENERATOR, stacklevel=3)
    if keyword:
        return args, {**kwargs, "parameters": params}
    return (params, *args[1:]), kwargs


def _recorded_clip(
    original: Callable[..., torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """`original(*args, **kwargs)` (torch's clip_grad_norm_), its clip recorded."""
    if not _state.on or not bootstrap.hooks_wanted() or not (args or "parameters" in kwargs):
        return original(*args, **kwargs)
    keyword = "parameters" in kwargs
    given = kwargs.pop("parameters") if keyword else args[0]
    params = [given] if isinstance(given, torch.Tensor) else list(given)
    rest = args if keyword else args[1:]
    with_grad = [p for p in params if p.grad is not None]
    before = _grad_states(with_grad)
    try:
        measured = clip_norms(params, rest, kwargs)
        if measured is None:  # an uncommon call (DTensor gradients): measure, torch clips
            norms, local = _norms.measure(with_grad, {})
            unreduced = _norms.unreduced_copies(with_grad)
    except Exception as exc:
        _fail(exc, "reading the gradients in clip_grad_norm_")
        return original(params, *rest, **kwargs)
    if measured is None:
        total = original(params, *rest, **kwargs)
        l2 = _is_l2(rest, kwargs)
        whole = total if l2 and not local else None
        clip = _Clip(norms, whole, local, l2 and bool(local), unreduced=unreduced)
    else:
        total, listed, max_norm, foreach = measured
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
        clip = _Clip(dict(zip(map(id, with_grad), listed, strict=True)), total)
    if with_grad:
        _keep(clip, before, with_grad)
    return total


def _grad_states(params: Iterable[torch.Tensor]) -> dict[int, _GradState]:
    """id(parameter) -> its gradient and that gradient's version counter (`_unchanged`)."""
    return {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}


def _unchanged(then: _GradState | None, now: _GradState | None) -> bool:
    """Whether a gradient is the one it was, neither zeroed, made again nor changed in place
    since (no gradient then and now: nothing happened to it either)."""
    if then is None or now is None:
        return then is now
    return then[0]() is now[0]() and then[1] == now[1]


def _keep(clip: _Clip, before: dict[int, _GradState], params: Iterable[torch.Tensor]) -> None:
    """Keeps a clip of `params` for the next step of their optimizer to claim (`before`: their
    `_grad_states` as it began). A parameter that a clip kept before it clipped
    too counts for one of the two: the earlier, when the gradient is as that clip left it
    (this clip clips it again: a clip_grad_norm_ with max_norm=inf that reads the norm, then
    the real one), else this one (the earlier clip's gradient is gone since, zeroed or made
    again: the script skipped that step's optimizer.step())."""
    clip.after = _grad_states(params)
    again: set[int] = set()
    kept: list[_Clip] = []
    for pending in _state.clips:
        shared = pending.parameters() & clip.parameters()
        same = {key for key in shared if _unchanged(pending.after.get(key), before.get(key))}
        again |= same
        if shared - same:
            pending = pending.beyond(shared - same)
        if pending.norms or pending.local:
            kept.append(pending)
    if again:
        clip = clip.beyond(again)
    if clip.norms or clip.local:
        kept.append(clip)
    _state.clips[:] = kept[-PENDING_CLIPS:]


def _wrap_utils(name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Wraps torch.nn.utils.`name` (and torch.nn.utils.clip_grad.`name`, in a torch that
    defines it there under that name), when this torch has it."""
    original = getattr(torch.nn.utils, name, None)
    if original is None:
        return
    wrapper = wrap(original)
    for module in (torch.nn.utils, torch.nn.utils.clip_grad):
        if getattr(module, name, None) is original:
            setattr(module, name, wrapper)


def _total_norm_signature(
    tensors: list[torch.Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> None:
    """The arguments of torch.nn.utils.get_total_norm (for binding a call)."""


def _clip_with_norm_signature(
    parameters: list[torch.Tensor],
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """The arguments of torch.nn.utils.clip_grads_with_norm_ (for binding a call)."""


_TOTAL_NORM_ARGUMENTS = inspect.signature(_total_norm_signature)
_CLIP_WITH_NORM_ARGUMENTS = inspect.signature(_clip_with_norm_signature)


def _wrap_total_norm(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`get_total_norm(tensors, norm_type=2.0, ...)` notes whether its norm is L2: the total
    a script then gives clip_grads_with_norm_ is its grad_norm only when it is."""

    @functools.wraps(original)
    def get_total_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _state.on and not _state.torch_clipping and not torch.compiler.is_compiling():
            try:
                bound = _TOTAL_NORM_ARGUMENTS.bind(*args, **kwargs)
                _state.l2_total = float(bound.arguments.get("norm_type", 2.0)) == 2.0
            except (TypeError, ValueError):
                _state.l2_total = False
        return original(*args, **kwargs)

    return get_total_norm


def _whole_value(total: object) -> torch.Tensor | float | None:
    """A total norm's whole value without a collective: a plain one-element tensor or a
    number, a DTensor's local tensor when it is replicated on every mesh dimension (as
    accelerate gives it); None for any other (a Partial DTensor is whole only once reduced)."""
    if isinstance(total, (int, float)):
        return float(total)
    if not isinstance(total, torch.Tensor):
        return None
    value = total
    if _norms.is_dtensor(total):
        dtensor: Any = total
        if not all(p.is_replicate() for p in dtensor.placements):
            return None
        value = dtensor.to_local()
    return value.detach() if value.numel() == 1 else None


def _wrap_clip_with_norm(original: Callable[..., None]) -> Callable[..., None]:
    """`clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None)`, the second half
    of a clip whose first half is get_total_norm: its parameters' gradient norms are measured
    before it clips (a DTensor's local shard, summed at the step: no collective here), and
    total_norm, when the latest get_total_norm took an L2 norm and its whole value needs no
    collective, is the step's grad_norm (once for all the calls given it); else the L2 norm
    of the gradients it clipped, summed from those measures."""

    @functools.wraps(original)
    def clip_grads_with_norm_(*args: Any, **kwargs: Any) -> None:
        if (
            not _state.on
            or _state.torch_clipping
            or torch.compiler.is_compiling()
            or not bootstrap.hooks_wanted()
        ):
            return original(*args, **kwargs)
        try:
            bound = _CLIP_WITH_NORM_ARGUMENTS.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        given = bound.arguments["parameters"]
        params = [given] if isinstance(given, torch.Tensor) else list(given)
        bound.arguments["parameters"] = params
        try:
            with_grad = [p for p in params if p.grad is not None]
            before = _grad_states(with_grad)
            norms, local = _norms.measure(with_grad, {})
            unreduced = _norms.unreduced_copies(with_grad)
            total = _whole_value(bound.arguments["total_norm"]) if _state.l2_total else None
        except Exception as exc:
            _fail(exc, "reading the gradients in clip_grads_with_norm_")
            return original(*bound.args, **bound.kwargs)
        original(*bound.args, **bound.kwargs)
        if with_grad:
            shared = total is not None
            _keep(_Clip(norms, total, local, not shared, shared, unreduced), before, with_grad)

    return clip_grads_with_norm_


def wrap_fsdp(module: ModuleType) -> None:
    """Wraps FullyShardedDataParallel.clip_grad_norm_ of FSDP1's module (torch.distributed.fsdp,
    once the process has imported it: the sitecustomize waits for it); once, idempotent."""
    if _state.fsdp_clip_wrapper is not None:
        return
    try:
        fsdp = module.FullyShardedDataParallel
        _state.fsdp_clip_wrapper = _wrap_fsdp_clip(fsdp.clip_grad_norm_)
        fsdp.clip_grad_norm_ = _state.fsdp_clip_wrapper
    except Exception as exc:
        _fail(exc, "wrapping FullyShardedDataParallel.clip_grad_norm_")


def _wrap_fsdp_clip(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """FSDP1's `model.clip_grad_norm_(max_norm, norm_type=2.0)`: the local norms of its shards'
    parts and of its other gradients are taken before it clips (summed over the ranks at the
    step); the whole L2 norm it returns is the step's grad_norm. With no sharded parameter it
    calls torch.nn.utils.clip_grad_norm_, which records itself."""

    @functools.wraps(original)
    def clip_grad_norm_(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _state.on or not bootstrap.hooks_wanted():
            return original(self, *args, **kwargs)
        try:
            shards = _fsdp1.shards_of(self)
            if not shards:
                return original(self, *args, **kwargs)
            params = list(self.parameters())
            before = _grad_states(params)
            norms, local = _norms.measure(params, shards)
            norm_type = args[1] if len(args) > 1 else kwargs.get("norm_type", 2.0)
        except Exception as exc:
            _fail(exc, "reading the gradients in FullyShardedDataParallel.clip_grad_norm_")
            return original(self, *args, **kwargs)
        with _torch_clip():
            total = original(self, *args, **kwargs)
        _keep(_Clip(norms, total if float(norm_type) == 2.0 else None, local), before, params)
        return total

    return clip_grad_norm_


def _wrap_scaler_step(original: Callable[..., float | None]) -> Callable[..., float | None]:
    @functools.wraps(original)
    def step(self: GradScaler, optimizer: Optimizer, *args: Any, **kwargs: Any) -> float | None:
        if not isinstance(optimizer, Optimizer):  # (any object with param_groups and step())
            return original(self, optimizer, *args, **kwargs)  # its optimizers record theirs
        view = _state.views.get(optimizer)
        taken = view.steps_taken if view is not None else 0
        result = original(self, optimizer, *args, **kwargs)
        view = _state.views.get(optimizer)
        if _state.on and (view.steps_taken if view is not None else 0) == taken:
            _finish_step(optimizer, skipped=True)
        return result

    return step


def _view(optimizer: Optimizer) -> _View:
    view = _state.views.get(optimizer)
    if view is None:
        view = _View(index=_state.optimizers_seen, closure_at=_closure_position(optimizer))
        _state.optimizers_seen += 1
        _state.views[optimizer] = view
    shape = tuple(len(group["params"]) for group in optimizer.param_groups)
    if shape != view.shape:
        view.shape = shape
        view.ids = frozenset(id(p) for group in optimizer.param_groups for p in group["params"])
        view.names = None
        view.shards = None
    return view


def _param_names(optimizer: Optimizer) -> dict[int, str]:
    """id(parameter) -> its qualified name: from the optimizer's named parameter groups when
    no name repeats, else from the root modules alive now (`_root_names`)."""
    names: dict[int, str] = {}
    for group in optimizer.param_groups:
        for name, param in zip(group.get("param_names", ()), group["params"], strict=False):
            names[id(param)] = name
    if names and len(set(names.values())) == len(names):
        return names
    return _root_names([p for group in optimizer.param_groups for p in group["params"]])


def _root_names(params: list[torch.Tensor]) -> dict[int, str]:
    """id(parameter) -> its name in the root `torch.nn.Module` (one no other module holds)
    alive now that holds it, for each of `params` a root holds. When one root holds them all,
    its names as they are; else (an actor and a reference model in one optimizer: their names
    repeat) each root's are prefixed `<k>:<its class name>.`, k numbering the roots from 0 in
    the order of their first parameter in `params` (one that two roots hold is the first's)."""
    order: dict[int, int] = {}
    for i, param in enumerate(params):
        order.setdefault(id(param), i)
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.nn.Module)]
    children = {id(child) for module in modules for child in module.children()}
    roots: list[tuple[str, dict[int, str]]] = []
    for module in modules:
        if id(module) not in children:
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


def _take_clips(view: _View) -> list[_Clip]:
    """The clip_grad_norm_ calls on this optimizer's parameters since its last step, which
    are consumed. A clip of other optimizers' parameters too (an actor and a critic clipped
    together) gives each optimizer its own parameters' part, summed from their norms before
    it: its total is no optimizer's."""
    mine: list[_Clip] = []
    kept: list[_Clip] = []
    for clip in _state.clips:
        params = clip.parameters()
        others = params - view.ids
        if others == params:
            kept.append(clip)
        elif others:
            mine.append(clip.beyond(others))
            kept.append(clip.beyond(params - others))
        else:
            mine.append(clip)
    _state.clips[:] = kept
    return mine


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
    optimizer: Optimizer, view: _View
) -> tuple[list[int], list[torch.Tensor], dict[int, _fsdp1.Shard]]:
    """(group index of each, the parameters a step measures, id -> FSDP1 Shard): those with a
    gradient, and every FSDP1 shard (a rank that holds none of one still sums it)."""
    if view.shards is None:
        every = [p for group in optimizer.param_groups for p in group["params"]]
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


def _stats(optimizer: Optimizer, view: _View) -> _Stats:
    """The step's gradient statistics, before the optimizer touches the gradients. The
    step's collective is made even when measuring fails, flagged as this rank's stop, and the
    hooks go (`_norms.whole_norms`)."""
    groups, params, shards = _step_params(optimizer, view)
    clips: list[_Clip] = []
    seen: dict[int, float] = {}
    local: dict[int, list[float]] = {}
    unreduced: dict[int, torch.Tensor] = {}
    failure: Exception | None = None
    _state.l2_total = None
    try:
        clips = _take_clips(view)
        for clip in clips:
            seen.update(clip.norms)
            local.update(clip.local)
            unreduced.update(clip.unreduced)
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
        seen[key] = _root_sum_squares(norms)
    norms = [seen[id(p)] for p in params]
    plain_norms = [(p, n) for p, n in zip(params, norms, strict=True) if id(p) not in parts]
    pieces = [piece for key in parts for piece in parts[key]]
    nonfinite = sum(
        1
        for param, norm in plain_norms
        if not math.isfinite(norm) and param.grad is not None and _holds_nonfinite(param.grad)
    ) + sum(1 for _, norm in pieces if not math.isfinite(norm))
    group_squares: list[float | None] = [None] * len(optimizer.param_groups)
    for g, norm in zip(groups, norms, strict=True):
        group_squares[g] = (group_squares[g] or 0.0) + norm * norm
    if view.names is None:
        view.names = _param_names(optimizer)
    names = view.names
    totals = _clip_totals(clips, seen)
    clipped = _root_sum_squares(totals) if len(totals) > 1 else next(iter(totals), None)
    if clipped is None and params:
        clipped = _root_sum_squares(norms)
    scale, skipped = _amp_state(optimizer)
    modules = _module_norms([*((names.get(id(p)), n) for p, n in plain_norms), *pieces])
    return _Stats(
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


def _clip_totals(clips: list[_Clip], whole: dict[int, float]) -> list[float]:
    """The L2 totals of a step's clips (`whole`: id(parameter) -> whole gradient norm), each
    total that clip_grads_with_norm_ calls shared counted once."""
    totals: list[float] = []
    shared: set[float | None] = set()
    for clip in clips:
        total = clip.l2(whole)
        if total is None:
            continue
        if clip.shared:
            key = None if math.isnan(total) else total
            if key in shared:
                continue
            shared.add(key)
        totals.append(total)
    return totals


def _leave(optimizer: Optimizer) -> None:
    """The first step after this rank stopped recording: the step's collective of a sharded
    run, flagged as its stop (the other ranks stop with it, at this step), then the hooks
    go."""
    try:
        _, params, shards = _step_params(optimizer, _view(optimizer))
        _norms.whole_norms(params, shards, {}, stop=True)
    finally:
        uninstall()


def _step_stats(optimizer: Optimizer) -> _Stats | None:
    """The statistics of the step `optimizer` is about to take, or None when recording is off
    here (`_leave`) or this process was started from the recording one
    (`bootstrap.ENV_HOOKS_RECORDER`)."""
    if not bootstrap.hooks_wanted():
        _leave(optimizer)
        return None
    recording = os.environ.get(bootstrap.ENV_HOOKS_RECORDER, "")
    if recording.isdigit() and int(recording) != os.getpid():
        _fail(bootstrap.descendant_stepped(int(recording)), "an optimizer step in a child process")
        uninstall()
        return None
    return _stats(optimizer, _view(optimizer))


def _pre_hook(
    optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Takes the step's statistics now, or, for a step given a closure, has the closure take
    them once its first call has produced the gradients (then returns step()'s arguments with
    the closure wrapped, as torch lets a pre-hook)."""
    if not _state.on:
        return None
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
        _fail(exc, "reading the gradients before optimizer.step()")
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
        view = _state.views.get(optimizer)
        if _state.on and view is not None and view.awaiting:
            view.awaiting = False
            try:
                view.pending = _step_stats(optimizer)
            except Exception as exc:
                _fail(exc, "reading the gradients of optimizer.step()'s closure")
        return result

    return measured


def _is_run_optimizer(optimizer: Optimizer) -> bool:
    run = _state.run_optimizer() if _state.run_optimizer is not None else None
    if run is None:
        _state.run_optimizer = weakref.ref(optimizer)
        os.environ[bootstrap.ENV_HOOKS_RECORDER] = str(os.getpid())
        return True
    return run is optimizer


def _post_hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if _state.on:
        _finish_step(optimizer, skipped=False)


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
        _fail(exc, "keeping the optimizer hooks out of torch.compile")


def _finish_step(optimizer: Optimizer, *, skipped: bool, measured: bool = False) -> None:
    """Records the step `optimizer` just took, or that was `skipped`: by a GradScaler or the
    guard (no hook ran: its statistics are taken now, from the unscaled gradients found), or
    as its step() raised (`measured`: the pre-hook took them, `_raised`)."""
    step = _state.next_step
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
            _take_clips(view)
        end = time.perf_counter()
        step_time = end - view.last_end if view.last_end is not None else None
        view.last_end = end
        if stats is None:
            return
        if not _is_run_optimizer(optimizer):
            view.last = stats
            view.steps_since_run_step += 1
            return
        fields = _step_fields(stats, step_time)
        if skipped or stats.skipped:
            fields["scalars"]["optimizer_skipped"] = 1.0
        _state.next_step += 1
    except Exception as exc:
        _fail(exc, f"recording optimizer step {step}")
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
    view = _state.views.get(optimizer)
    if _state.on and view is not None and view.stepping:
        _finish_step(optimizer, skipped=True, measured=True)


def skipped_by_guard() -> None:
    """A step the guard skipped (`stabledrl_cli.guard`): the script leaves the run optimizer's
    step() uncalled, and the step is recorded as a GradScaler's skip is (optimizer_skipped 1,
    the statistics of the gradients it found), so that the numbering keeps pace with the
    loop's steps and each batch pairs with its own optimizer step. Before any optimizer has
    stepped (which one would have is not known), a step of that scalar alone. Never raises."""
    if not _state.on:
        return
    run = _state.run_optimizer() if _state.run_optimizer is not None else None
    if run is not None:
        _finish_step(run, skipped=True)
        return
    step = _state.next_step
    _state.next_step += 1
    _state.clips.clear()  # the skipped step's: never the next step's
    bootstrap.log_hook_step(step, {"scalars": {"optimizer_skipped": 1.0}})


def _step_fields(stats: _Stats, step_time: float | None) -> dict[str, Any]:
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
    for view in _state.views.values():
        if view.last is not None and view.steps_since_run_step:
            prefix = f"optimizer_{view.index}"
            if view.last.grad_norm is not None:
                scalars[f"{prefix}/grad_norm"] = view.last.grad_norm
            if view.last.lrs[0] is not None:
                scalars[f"{prefix}/lr"] = view.last.lrs[0]
            scalars[f"{prefix}/nonfinite_grads"] = float(view.last.nonfinite)
            scalars[f"{prefix}/steps"] = float(view.steps_since_run_step)
            view.steps_since_run_step = 0
    fields: dict[str, Any] = {"nonfinite_grads": stats.nonfinite, "scalars": scalars}
    if stats.grad_norm is not None:
        fields["grad_norm"] = stats.grad_norm
    if stats.lrs[0] is not None:
        fields["lr"] = stats.lrs[0]
    if step_time is not None:
        fields["step_time"] = step_time
    return fields
