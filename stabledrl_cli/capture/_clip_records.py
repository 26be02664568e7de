"""The gradient clips a step's grad_norm comes from (`optimizer_hooks`): wraps
`torch.nn.utils.clip_grad_norm_`, `clip_grads_with_norm_` (with `get_total_norm`, for the
norm type of its total), `clip_grad_value_` and FSDP1's
`FullyShardedDataParallel.clip_grad_norm_` to keep each clip's pre-clip gradient norms and
total until the step of their optimizer claims them (`_pending_clips`). The
wrappers call torch's own clip, which they never change, and pass through when recording is
off or torch.compile traces them."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

from stabledrl_cli.capture import _fsdp1, _norms, bootstrap
from stabledrl_cli.capture._hook_state import Clip, GradState, fail, state
from stabledrl_cli.capture._pending_clips import grad_states, keep


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
    """While one of the hooks' clip wrappers runs torch's clip (`HookState.torch_clipping`)."""
    state.torch_clipping += 1
    try:
        yield
    finally:
        state.torch_clipping -= 1


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
    if not state.on or not bootstrap.hooks_wanted() or not (args or "parameters" in kwargs):
        return original(*args, **kwargs)
    keyword = "parameters" in kwargs
    given = kwargs.pop("parameters") if keyword else args[0]
    params = [given] if isinstance(given, torch.Tensor) else list(given)
    rest = args if keyword else args[1:]
    with_grad = [p for p in params if p.grad is not None]
    before = grad_states(with_grad)
    try:
        measured = clip_norms(params, rest, kwargs)
        if measured is None:  # an uncommon call (DTensor gradients): measure, torch clips
            norms, local = _norms.measure(with_grad, {})
            unreduced = _norms.unreduced_copies(with_grad)
    except Exception as exc:
        fail(exc, "reading the gradients in clip_grad_norm_")
        return original(params, *rest, **kwargs)
    if measured is None:
        try:
            total = original(params, *rest, **kwargs)
        except Exception:  # refused before it clipped (error_if_nonfinite): the loop's to skip
            if with_grad:
                keep(Clip(norms, None, local, True, unreduced=unreduced), before, with_grad)
            raise
        l2 = _is_l2(rest, kwargs)
        whole = total if l2 and not local else None
        clip = Clip(norms, whole, local, l2 and bool(local), unreduced=unreduced)
    else:
        total, listed, max_norm, foreach = measured
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
        clip = Clip(dict(zip(map(id, with_grad), listed, strict=True)), total)
    if with_grad:
        keep(clip, before, with_grad)
    return total


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


def _clip_value_signature(
    parameters: list[torch.Tensor], clip_value: float, foreach: bool | None = None
) -> None:
    """The arguments of torch.nn.utils.clip_grad_value_ (for binding a call)."""


_CLIP_VALUE_ARGUMENTS = inspect.signature(_clip_value_signature)
_TOTAL_NORM_ARGUMENTS = inspect.signature(_total_norm_signature)
_CLIP_WITH_NORM_ARGUMENTS = inspect.signature(_clip_with_norm_signature)


def _wrap_total_norm(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`get_total_norm(tensors, norm_type=2.0, ...)` notes whether its norm is L2: the total
    a script then gives clip_grads_with_norm_ is its grad_norm only when it is."""

    @functools.wraps(original)
    def get_total_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        if state.on and not state.torch_clipping and not torch.compiler.is_compiling():
            try:
                bound = _TOTAL_NORM_ARGUMENTS.bind(*args, **kwargs)
                state.l2_total = float(bound.arguments.get("norm_type", 2.0)) == 2.0
            except (TypeError, ValueError):
                state.l2_total = False
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


