"""The built-in example's settings and their defaults, once (no torch here).

`stabledrl record` builds an `ExampleConfig` from the options given and leaves every other
field to the defaults below, which its help quotes; the trainer reads nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stabledrl_cli.errors import ConfigError, UsageError
from stabledrl_cli.policies import resolve_spec
from stabledrl_cli.vocab import ESTIMATORS, UNITS, Estimator, Unit

MAX_RL_STEPS = 100_000
"""RL steps the built-in example trains at most (`record --rl-steps`, `branch --rl-steps` and
a branch's default count): about 40 min and 260 MB of steps at its 25 ms and 2.6 kB a step
(2 GB at a Gram's 19 kB), 250 times its default; a larger count (10**30) would train until
stopped."""


@dataclass(frozen=True, kw_only=True)
class EstimatorConfig:
    """How a unit's log-likelihood is estimated from one mask sample."""

    kind: Estimator = "elbo"
    """`elbo` (mean log-lik over hidden positions) or `llada` (1/t-weighted)."""
    same_mask: bool = False
    """Sequence unit: score old and new under the same mask (the control). Token unit: always."""

    def __post_init__(self) -> None:
        if self.kind not in ESTIMATORS:
            raise UsageError(f"unknown estimator {self.kind!r}; valid: {', '.join(ESTIMATORS)}")

    def manifest(self) -> dict[str, str | int | bool]:
        """The settings the manifest records."""
        return {
            "kind": self.kind,
            "mask_samples": 1,
            "same_mask": self.same_mask,
            "mask_scheme": "t~U(0,1) per sequence, each completion position hidden with prob t",
            "weighting": "mean over hidden" if self.kind == "elbo" else "1/(t*L_c) (LLaDA)",
        }


def default_estimator(unit: Unit) -> Estimator:
    """llada shows the instability most clearly (docs/example.md's table) but scores whole
    sequences; token units take the mean ELBO's per-token log-probs."""
    return "llada" if unit == "sequence" else "elbo"


POLICY_FIELDS = frozenset({"group_id", "reward"})
"""The optional batch fields the example gives its policy (`trainer.policy_loss`): no
reference model's logp_ref, recorded loss_scale or rollout engine's logp_rollout."""


def refuse_untrainable(spec: str, unit: Unit) -> None:
    """UsageError when the policy `spec` needs a batch field the example does not compute."""
    _, policy = resolve_spec(spec)
    missing = sorted(policy.required_fields(unit) - POLICY_FIELDS)
    if missing:
        raise UsageError(
            f"policy {spec!r} needs {', '.join(missing)}, which the built-in example does not "
            "compute (record a trainer that logs it: record -- CMD)"
        )


MAX_SEQUENCES = 4096
"""Sequences a rollout (group_size x prompts_per_rollout) or a pretraining batch may hold: a
bound on the example's memory whatever a checkpoint's settings say."""
MAX_DIGITS = 64
"""Digits the example may sort (its sequences are 2 x digits + 2 tokens)."""


@dataclass(frozen=True, kw_only=True)
class ExampleConfig:
    """Every setting of the built-in example."""

    seed: int = 0
    """Seeds the one training generator (init, pretraining, prompts, sampling, masks)."""
    steps: int = 400
    """RL optimizer steps (rollouts = ceil(steps / mu))."""
    lr: float = 1e-4
    """AdamW learning rate of the RL phase (constant)."""
    policy: str = "grpo"
    """Catalogue spec that makes the loss."""
    estimator: Estimator | None = None
    """`llada` (1/t-weighted) or `elbo`; default llada for sequence units, elbo for token units
    (`default_estimator`)."""
    same_mask: bool = False
    """Sequence unit: old and new ELBO under the same mask (the control)."""
    unit: Unit = "sequence"
    """`sequence` (one ELBO per sequence) or `token` (per-token log-probs, shared mask)."""
    group_size: int = 8
    """G: completions per prompt."""
    prompts_per_rollout: int = 8
    """Prompts per rollout batch (64 sequences with G = 8)."""
    mu: int = 4
    """Inner optimizer steps per rollout batch."""
    max_grad_norm: float = 1.0
    """clip_grad_norm_ bound; its pre-clip return value is the recorded grad_norm."""
    skip_nonfinite: bool = True
    """Skip the optimizer update when the grad norm is not finite (verl, AReaL; TRL does not).
    Without it a non-finite step poisons the weights and the run stops there."""
    pretrain_steps: int = 100
    """Masked-diffusion pretraining steps before RL."""
    pretrain_lr: float = 6e-4
    """Pretraining AdamW learning rate (tuned so the starting reward is ~0.6-0.7)."""
    pretrain_batch: int = 32
    """Pretraining batch size."""
    pretrain_noise: float = 0.3
    """Fraction of pretraining target digits replaced by random digits."""
    digits: int = 5
    """Digits to sort."""

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UsageError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.estimator is None:
            object.__setattr__(self, "estimator", default_estimator(self.unit))
        problems: list[tuple[bool, UsageError]] = [
            (self.steps < 1, ConfigError("steps", f"must be >= 1, got {self.steps}")),
            (
                not -(2**63) <= self.seed < 2**63,
                ConfigError("seed", f"must be an integer in [-2**63, 2**63 - 1], got {self.seed}"),
            ),
            (
                not (self.lr > 0 and math.isfinite(self.lr)),
                ConfigError("lr", f"must be a finite number > 0, got {self.lr}"),
            ),
            (  # finite: the manifest's meta holds it (JSON has no infinity)
                not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)),
                ConfigError(
                    "max_grad_norm", f"must be a finite number > 0, got {self.max_grad_norm}"
                ),
            ),
            (
                self.pretrain_steps < 0,
                ConfigError("pretrain_steps", f"must be >= 0, got {self.pretrain_steps}"),
            ),
            (
                not (self.pretrain_lr > 0 and math.isfinite(self.pretrain_lr)),
                ConfigError("pretrain_lr", f"must be a finite number > 0, got {self.pretrain_lr}"),
            ),
            (
                not 0 <= self.pretrain_noise <= 1,
                ConfigError(
                    "pretrain_noise", f"must be a number in [0, 1], got {self.pretrain_noise}"
                ),
            ),
            (
                min(self.mu, self.group_size, self.prompts_per_rollout, self.digits) < 1,
                UsageError("mu, group_size, prompts_per_rollout and digits must be >= 1"),
            ),
            (
                self.group_size * self.prompts_per_rollout > MAX_SEQUENCES,
                UsageError(
                    f"a rollout of group_size x prompts_per_rollout = "
                    f"{self.group_size * self.prompts_per_rollout} sequences is past "
                    f"{MAX_SEQUENCES}"
                ),
            ),
            (
                not 1 <= self.pretrain_batch <= MAX_SEQUENCES,
                ConfigError(
                    "pretrain_batch",
                    f"must be in [1, {MAX_SEQUENCES}], got {self.pretrain_batch}",
                ),
            ),
            (
                self.digits > MAX_DIGITS,
                ConfigError("digits", f"must be in [1, {MAX_DIGITS}], got {self.digits}"),
            ),
        ]
        for failed, error in problems:
            if failed:
                raise error
        EstimatorConfig(kind=self.estimator_kind, same_mask=self.same_mask)
        refuse_untrainable(self.policy, self.unit)  # before it pretrains, not at its first step
        if self.unit == "token" and self.estimator == "llada":
            raise UsageError(
                "estimator llada is a sequence-level estimator (1/t weights a sum over the "
                "sequence); use it with unit sequence"
            )

    @property
    def estimator_kind(self) -> Estimator:
        """The estimator, filled (never None after `__post_init__`)."""
        return self.estimator or default_estimator(self.unit)

    @property
    def estimator_config(self) -> EstimatorConfig:
        """The estimator as the trainer uses it (token units always share the mask)."""
        return EstimatorConfig(
            kind=self.estimator_kind, same_mask=self.same_mask or self.unit == "token"
        )
