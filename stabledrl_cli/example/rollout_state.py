"""The training loop's state at a rollout boundary: taken for a checkpoint (`training_state`,
with the guard's record, `guard_record`) and checked before a run resumes from one
(`check_restorable`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from stabledrl_cli.capture.geometry import GeometryConfig
from stabledrl_cli.errors import InputError
from stabledrl_cli.example._model import TinyDiffusionLM
from stabledrl_cli.example.checkpoint import TrainingState, restore
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.run_setup import model_config
from stabledrl_cli.guard import Guard


def check_restorable(state: TrainingState, config: ExampleConfig) -> None:
    """InputError unless `state` restores into the model, AdamW optimizer and generator that
    `config` makes (`checkpoint.restore`), or sits off a rollout boundary (a step that is not
    its rollout's first, rollout x mu: the recorded rollout indices would not be the
    original's): a check before a run is opened to resume it."""
    if state.step != state.rollout * config.mu:
        where = state.source or f"the checkpoint at step {state.step}"
        raise InputError(
            f"{where}: it resumes at step {state.step} and rollout {state.rollout}, off a rollout "
            f"boundary (rollout {state.rollout} of mu = {config.mu} steps starts at step "
            f"{state.rollout * config.mu})"
        )
    model = TinyDiffusionLM(model_config(config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    restore(state, model, optimizer, torch.Generator())


def _cpu(value: Any) -> Any:
    """A state_dict's tensors moved to the CPU (nested dicts and lists followed)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def training_state(
    step: int,
    rollout: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: torch.Generator,
    config: ExampleConfig,
    geometry: GeometryConfig | None,
    guard: dict[str, Any] | None,
) -> TrainingState:
    """The loop's state at a rollout boundary, on the CPU, with the geometry the run records
    and its guard (`guard_record`)."""
    return TrainingState(
        step=step,
        rollout=rollout,
        model=_cpu(model.state_dict()),
        optimizer=_cpu(optimizer.state_dict()),
        rng=rng.get_state(),
        config=asdict(config),
        geometry=None if geometry is None else asdict(geometry),
        guard=guard,
    )


def guard_record(guard: Guard, norms: list[float]) -> dict[str, Any]:
    """A checkpoint's `guard`: the guard's mode and rule, and the grad norms it was asked about
    (`norms`, in order), from which a branch rebuilds it (`example.branch.branch_guard`)."""
    note = guard.manifest_note()
    return {
        "mode": note["mode"],
        "rule": note["rule"],
        "norms": torch.tensor(norms, dtype=torch.float64),
    }
