"""Facts of verl 0.9 (the releases the integration records, a clamp its loss functions
hard-code) for modules that import neither torch nor verl: the replay's own policy and verl
metrics, the verl mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

from stabledrl_cli.policies._config import BaseConfig, GSPOConfig

SUPPORTED_VERL = "0.9.x"
"""The verl releases whose engine-worker methods the integration wraps."""

VERL_SEQ_LOG_RATIO_MAX = 10.0
"""verl's compute_policy_loss_gspo clamps GSPO's sequence log ratio at 10 (the spec's
log_ratio_max)."""


def supported_verl(version: str) -> bool:
    """Whether a verl version is one of SUPPORTED_VERL."""
    return version.split(".")[:2] == ["0", "9"]


def verl_gspo_config(meta: Any, config: BaseConfig) -> GSPOConfig | None:
    """The gspo config of the loss verl computed, for a run the verl integration recorded
    (manifest meta: framework verl, a supported verl_version, loss_mode gspo) with a gspo
    policy that lacks verl's cap (recorded before the integration wrote log_ratio_max=10):
    that policy in verl's token form with the cap. None for any other run or policy (a cap
    the recording names is its own)."""
    if not isinstance(meta, dict) or not isinstance(config, GSPOConfig):
        return None
    version = meta.get("verl_version")
    verl_gspo = (
        meta.get("framework") == "verl"
        and meta.get("loss_mode") == "gspo"
        and isinstance(version, str)
        and supported_verl(version)
    )
    if not verl_gspo or config.log_ratio_max is not None:
        return None
    return dataclasses.replace(config, form="token", log_ratio_max=VERL_SEQ_LOG_RATIO_MAX)
