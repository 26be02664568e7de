"""Each policy family's own parameters, as frozen keyword-only config dataclasses over the keys
every policy takes (`_config.BaseConfig`, `AggConfig`; no torch here). Each `__post_init__`
validates its family's keys; the maths that uses them lives in the family's compute module
(docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._config import AggConfig, BaseConfig, check_min
from stabledrl_cli.vocab import Agg, Unit

LogpDtype = Literal["float32", "bfloat16", "float16"]
"""A training run's log-prob dtype, where verl computes in it (kl-cov, dppo `logp_dtype`)."""


def _fill_bounds(config: BaseConfig, low: str, high: str) -> None:
    """A clip's two bounds of frozen `config`, named `low` and `high`: `high` None takes
    `low`'s value (a symmetric clip); then each must be a finite number >= 0."""
    if getattr(config, high) is None:
        object.__setattr__(config, high, getattr(config, low))
    check_min(low, getattr(config, low), 0.0, strict=False)
    check_min(high, getattr(config, high), 0.0, strict=False)


@dataclass(frozen=True, kw_only=True)
class ClipConfig(AggConfig):
    """PPO's conditional clip (ppo, grpo, dapo)."""

    eps_low: float = 0.2
    """Lower clip: the ratio's floor is 1 - eps_low (binds for A < 0)."""
    eps_high: float | None = None
    """Upper clip: the ratio's ceiling is 1 + eps_high (binds for A > 0); default eps_low."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _fill_bounds(self, "eps_low", "eps_high")

    @property
    def high(self) -> float:
        """eps_high, filled (never None after `__post_init__`)."""
        return self.eps_low if self.eps_high is None else self.eps_high


@dataclass(frozen=True, kw_only=True)
class DualClipConfig(ClipConfig):
    """verl's dual clip."""

    c: float = 3.0
    """Dual clip: for A < 0 the term is floored at c A, so r > c is discarded (c > 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("c", self.c, 1.0, strict=True)


@dataclass(frozen=True, kw_only=True)
class TwoSidedConfig(ClipConfig):
    """TRL's two-sided clip (`delta`)."""

    delta: float | None = None
    """Two-sided clip: r <- min(r, delta) in the unclipped branch (required, > 0; INTELLECT-2
    used 4, TRL recommends above 1 + eps_high and takes any)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("delta", self.delta, 0.0, strict=True)


@dataclass(frozen=True, kw_only=True)
class GSPOConfig(AggConfig):
    """GSPO's clip of the sequence ratio."""

    agg: Agg = "seq-mean-token-mean"
    """As `AggConfig.agg`; TRL's sequence-level grpo is seq-mean-token-mean, its sequence-level
    luspo seq-mean-token-sum with rows=all (bnpo, dr_grpo and dapo: their own agg)."""

    eps_low: float = 3e-4
    """Lower clip of the sequence ratio: 1 - eps_low (GSPO paper 3e-4)."""
    eps_high: float = 4e-4
    """Upper clip of the sequence ratio: 1 + eps_high (GSPO paper 4e-4)."""
    form: Literal["sequence", "token"] = "sequence"
    """How the gradient reaches the tokens. sequence: through s_i, spread over its tokens (the
    paper, TRL); token: verl's GSPO-token form, s_i,t = sg(s_i) pi_t / sg(pi_t), the same loss
    but each token's own gradient s_i A_t w_t / norm_t (they differ where A_t or w_t vary
    within a sequence)."""
    log_ratio_max: float | None = None
    """Cap of the sequence log-ratio, log s_i = min(mean_t log r_t, log_ratio_max), its
    gradient 0 where the cap binds (the sequence is discarded; at the cap it is kept): verl's
    gspo clamps it at 10 (`compute_policy_loss_gspo`; the verl integration records
    log_ratio_max=10); none: uncapped (the paper, TRL)."""
    delta: float | None = None
    """TRL's two-sided clip of the sequence ratio: s_i <- min(s_i, delta) in the unclipped
    branch (> 0; TRL recommends above 1 + eps_high), so a sequence with A < 0 and s_i past
    both delta and 1 + eps_high is discarded, and one with A > 0 past either; none: off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)
        check_min("log_ratio_max", self.log_ratio_max, 0.0, strict=True)
        check_min("delta", self.delta, 0.0, strict=True)


# TRL's recommended absolute cap on the CISPO weight.
CISPO_DEFAULT_CAP = 5.0


# The verl form's floor when only eps_high is given.
CISPO_DEFAULT_EPS_LOW = 0.2


@dataclass(frozen=True, kw_only=True)
class CISPOConfig(AggConfig):
    """CISPO's bound on the importance weight: TRL's cap, or verl's band (by the keys given)."""

    cap: float | None = None
    """TRL form: absolute ceiling of the weight, w = min(r, cap); default 5.0."""
    eps_low: float | None = None
    """verl form: floor 1 - eps_low of the weight (default 0.2 once the verl form is chosen)."""
    eps_high: float | None = None
    """verl form: ceiling 1 + eps_high of the weight (default eps_low)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps_low is None and self.eps_high is None:
            if self.cap is None:
                object.__setattr__(self, "cap", CISPO_DEFAULT_CAP)
            check_min("cap", self.cap, 0.0, strict=True)
            return
        if self.cap is not None:
            raise UsageError(
                "give cap (TRL form) or eps_low/eps_high (verl form), not both; "
                "valid keys: cap | eps_low, eps_high"
            )
        if self.eps_low is None:
            object.__setattr__(self, "eps_low", CISPO_DEFAULT_EPS_LOW)
        _fill_bounds(self, "eps_low", "eps_high")


@dataclass(frozen=True, kw_only=True)
class SAPOConfig(AggConfig):
    """SAPO's soft gate temperatures."""

    tau_pos: float = 1.0
    """Gate temperature for A > 0: larger = narrower trust region."""
    tau_neg: float = 1.05
    """Gate temperature for A <= 0 (slightly narrower: negative updates are riskier)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("tau_pos", self.tau_pos, 0.0, strict=True)
        check_min("tau_neg", self.tau_neg, 0.0, strict=True)


# TRL's `vespo_*` defaults: (k, lambda) for A >= 0 and for A < 0.
VESPO_DEFAULTS = {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}


@dataclass(frozen=True, kw_only=True)
class VESPOConfig(AggConfig):
    """VESPO's gamma weighting phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio."""

    k_pos: float = VESPO_DEFAULTS["k_pos"]
    """Power of w for A >= 0 (TRL `vespo_k_pos`): how hard w < 1 is down-weighted."""
    lambda_pos: float = VESPO_DEFAULTS["lambda_pos"]
    """Decay for A >= 0 (TRL `vespo_lambda_pos`): how hard w > 1 is down-weighted."""
    k_neg: float = VESPO_DEFAULTS["k_neg"]
    """Power of w for A < 0 (TRL `vespo_k_neg`)."""
    lambda_neg: float = VESPO_DEFAULTS["lambda_neg"]
    """Decay for A < 0 (TRL `vespo_lambda_neg`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in VESPO_DEFAULTS:
            check_min(name, getattr(self, name), 0.0, strict=False)


@dataclass(frozen=True, kw_only=True)
class StableDRLConfig(BaseConfig):
    """StableDRL's unconditional clip and self-normalization."""

    c: float = 5.0
    """Ceiling of the importance weight, applied whatever the sign of A (c > 1)."""
    level: Literal["seq", "token"] = "seq"
    """Weight per sequence (mean log-ratio) or per token (token units only)."""
    norm: Literal["group", "batch", "micro"] = "group"
    """Self-normalize within each group and average over groups, once over the step, or
    within each micro-batch (a gradient-accumulation round) and average over them."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("c", self.c, 1.0, strict=True)
        if self.rows == "all" and self.level == "token":
            raise UsageError(
                "rows=all applies to level=seq (a row without scored tokens has "
                "log w = 0); level=token weighs scored tokens only"
            )

    def required_fields(self, unit: Unit = "token") -> set[str]:
        # Missing group_id means one group (the public code's per-process batch is one prompt).
        if self.level == "token" and unit == "sequence":
            raise UsageError(
                "level=token needs token units, but this run was recorded with unit: sequence; "
                "use level=seq"
            )
        return super().required_fields(unit)


@dataclass(frozen=True, kw_only=True)
class GPPOConfig(ClipConfig):
    """GPPO's clip bounds (the PPO clip whose clipped tokens keep a bounded gradient)."""


