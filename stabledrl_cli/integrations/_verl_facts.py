"""Facts of verl 0.9 (the releases the integration records, a clamp its loss functions
hard-code, the metrics it records) for modules that import neither torch nor verl: the replay's
own policy and verl metrics, the verl mapping, a verl run's recorded series."""

from __future__ import annotations

import dataclasses
from typing import Any

from stabledrl_cli.policies._config import BaseConfig
from stabledrl_cli.policies._family_config import GSPOConfig

SUPPORTED_VERL = "0.9.x"
"""The verl releases whose engine-worker methods the integration wraps."""

VERL_SEQ_LOG_RATIO_MAX = 10.0
"""verl's compute_policy_loss_gspo clamps GSPO's sequence log ratio at 10 (the spec's
log_ratio_max)."""


VERL_METRICS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl")
"""verl's per-micro-batch policy metrics, recorded under verl's own names as verl logs them
for the optimizer step, over every rank (`logged_scalars`), or without verl's metrics of the
step (no `TrainingWorker`) as the rank's mean over its micro-batches (replay recomputes the
first two as `verl_pg_clipfrac`, `verl_pg_clipfrac_lower`)."""

LOGGED_SCALARS = ("clip_frac", "kl")
"""The standard scalars a step takes from verl's metrics of it, under the names `stabledrl
import` gives verl's logged `actor/pg_clipfrac` and `actor/kl_loss` (STANDARD_SOURCES)."""

VERL_LOSS_METRICS = ("actor/pg_loss", "actor/kl_coef", "actor/entropy_loss")
"""verl's loss terms of the optimizer step, recorded under verl's own names from verl's
metrics of it only (`logged_scalars`): the policy-gradient loss, the KL loss's coefficient
(use_kl_loss) and the entropy (calculate_entropy), which `stabledrl import` keeps under these
names too."""

TRAINING_STEP_MEANS = (
    "loss",
    "grad_norm",
    "lr",
    *LOGGED_SCALARS,
    *VERL_METRICS,
    *VERL_LOSS_METRICS,
)
"""The scalars of a recorded verl step (an optimizer step) that verl's trainer logs once a
training step (a rollout), as the mean over its optimizer steps (`reduce_metrics`' np.mean:
NaN when one is, inf when one is inf); `lr`, the same for all of them, as `stabledrl import`
gives the log's `actor/lr` (a step later)."""


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