def _bound_listed(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> inspect.BoundArguments | None:
    """A clip's arguments bound to `signature`, its `parameters` made a list (a generator is
    then read by the hooks and by torch's clip alike); None for arguments it does not take,
    which torch's clip then refuses."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    given = bound.arguments["parameters"]
    bound.arguments["parameters"] = [given] if isinstance(given, torch.Tensor) else list(given)
    return bound


def _measured_clip(
    params: list[torch.Tensor],
) -> tuple[list[torch.Tensor], dict[int, GradState], Clip]:
    """(those of `params` with a gradient, their `grad_states`, a Clip of their gradient
    norms taken before a clip changes them: a DTensor's local shard, summed at the step, a
    Partial one copied; its total is the caller's to set)."""
    with_grad = [p for p in params if p.grad is not None]
    norms, local = _norms.measure(with_grad, {})
    clip = Clip(norms, None, local, unreduced=_norms.unreduced_copies(with_grad))
    return with_grad, grad_states(with_grad), clip


def _wrap_measured(
    original: Callable[..., None],
    arguments: inspect.Signature,
    name: str,
    complete: Callable[[inspect.BoundArguments, list[torch.Tensor], Clip], None],
) -> Callable[..., None]:
    """A clip `original` (torch's `name`, of `arguments`) that changes its parameters'
    gradients in place: they are measured before it does (`_measured_clip`), `complete` sets
    what the Clip takes from the call's arguments, and the Clip is kept for the step once the
    clip is done. Passes through when recording is off, inside torch's own clip_grad_norm_ or
    a torch.compile trace, and for arguments it does not take; a failure to measure is
    reported (`fail`) and the clip runs as torch's."""

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        if (
            not state.on
            or state.torch_clipping
            or torch.compiler.is_compiling()
            or not bootstrap.hooks_wanted()
        ):
            return original(*args, **kwargs)
        bound = _bound_listed(arguments, args, kwargs)
        if bound is None:
            return original(*args, **kwargs)
        try:
            with_grad, before, clip = _measured_clip(bound.arguments["parameters"])
            complete(bound, with_grad, clip)
        except Exception as exc:
            fail(exc, f"reading the gradients in {name}")
            return original(*bound.args, **bound.kwargs)
        original(*bound.args, **bound.kwargs)
        if with_grad:
            keep(clip, before, with_grad)

    return wrapper


def _wrap_clip_with_norm(original: Callable[..., None]) -> Callable[..., None]:
    """`clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None)`, the second half
    of a clip whose first half is get_total_norm: its parameters' gradient norms are measured
    before it clips (a DTensor's local shard, summed at the step: no collective here), and
    total_norm, when the latest get_total_norm took an L2 norm and its whole value needs no
    collective, is the step's grad_norm (once for all the calls given it); else the L2 norm
    of the gradients it clipped, summed from those measures."""

    def complete(bound: inspect.BoundArguments, with_grad: list[torch.Tensor], clip: Clip) -> None:
        total = _whole_value(bound.arguments["total_norm"]) if state.l2_total else None
        clip.total, clip.shared, clip.summed = total, total is not None, total is None

    return _wrap_measured(original, _CLIP_WITH_NORM_ARGUMENTS, "clip_grads_with_norm_", complete)


def wrap_fsdp(module: ModuleType) -> None:
    """Wraps FullyShardedDataParallel.clip_grad_norm_ of FSDP1's module (torch.distributed.fsdp,
    once the process has imported it: the sitecustomize waits for it); once, idempotent."""
    if state.fsdp_clip_wrapper is not None:
        return
    try:
        fsdp = module.FullyShardedDataParallel
        state.fsdp_clip_wrapper = _wrap_fsdp_clip(fsdp.clip_grad_norm_)
        fsdp.clip_grad_norm_ = state.fsdp_clip_wrapper
    except Exception as exc:
        fail(exc, "wrapping FullyShardedDataParallel.clip_grad_norm_")


def _wrap_fsdp_clip(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """FSDP1's `model.clip_grad_norm_(max_norm, norm_type=2.0)`: the local norms of its shards'
    parts and of its other gradients are taken before it clips (summed over the ranks at the
    step); the whole L2 norm it returns is the step's grad_norm. With no sharded parameter it
    calls torch.nn.utils.clip_grad_norm_, which records itself."""

    @functools.wraps(original)
    def clip_grad_norm_(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not state.on or not bootstrap.hooks_wanted():
            return original(self, *args, **kwargs)
        try:
            shards = _fsdp1.shards_of(self)
            if not shards:
                return original(self, *args, **kwargs)
            params = list(self.parameters())
            before = grad_states(params)
            norms, local = _norms.measure(params, shards)
            norm_type = args[1] if len(args) > 1 else kwargs.get("norm_type", 2.0)
        except Exception as exc:
            fail(exc, "reading the gradients in FullyShardedDataParallel.clip_grad_norm_")
            return original(self, *args, **kwargs)
        with _torch_clip():
            total = original(self, *args, **kwargs)
        keep(Clip(norms, total if float(norm_type) == 2.0 else None, local), before, params)
        return total

    return clip_grad_norm_


def _wrap_clip_value(original: Callable[..., None]) -> Callable[..., None]:
    """`clip_grad_value_(parameters, clip_value, foreach=None)`, which clamps each gradient
    element: its parameters' gradient norms are measured before it clamps (a DTensor's local
    shard, summed at the step), and the step's grad_norm is their L2 norm, as for a norm
    clip; a gradient that held a NaN or an inf counts as non-finite, though the clamp made an
    inf finite."""

    def complete(bound: inspect.BoundArguments, with_grad: list[torch.Tensor], clip: Clip) -> None:
        clip.nonfinite = {
            key
            for key, grad in ((id(p), p.grad) for p in with_grad)
            if not math.isfinite(clip.norms.get(key, 0.0))
            and grad is not None
            and not bool(torch.isfinite(grad).all())
        }
        clip.summed = True

    return _wrap_measured(original, _CLIP_VALUE_ARGUMENTS, "clip_grad_value_", complete)


def wrap_clips() -> None:
    """Wraps torch's clip_grad_norm_, get_total_norm, clip_grads_with_norm_ and
    clip_grad_value_ (once)."""
    if state.clip_wrapper is not None:
        return
    state.clip_wrapper = _wrap_clip(torch.nn.utils.clip_grad.clip_grad_norm_)
    torch.nn.utils.clip_grad.clip_grad_norm_ = state.clip_wrapper
    torch.nn.utils.clip_grad_norm_ = state.clip_wrapper
    _wrap_utils("get_total_norm", _wrap_total_norm)
    _wrap_utils("clip_grads_with_norm_", _wrap_clip_with_norm)
    _wrap_utils("clip_grad_value_", _wrap_clip_value)
