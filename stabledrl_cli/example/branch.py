"""The built-in example's side of the branch protocol (stabledrl_cli.branching): train one
branch from a checkpoint under another policy and record it as a run of its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from stabledrl_cli._device import resolve_device
from stabledrl_cli.capture.branch_protocol import BranchRequest
from stabledrl_cli.dump import Recorder
from stabledrl_cli.errors import InputError
from stabledrl_cli.example.checkpoint import load_checkpoint
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.trainer import (
    StepInfo,
    TrainResult,
    check_restorable,
    recorder_kwargs,
    train,
)
from stabledrl_cli.policies import get_policy


def branch_config(saved: dict[str, object], request: BranchRequest) -> ExampleConfig:
    """The checkpoint's settings with the request's policy and end step (at + steps)."""
    try:
        config = ExampleConfig(**saved)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InputError(
            f"{request.checkpoint}: settings this version does not know ({exc})"
        ) from None
    return replace(config, policy=request.policy, steps=request.at + request.steps)


def train_branch(
    request: BranchRequest,
    *,
    force: bool = False,
    device: str = "cpu",
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Resumes `request.checkpoint`, trains `request.steps` steps under `request.policy` and
    records them (steps at .. at + steps - 1) into `request.run_dir`.

    The manifest's meta carries `branch`: the checkpoint, its step and the policy override.
    InputError when the checkpoint does not resume at `request.at`, or its state does not fit
    the model (checked before the branch run is opened).
    """
    state = load_checkpoint(request.checkpoint)
    if state.step != request.at:
        raise InputError(
            f"{request.checkpoint} resumes at step {state.step}, not at step {request.at}"
        )
    config = branch_config(state.config, request)
    check_restorable(state, config)  # before the branch run is opened (and --force clears it)
    policy = get_policy(config.policy)
    kwargs = recorder_kwargs(config, policy)
    kwargs["meta"]["branch"] = {
        "checkpoint": str(request.checkpoint),
        "at": request.at,
        "steps": request.steps,
        "policy_override": policy.spec,
    }

    def step_done(info: StepInfo) -> None:
        if on_step is not None:
            on_step(info.step)

    with Recorder(request.run_dir, overwrite=force, **kwargs) as recorder:
        return train(
            config,
            recorder=recorder,
            device=resolve_device(device),
            on_step=step_done,
            resume=state,
        )
