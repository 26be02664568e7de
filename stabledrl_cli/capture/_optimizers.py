"""Which optimizer is which under the optimizer hooks (`optimizer_hooks`): each one's view
(`_hook_state.OptimizerView`) and its index `optimizer_<i>`, and the run's optimizer."""

from __future__ import annotations

import gc
import inspect
import os
import weakref
from collections.abc import Iterator

import torch
from torch.optim.optimizer import Optimizer

from stabledrl_cli.capture._child_processes import ENV_HOOKS_RECORDER
from stabledrl_cli.capture._hook_state import OptimizerView, state


def optimizer_params(optimizer: Optimizer) -> Iterator[torch.Tensor]:
    """The optimizer's parameters, group by group."""
    return (p for group in optimizer.param_groups for p in group["params"])


def view_of(optimizer: Optimizer) -> OptimizerView:
    view = state.views.get(optimizer)
    if view is None:
        view = OptimizerView(index=_index(optimizer), closure_at=_closure_position(optimizer))
        state.views[optimizer] = view
    return view


def measured_view(optimizer: Optimizer) -> OptimizerView:
    """`view_of(optimizer)` for a step that measures its parameters: looked at again, once a
    step (a group added, a parameter put in another's place since the previous one)."""
    view = view_of(optimizer)
    params = tuple(map(id, optimizer_params(optimizer)))
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


def _closure_position(optimizer: Optimizer) -> int | None:
    """Where step()'s arguments (self first) hold the closure: the position of its parameter
    named `closure` (torch's convention), or None when it has none to take by position."""
    try:
        names = list(inspect.signature(type(optimizer).step).parameters)
    except (TypeError, ValueError):  # a step() without a signature to read
        return None
    return names.index("closure") if "closure" in names else None


def run_optimizer() -> Optimizer | None:
    return state.run_optimizer() if state.run_optimizer is not None else None


def another_runs(optimizer: Optimizer) -> bool:
    """Whether the run's optimizer is another one than `optimizer` (no reference kept)."""
    run = run_optimizer()
    return run is not None and run is not optimizer


def is_run_optimizer(optimizer: Optimizer) -> bool:
    """Whether `optimizer` is the run's, which it becomes when there is none (the run's was
    garbage-collected, at the latest at this one's first step: `_param_names.module_names`)."""
    run = run_optimizer()
    if run is None:
        state.run_optimizer = weakref.ref(optimizer)
        os.environ[ENV_HOOKS_RECORDER] = str(os.getpid())
        return True
    return run is optimizer


COLLECT_FREELY = 16
"""`collected_run_optimizer` collects at each of its first COLLECT_FREELY calls, then at the
32nd, 64th, ...: a count, not a time (a budget of seconds ran out sooner on a loaded machine,
whose recording then lost the steps a faster one recorded)."""


def collected_run_optimizer() -> bool:
    """At another optimizer's first step (`_param_names.module_names`): whether the run's
    optimizer is garbage, collected now. A script that makes a new optimizer for its next
    phase often drops the old one in a reference cycle (a trainer object holding a bound
    method of its own), which only the cyclic collector frees; until it ran, the new
    optimizer's steps were another optimizer's, recorded only in a run step that never came.
    A collection takes 0.1 s in a process that imported transformers: a script making an
    optimizer a step gets COLLECT_FREELY, then one at each power of two of its calls."""
    state.collect_calls += 1
    calls = state.collect_calls
    if calls > COLLECT_FREELY and calls & (calls - 1):
        return False
    gc.collect()
    return run_optimizer() is None
