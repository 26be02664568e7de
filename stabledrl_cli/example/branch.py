"""The built-in example's side of the branch protocol (stabledrl_cli.branching): train one
branch from a checkpoint under another policy and record it as a run of its own."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from stabledrl_cli._device import resolve_device
from stabledrl_cli.capture.branch_protocol import CHECKPOINTS_DIR, BranchRequest
from stabledrl_cli.capture.geometry import GeometryConfig
from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._file_names import MANIFEST_NAME
from stabledrl_cli.dump._manifest_edits import manifest_now
from stabledrl_cli.errors import InputError, UsageError, quoted
from stabledrl_cli.example.checkpoint import TrainingState, load_checkpoint
from stabledrl_cli.example.config import MAX_RL_STEPS, ExampleConfig
from stabledrl_cli.example.rollout_state import check_restorable
from stabledrl_cli.example.run_setup import recorder_kwargs
from stabledrl_cli.example.trainer import StepInfo, TrainResult, train
from stabledrl_cli.guard import Guard
from stabledrl_cli.policies import get_policy
from stabledrl_cli.policies._spec import base_type
from stabledrl_cli.vocab import GuardMode

_SETTING_TYPES: dict[object, tuple[tuple[type, ...], str]] = {
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
}
"""A setting's annotated type -> the Python types a checkpoint's value may have, in words (bool
is an int to isinstance: only a bool setting takes one); a Literal or str setting: a string."""


def branch_config(saved: dict[str, object], request: BranchRequest) -> ExampleConfig:
    """The checkpoint's settings with the request's policy and end step (at + steps).

    A checkpoint is data: settings that are unknown, missing, of another type or out of range
    are an InputError (exit 3) naming it."""
    where = request.checkpoint
    hints = typing.get_type_hints(ExampleConfig)
    unknown = [str(key) for key in saved if key not in hints]  # a key may be of any type
    missing = [key for key in hints if key not in saved]
    if unknown or missing:
        what = [f"unknown {quoted(', '.join(unknown))}"] if unknown else []
        what += [f"missing {', '.join(missing)}"] if missing else []
        raise InputError(f"{where}: settings this version cannot use ({'; '.join(what)})")
    for key, hint in hints.items():
        value, kind = saved[key], base_type(hint)
        allowed, name = _SETTING_TYPES.get(kind, ((str,), "a string"))
        optional = kind is not hint and value is None
        if not optional and (
            not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool))
        ):
            raise InputError(f"{where}: setting {key} is not {name} (a {type(value).__name__})")
    try:
        config = ExampleConfig(**saved)  # type: ignore[arg-type]
    except UsageError as exc:
        raise InputError(f"{where}: settings the example cannot take ({exc})") from None
    return replace(config, policy=request.policy, steps=request.at + request.steps)


def branch_geometry(state: TrainingState) -> GeometryConfig | None:
    """The geometry the checkpoint's run recorded, which its branch records too (None: none).
    Settings that are not a `GeometryConfig`'s are an InputError (exit 3) naming the file."""
    saved = state.geometry
    if saved is None:
        return None
    params = saved.get("params")
    try:
        if params is not None and not all(isinstance(p, str) for p in params):
            raise TypeError("params are not name patterns")
        return GeometryConfig(**{**saved, "params": None if params is None else tuple(params)})
    except (TypeError, UsageError) as exc:
        where = state.source or f"the checkpoint at step {state.step}"
        raise InputError(f"{where}: geometry settings the example cannot take ({exc})") from None


def branch_guard(state: TrainingState) -> Guard | None:
    """The checkpoint's guard, in the state the run's guard was in when it was written (its
    rule fed the same grad norms), which the branch trains under; None for an unguarded run.
    A mode, rule or norms `Guard` cannot take are an InputError (exit 3) naming the file."""
    saved = state.guard
    if saved is None:
        return None
    where = state.source or f"the checkpoint at step {state.step}"
    norms = saved.get("norms")
    if not isinstance(norms, torch.Tensor) or norms.dtype != torch.float64 or norms.dim() != 1:
        raise InputError(f"{where}: guard norms that are not a float64 vector")
    if norms.numel() != state.step:  # the guard is asked about every step
        raise InputError(
            f"{where}: {norms.numel()} guard norms for the {state.step} steps before step "
            f"{state.step} (one a step)"
        )
    try:
        guard = Guard(typing.cast(GuardMode, saved.get("mode")), saved.get("rule"))
    except UsageError as exc:
        raise InputError(f"{where}: a guard the example cannot take ({exc})") from None
    for norm in norms.tolist():
        guard.rule.update(norm)
    return guard


