"""The steps no step hook sees (`optimizer_hooks`): one a GradScaler skipped, one whose
step() raised, one the loop skipped after a clip measured its gradients."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler
from torch.optim.optimizer import Optimizer

from stabledrl_cli.capture._hook_state import fail, state
from stabledrl_cli.capture._optimizers import optimizer_params, run_optimizer
from stabledrl_cli.capture._pending_clips import grad_states, unchanged
from stabledrl_cli.capture._step_end import finish_step, outer_step_ends


def wrap_scaler_step(original: Callable[..., float | None]) -> Callable[..., float | None]:
    @functools.wraps(original)
    def step(self: GradScaler, optimizer: Optimizer, *args: Any, **kwargs: Any) -> float | None:
        if not isinstance(optimizer, Optimizer):  # (any object with param_groups and step())
            return original(self, optimizer, *args, **kwargs)  # its optimizers record theirs
        view = state.views.get(optimizer)
        taken = view.steps_taken if view is not None else 0
        result = original(self, optimizer, *args, **kwargs)
        view = state.views.get(optimizer)
        if state.on and (view.steps_taken if view is not None else 0) == taken:
            finish_step(optimizer, skipped=True)
        return result

    return step


def watch_raising_steps() -> None:
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
    if outer_step_ends(optimizer) and state.on and view is not None and view.stepping:
        finish_step(optimizer, skipped=True, measured=True)


def watch_zero_grads() -> None:
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

    Optimizer.zero_grad = wrapped(Optimizer.zero_grad, optimizer_params)  # type: ignore[method-assign]
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
        run = run_optimizer()
        optimizer = run if run is not None else zeroing
        if optimizer is None or (zeroing is not None and zeroing is not optimizer):
            return
        view = state.views.get(optimizer)
        if view is not None and view.stepping:  # a closure's zero_grad(), inside step()
            return
        ids = view.ids if view is not None else {id(p) for p in optimizer_params(optimizer)}
        clipped = {key for clip in state.clips for key in clip.parameters() if key in ids}
        now = grad_states(p for p in params if id(p) in clipped)
        if any(
            unchanged(clip.after.get(key), state_now)
            for clip in state.clips
            for key, state_now in now.items()
            if key in clip.after
        ):
            finish_step(optimizer, skipped=True)
    except Exception as exc:
        fail(exc, "recording the optimizer step the loop skipped")
