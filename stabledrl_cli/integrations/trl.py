"""Record a TRL `GRPOTrainer` run in one line (TRL 1.16.x).

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    trainer = RecordingGRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...,
                                   stabledrl_out="runs/mine")
    trainer.train()

`RecordingGRPOTrainer` takes `trl.GRPOTrainer`'s arguments plus `stabledrl_out` (the run
directory; under `stabledrl record --out DIR -- python train.py` it defaults to DIR) and
`stabledrl_overwrite`. Every optimizer step is recorded, numbered as TRL's `log_history`
numbers it, from the tensors TRL's loss used; the run's policy is the catalogue spec that
reproduces TRL's loss (`policy_for_config`, table in `_trl_policy`). TRL is imported only when
`RecordingGRPOTrainer` is first used: without it that raises MissingExtraError, and another
TRL version a UsageError naming the supported range.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

from stabledrl_cli.errors import MissingExtraError, UsageError
from stabledrl_cli.integrations._trl_policy import LOSS_TYPES, policy_for_config

if TYPE_CHECKING:
    from stabledrl_cli.integrations._trl_trainer import RecordingGRPOTrainer

__all__ = [
    "LOSS_TYPES",
    "SUPPORTED_TRL",
    "RecordingGRPOTrainer",
    "check_trl_version",
    "policy_for_config",
]

SUPPORTED_TRL = "1.16.x"
"""The TRL releases whose private GRPOTrainer methods the integration overrides."""


def check_trl_version() -> str:
    """The installed TRL version; MissingExtraError when TRL is absent, UsageError when it is
    outside SUPPORTED_TRL."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError("the TRL integration needs trl: pip install -e '.[trl]'") from None
    if version.split(".")[:2] != ["1", "16"]:
        raise UsageError(f"the TRL integration supports trl {SUPPORTED_TRL}; found trl {version}")
    return version


def __getattr__(name: str) -> type:
    if name == "RecordingGRPOTrainer":
        check_trl_version()
        from stabledrl_cli.integrations._trl_trainer import RecordingGRPOTrainer

        return RecordingGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
