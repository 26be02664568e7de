"""Record a TRL `GRPOTrainer` or `RLOOTrainer` run in one line (TRL 1.16.x).

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    trainer = RecordingGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...,
                                   stabledrl_out="runs/mine")
    trainer.train()

`RecordingGRPOTrainer` takes `trl.GRPOTrainer`'s arguments plus `stabledrl_out` (the run
directory; under `stabledrl record --out DIR -- python train.py` it defaults to DIR, and
another directory is refused) and
`stabledrl_overwrite`. Every optimizer step is recorded, numbered as TRL's `log_history`
numbers it, from the tensors TRL's loss used; the run's policy is the catalogue spec that
reproduces TRL's loss (`policy_for_config`, table in `_trl_policy`). `RecordingRLOOTrainer`
does the same for `trl.RLOOTrainer`, one entry a completion (RLOO's loss clips sequence
ratios; `rloo_policy_for_config`). TRL is imported only when a recording trainer is first
used: without it that raises MissingExtraError, and another TRL version a UsageError naming
the supported range.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from stabledrl_cli.integrations._trl_policy import (
    LOSS_TYPES,
    policy_for_config,
    rloo_policy_for_config,
)
from stabledrl_cli.integrations._trl_version import SUPPORTED_TRL, check_trl_version

if TYPE_CHECKING:
    from stabledrl_cli.integrations._trl_grpo import RecordingGRPOTrainer
    from stabledrl_cli.integrations._trl_rloo import RecordingRLOOTrainer

__all__ = [
    "LOSS_TYPES",
    "SUPPORTED_TRL",
    "RecordingGRPOTrainer",
    "RecordingRLOOTrainer",
    "check_trl_version",
    "policy_for_config",
    "rloo_policy_for_config",
]

_TRAINERS = {
    "RecordingGRPOTrainer": "stabledrl_cli.integrations._trl_grpo",
    "RecordingRLOOTrainer": "stabledrl_cli.integrations._trl_rloo",
}
"""Each recording trainer -> its module, imported (with TRL) on first use."""


def __getattr__(name: str) -> type:
    if name in _TRAINERS:
        check_trl_version()
        trainer: type = getattr(importlib.import_module(_TRAINERS[name]), name)
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