def _check_ratio(ratio: float) -> None:
    check_min("ratio", ratio, 0.0, strict=True)
    if not ratio <= 1.0:
        raise UsageError(f"ratio must be <= 1, got {ratio!r}")


@dataclass(frozen=True, kw_only=True)
class ClipCovConfig(ClipConfig):
    """Clip-Cov's random selection among tokens of high advantage-logp covariance."""

    ratio: float = 0.0002
    """Fraction of the scored tokens selected (at least one): verl `clip_cov_ratio`."""
    lb: float = 1.0
    """Only tokens with covariance in (lb, ub) are candidates (verl `clip_cov_lb`)."""
    ub: float = 5.0
    """Upper bound of the candidates' covariance (verl `clip_cov_ub`)."""
    seed: int = 0
    """Seed of the random choice among the candidates (with the step's shape)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ratio(self.ratio)
        if not self.lb < self.ub:
            raise UsageError(f"lb must be < ub, got lb={self.lb!r}, ub={self.ub!r}")
        check_min("seed", self.seed, 0, strict=False)


@dataclass(frozen=True, kw_only=True)
class KLCovConfig(AggConfig):
    """KL-Cov's penalty on the tokens of highest advantage-logp covariance."""

    ratio: float = 0.0002
    """Fraction of the scored tokens penalised (at least one): verl `kl_cov_ratio`."""
    kl_coef: float = 0.1
    """Weight of |log r| on the selected tokens (verl `ppo_kl_coef`)."""
    cov: Literal["step", "micro"] = "step"
    """Over which tokens the covariance's means are taken and the tokens selected: the
    optimizer step's scored tokens, or each recorded micro-batch's own (verl's kl_cov, one
    call per micro-batch on each rank)."""
    logp_dtype: LogpDtype = "float32"
    """The dtype of the training run's log-probs, in which verl's kl_cov centres them for the
    covariance (the model's output as it is: bfloat16 from bfloat16 logits without
    flash-attn's cross-entropy; the recorded log-probs hold those values exactly); float32:
    the replay's own dtype. With cov=micro only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ratio(self.ratio)
        check_min("kl_coef", self.kl_coef, 0.0, strict=False)
        if self.logp_dtype != "float32" and self.cov != "micro":
            raise UsageError(f"logp_dtype={self.logp_dtype} needs cov=micro (verl's covariance)")


@dataclass(frozen=True, kw_only=True)
class GMPOConfig(BaseConfig):
    """GMPO's clip of each token's log-ratio before the geometric mean."""

    eps_low: float = 0.4
    """Lower clip of log r: -eps_low (GMPO's (e^-0.4, e^0.4); verl uses its clip_ratio)."""
    eps_high: float = 0.4
    """Upper clip of log r: eps_high."""
    mean: Literal["step", "micro"] = "step"
    """Over which rows the sequence terms are averaged. step: one mean over the optimizer
    step's rows; micro: each recorded micro-batch's own mean over its rows, summed over the
    step's micro-batches (verl's `torch.mean` in every micro-batch call, the calls' gradients
    accumulated) and divided by the step's data-parallel ranks (`PolicyBatch.ranks`: the
    all-reduce averages the ranks' sums); `rows` says which rows each mean counts."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)


@dataclass(frozen=True, kw_only=True)
class DPPOConfig(AggConfig):
    """DPPO's trust region on the probability (tv) or its binary KL (kl)."""

    divergence: Literal["tv", "kl"] = "tv"
    """tv: p - p_old must stay within [-delta_low, delta_high]; kl: the binary KL of (p_old,
    p) within delta on the side the advantage pushes."""
    delta_low: float = 0.2
    """Bound against a decrease of p (A < 0): verl `clip_ratio_low`."""
    delta_high: float | None = None
    """Bound against an increase of p (A > 0): verl `clip_ratio_high`; default delta_low."""
    c: float = 3.0
    """Truncation of the detached ratio, min(r, c) (verl `clip_ratio_c`, 3 in ActorConfig)."""
    logp_dtype: LogpDtype = "float32"
    """The dtype of the training run's log-probs, in which verl takes p = exp(logp) (the
    model's output as it is: bfloat16 from bfloat16 logits without flash-attn's cross-entropy;
    the recorded log-probs hold those
    values exactly); float32: the replay's own dtype."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _fill_bounds(self, "delta_low", "delta_high")
        check_min("c", self.c, 0.0, strict=True)
