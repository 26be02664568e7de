"""The names of an optimizer's parameters, for the steps' `grad_norm/module/<name>`
(`optimizer_hooks`): from its named parameter groups, else from the root modules alive."""

from __future__ import annotations

import gc
import sys
import weakref

import torch
from torch.optim.optimizer import Optimizer

from stabledrl_cli.capture import _fsdp1
from stabledrl_cli.capture._hook_state import OptimizerView, state
from stabledrl_cli.capture._optimizers import (
    another_runs,
    collected_run_optimizer,
    optimizer_params,
)

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
    rooted = _root_names(list(optimizer_params(optimizer)))
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


def module_names(optimizer: Optimizer, view: OptimizerView) -> dict[int, str]:
    """id(parameter) -> its name (`_param_names`), for a step of the run's optimizer or of one
    about to become it; {} for another optimizer's, whose module norms no step records
    (naming scans every object alive: 0.1 s, at every step of a script that makes a new inner
    optimizer each step, 300 steps in 37 s instead of 0.09)."""
    first = view.steps_taken == 0
    if another_runs(optimizer) and not (first and collected_run_optimizer()):
        return {}
    if view.names is None:
        view.names = _param_names(optimizer)
    return view.names
