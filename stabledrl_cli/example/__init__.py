"""The built-in example: a tiny LLaDA-style masked diffusion LM trained with RL on a toy task.

`stabledrl record --out DIR` runs it. `unit_logp` is the per-unit log-likelihood as a pure
function of the model's parameters (for `torch.func`). The settings (`ExampleConfig`,
`EstimatorConfig`) import no torch; every other name imports its module on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabledrl_cli._lazy import lazy_getattr
from stabledrl_cli.example.config import EstimatorConfig, ExampleConfig

if TYPE_CHECKING:
    from stabledrl_cli.example._model import ModelConfig, TinyDiffusionLM
    from stabledrl_cli.example.estimator import (
        MaskSample,
        draw_mask,
        sequence_logp,
        token_logp,
        unit_logp,
    )
    from stabledrl_cli.example.run_setup import recorder_kwargs
    from stabledrl_cli.example.sampler import generate
    from stabledrl_cli.example.task import SortTask
    from stabledrl_cli.example.trainer import StepInfo, TrainResult, policy_loss, train

_HOMES: dict[str, str] = {
    "ModelConfig": "stabledrl_cli.example._model",
    "TinyDiffusionLM": "stabledrl_cli.example._model",
    "MaskSample": "stabledrl_cli.example.estimator",
    "draw_mask": "stabledrl_cli.example.estimator",
    "sequence_logp": "stabledrl_cli.example.estimator",
    "token_logp": "stabledrl_cli.example.estimator",
    "unit_logp": "stabledrl_cli.example.estimator",
    "generate": "stabledrl_cli.example.sampler",
    "SortTask": "stabledrl_cli.example.task",
    "StepInfo": "stabledrl_cli.example.trainer",
    "TrainResult": "stabledrl_cli.example.trainer",
    "policy_loss": "stabledrl_cli.example.trainer",
    "recorder_kwargs": "stabledrl_cli.example.run_setup",
    "train": "stabledrl_cli.example.trainer",
}

__all__ = [
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


__getattr__ = lazy_getattr(__name__, _HOMES, globals())
