"""The built-in example: a tiny LLaDA-style masked diffusion LM trained with RL on a toy task.

`stabledrl record --out DIR` runs it. `unit_logp` is the per-unit log-likelihood as a pure
function of the model's parameters (for `torch.func`).
"""

from __future__ import annotations

from stabledrl_cli.example._model import ModelConfig, TinyDiffusionLM
from stabledrl_cli.example.estimator import (
    ESTIMATORS,
    EstimatorConfig,
    MaskSample,
    draw_mask,
    sequence_logp,
    token_logp,
    unit_logp,
)
from stabledrl_cli.example.generate import generate
from stabledrl_cli.example.task import SortTask
from stabledrl_cli.example.trainer import (
    ExampleConfig,
    StepInfo,
    TrainResult,
    policy_loss,
    recorder_kwargs,
    train,
)

__all__ = [
    "ESTIMATORS",
    "EstimatorConfig",
    "ExampleConfig",
    "MaskSample",
    "ModelConfig",
    "SortTask",
    "StepInfo",
    "TinyDiffusionLM",
    "TrainResult",
    "draw_mask",
    "generate",
    "policy_loss",
    "recorder_kwargs",
    "sequence_logp",
    "token_logp",
    "train",
    "unit_logp",
]
