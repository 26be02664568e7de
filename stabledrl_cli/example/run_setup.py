"""What an example run is set up from before its loop: the model its config makes
(`model_config`) and the keywords that open its Recorder (`recorder_kwargs`: the policy, unit,
estimator, meta, and the geometry's manifest entry, `geometry_manifest`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from stabledrl_cli.capture.geometry import GeometryConfig, covered_parameters
from stabledrl_cli.example._model import ModelConfig, TinyDiffusionLM
from stabledrl_cli.example.config import ExampleConfig
from stabledrl_cli.example.task import VOCAB_SIZE, SortTask
from stabledrl_cli.policies import Policy


def model_config(config: ExampleConfig) -> ModelConfig:
    """The model `config` trains: the sort task's vocabulary and sequence length."""
    return ModelConfig(vocab_size=VOCAB_SIZE, seq_len=SortTask(length=config.digits).seq_len)


def geometry_manifest(config: ExampleConfig, geometry: GeometryConfig) -> dict[str, Any]:
    """The manifest's `geometry` entry for an example run: settings, Omega recipe, covered
    parameters (names and sizes from a parameter-free copy of the model on the meta device)."""
    with torch.device("meta"):
        skeleton = TinyDiffusionLM(model_config(config))
    covered = covered_parameters(skeleton, geometry)
    return geometry.to_manifest(
        [name for name, _ in covered], [p.numel() for _, p in covered], unit=config.unit
    )


def recorder_kwargs(
    config: ExampleConfig, policy: Policy, geometry: GeometryConfig | None = None
) -> dict[str, Any]:
    """Everything the Recorder's manifest needs to describe an example run: the policy object
    itself (the manifest stores its canonical spec, name and params), unit, estimator, meta."""
    estimator: dict[str, Any] = dict(config.estimator_config.manifest())
    if config.unit == "token":  # each scored position is a unit: its own log-prob, no weights
        estimator["weighting"] = "none (per-token log-prob of each hidden position)"
    return {
        "policy": policy,
        "unit": config.unit,
        "estimator": estimator,
        "reward_range": (0.0, 1.0),
        "meta": {
            "source": "stabledrl built-in example (sort digits, tiny masked diffusion LM)",
            "example_config": asdict(config),
            "reward": "fraction of completion positions correct",
        },
        "geometry": geometry_manifest(config, geometry) if geometry is not None else None,
    }