def _as_json(value: object) -> object:
    """`value` as a manifest holds it (tuples as lists...), to compare with one read back."""
    return json.loads(json.dumps(value))


def check_its_run(state: TrainingState, kwargs: dict[str, Any]) -> None:
    """InputError (exit 3) when a checkpoint in a run's checkpoints folder says another run
    than that run's manifest (a hand-edited seed, say): its settings (`config`), the geometry
    it records and its guard (`kwargs`: the branch's Recorder arguments, made from the
    checkpoint) must be the run's, or its branch would train and record, under the run's name,
    what the run never was. A checkpoint outside a run, or of a run whose manifest cannot be
    read, says no run to compare."""
    where = state.source
    if where is None or where.parent.name != CHECKPOINTS_DIR:
        return
    run = where.parent.parent
    try:
        manifest = manifest_now(run)
    except (InputError, ValueError, OSError):
        return
    meta = manifest.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    claims = {
        "its settings are": (_as_json(state.config), meta.get("example_config")),
        "its geometry is": (_as_json(kwargs["geometry"]), manifest.get("geometry")),
        "its guard is": (_as_json(kwargs["meta"].get("guard")), meta.get("guard")),
    }
    for what, (held, runs) in claims.items():
        if held == runs:
            continue
        if isinstance(held, dict) and isinstance(runs, dict):
            key = next(k for k in (*held, *runs) if held.get(k) != runs.get(k))
            said = f"{key} {held.get(key)!r} in the checkpoint, {runs.get(key)!r} in the run"
        else:
            said = f"{_some(held)} in the checkpoint, {_some(runs)} in the run"
        raise InputError(
            f"{where}: not a checkpoint of the run it is in: {what} not the run's "
            f"({said}: {run / MANIFEST_NAME})"
        )


def _some(value: object) -> str:
    return "none" if value is None else "one"


def train_branch(
    request: BranchRequest,
    *,
    force: bool = False,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Resumes `request.checkpoint`, trains `request.steps` steps under `request.policy` and
    records them (steps at .. at + steps - 1) into `request.run_dir`.

    The manifest's meta carries `branch`: the checkpoint, its step and the policy override.
    UsageError for more than MAX_RL_STEPS steps; InputError when the checkpoint does not
    resume at `request.at`, says another run than the one it is in (`check_its_run`), or its
    state does not fit the model (checked before the branch
    run is opened). `on_start` is called once the
    checkpoint is taken, before the first step trains.
    """
    if request.steps > MAX_RL_STEPS:
        raise UsageError(
            f"a branch of the example trains at most {MAX_RL_STEPS} steps, got {request.steps}"
        )
    state = load_checkpoint(request.checkpoint)
    if state.step != request.at:
        raise InputError(
            f"{request.checkpoint} resumes at step {state.step}, not at step {request.at}"
        )
    config = branch_config(state.config, request)
    check_restorable(state, config)  # before the branch run is opened (and --force clears it)
    geometry = branch_geometry(state)
    guard = branch_guard(state)
    policy = get_policy(config.policy)
    kwargs = recorder_kwargs(config, policy, geometry)
    if guard is not None:
        kwargs["meta"]["guard"] = guard.manifest_note()
    check_its_run(state, kwargs)
    kwargs["meta"]["branch"] = {
        "checkpoint": os.path.abspath(request.checkpoint),  # not the cwd's relative path
        "at": request.at,
        "steps": request.steps,
        "policy_override": policy.spec,
    }

    def step_done(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info.step)

    with Recorder(request.run_dir, overwrite=force, **kwargs) as recorder:
        if on_start is not None:
            on_start()
        return train(
            config,
            recorder=recorder,
            device=resolve_device(device),
            on_step=step_done,
            geometry=geometry,
            resume=state,
            guard=guard,
        )
