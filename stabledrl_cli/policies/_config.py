"""Every policy's parameters, as frozen keyword-only config dataclasses (no torch here).

`__post_init__` validates, so a config built in code is as safe as one parsed from a spec.
Choices are `Literal` types (`Agg`, `AdvMode` from `stabledrl_cli.vocab`): the spec parser and
the validators read them from the annotations, so error messages list them from one place.
The maths that uses each config lives in the family's compute module (docs/policies.md).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

from stabledrl_cli.errors import UsageError
from stabledrl_cli.vocab import AdvMode, Agg, RolloutIS, Rows, Unit

# Aggregations that divide by a count of sequences N (the ones `rows` applies to).
SEQUENCE_MEAN_AGGS: tuple[Agg, ...] = (
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "constant",
)
# Aggregations that take max_len (required by constant, optional for the verl horizon).
MAX_LEN_AGGS: tuple[Agg, ...] = ("constant", "seq-mean-token-sum-norm")

# Keys every policy takes; they are listed after the policy's own keys.
COMMON_KEYS = (
    "agg",
    "max_len",
    "rows",
    "beta",
    "kl_is",
    "kl_weight",
    "kl_max",
    "adv",
    "tis",
    "tis_min",
    "tis_max",
)

ParamValue = str | int | float | bool | None

TIS_DEFAULT_MAX = 2.0
"""verl's rollout_is_threshold default."""
"""A config field's value: a number, a choice, or None for unset."""

LogpDtype = Literal["float32", "bfloat16", "float16"]
"""A training run's log-prob dtype, where verl computes in it (kl-cov, dppo `logp_dtype`)."""

FLOAT32_MAX = float.fromhex("0x1.fffffep+127")
"""float32's largest finite number (3.4e+38): a replay computes in float32, so a number
parameter larger in size is refused (torch cannot even hold it as a float32 bound)."""
FLOAT32_TINY = float.fromhex("0x1p-126")
"""float32's smallest normal number (1.2e-38): a nonzero parameter smaller in size is 0 or
subnormal in float32, so it is refused (`cap=1e-320` would act as the refused cap=0)."""


_HINTS: dict[type, dict[str, object]] = {}


def type_hints(cls: type) -> dict[str, object]:
    """A config class's resolved annotations, resolved once (every config checks them, every
    spec is typed by them): the caller must not change the dict."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def literal_choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of a Literal-typed field, else None."""
    hint = type_hints(cls)[name]
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def check_min(name: str, value: float | None, low: float, strict: bool) -> None:
    """value must be finite and > low (strict) or >= low."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        op = ">" if strict else ">="
        raise UsageError(f"{name} must be a finite number {op} {low:g}, got {value!r}")


def param_order(config_cls: type[BaseConfig]) -> list[str]:
    """The config's own keys first, then the keys every policy shares."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    return [n for n in names if n not in COMMON_KEYS] + [n for n in COMMON_KEYS if n in names]


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Keys every policy takes."""

    beta: float = 0.0
    """Weight of the k3 KL penalty towards logp_ref (needs logp_ref); 0 turns it off."""
    kl_is: Literal["off", "token", "sequence"] = "off"
    """token: each token's KL term is multiplied by its ratio r_t, through which its gradient
    flows too (TRL's `use_bias_correction_kl`, DeepSeek-V3.2's unbiased k3); sequence: by its
    sequence's ratio s_i = exp(mean over scored t of log r_t), GSPO's, through which its
    gradient flows to every scored token of the sequence (TRL's `use_bias_correction_kl` with
    importance_sampling_level="sequence"), whatever ratio the policy's own term uses; needs
    beta > 0."""
    kl_weight: Literal["recorded", "none"] = "recorded"
    """recorded: the KL term of each token is weighted by its recorded loss_weight, as the
    policy term is; none: it is not (TRL adds the KL term after its entropy, off-policy and
    vLLM weights); needs beta > 0."""
    kl_max: float | None = None
    """The k3 term clamped at kl_max, its gradient 0 where the clamp binds (verl's low_var_kl
    and k3 clamp it at 10); none: unclamped (TRL); needs beta > 0."""
    adv: AdvMode = "recorded"
    """Advantages as recorded, or recomputed from per-sequence rewards within groups."""
    rows: Rows = "scored"
    """Sequences a sequence mean counts (and, for stabledrl, the softmax's members): those with
    a scored token, or every row (TRL's `.mean()` over rows; verl's `global_batch_size`;
    StableDRL's public code, where a row without scored tokens has log w = 0)."""

    tis: RolloutIS = "off"
    """Rollout correction (needs logp_rollout): each token's weight is multiplied by
    w = exp(logp_old - logp_rollout), per token or per sequence (exp of the sum), truncated to
    [tis_min, tis_max] or zeroed outside it. Replays a run recorded without a correction."""
    tis_min: float | None = None
    """Lower bound of w (truncate: clamp; mask: zero below it; default none)."""
    tis_max: float | None = None
    """Upper bound of w (default 2.0 once tis is on: verl's rollout_is_threshold)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = literal_choices(type(self), f.name)
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise UsageError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
            if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
                raise UsageError(
                    f"{f.name} must be at most {FLOAT32_MAX:.2g} in size (float32's largest "
                    f"number: a replay computes in float32), got {value!r}"
                )
            if isinstance(value, float) and 0 < abs(value) < FLOAT32_TINY:
                raise UsageError(
                    f"{f.name} must not lie strictly between 0 and {FLOAT32_TINY:.2g} in size "
                    f"(float32's smallest normal number: a replay computes in float32, where it "
                    f"is 0 or subnormal), got {value!r}"
                )
        check_min("beta", self.beta, 0.0, strict=False)
        if self.kl_is != "off" and not self.beta > 0:
            raise UsageError(f"kl_is={self.kl_is} weighs the KL term: it needs beta > 0")
        if self.kl_weight != "recorded" and not self.beta > 0:
            raise UsageError(f"kl_weight={self.kl_weight} weighs the KL term: it needs beta > 0")
        check_min("kl_max", self.kl_max, 0.0, strict=True)
        if self.kl_max is not None and not self.beta > 0:
            raise UsageError("kl_max clamps the KL term: it needs beta > 0")
        if self.tis == "off":
            if self.tis_min is not None or self.tis_max is not None:
                raise UsageError(
                    "tis_min and tis_max apply with tis=token-truncate|token-mask|"
                    "sequence-truncate|sequence-mask"
                )
        elif self.tis_max is None:
            object.__setattr__(self, "tis_max", TIS_DEFAULT_MAX)
        check_min("tis_min", self.tis_min, 0.0, strict=False)
        check_min("tis_max", self.tis_max, 0.0, strict=True)
        if self.tis_min is not None and self.tis_max is not None and self.tis_min >= self.tis_max:
            raise UsageError(f"tis_min must be < tis_max, got {self.tis_min!r} >= {self.tis_max!r}")

    def params(self) -> dict[str, ParamValue]:
        """Every parameter, defaults filled, in display order."""
        return {name: getattr(self, name) for name in param_order(type(self))}

    def required_fields(self, unit: Unit = "token") -> set[str]:
        """Batch fields needed beyond logp, logp_old, advantages, mask and seq_id on a run of
        `unit` units (`Policy.required_fields`; here without torch, for the Recorder too);
        UsageError when the policy cannot act on such units."""
        needed: set[str] = set()
        if self.beta > 0:
            needed.add("logp_ref")
        if self.adv != "recorded":
            needed |= {"reward", "group_id"}
        if self.tis != "off":
            needed.add("logp_rollout")
        return needed


@dataclass(frozen=True, kw_only=True)
class AggConfig(BaseConfig):
    """Keys of the policies whose normalizer is one of the `agg` kinds."""

    agg: Agg = "token-mean"
    """Normalizer of each token's term (docs/policies.md, Aggregation): Z, 1, Z_k K, N |y_i|,
    N, N H, N max_len, or the recorded loss_scale."""
    max_len: int | None = None
    """L_max of agg=constant (Dr.GRPO's configured maximum completion length); the horizon H
    of agg=seq-mean-token-sum-norm (verl's loss_scale_factor; default per micro-batch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.agg == "constant" and self.max_len is None:
            raise UsageError("agg=constant needs max_len (an int >= 1)")
        if self.max_len is not None and self.agg not in MAX_LEN_AGGS:
            raise UsageError(f"max_len only applies to agg={' or agg='.join(MAX_LEN_AGGS)}")
        check_min("max_len", self.max_len, 1, strict=False)
        if self.rows == "all" and self.agg not in SEQUENCE_MEAN_AGGS:
            raise UsageError(
                f"rows=all only applies to sequence means (agg={'|'.join(SEQUENCE_MEAN_AGGS)})"
            )

    def required_fields(self, unit: Unit = "token") -> set[str]:
        needed = super().required_fields(unit)
        if self.agg == "recorded":
            needed.add("loss_scale")
        return needed


@dataclass(frozen=True, kw_only=True)
class ClipConfig(AggConfig):
    """PPO's conditional clip (ppo, grpo, dapo)."""

    eps_low: float = 0.2
    """Lower clip: the ratio's floor is 1 - eps_low (binds for A < 0)."""
    eps_high: float | None = None
    """Upper clip: the ratio's ceiling is 1 + eps_high (binds for A > 0); default eps_low."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)

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
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        check_min("eps_low", self.eps_low, 0.0, strict=False)
        check_min("eps_high", self.eps_high, 0.0, strict=False)


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
        if self.delta_high is None:
            object.__setattr__(self, "delta_high", self.delta_low)
        check_min("delta_low", self.delta_low, 0.0, strict=False)
        check_min("delta_high", self.delta_high, 0.0, strict=False)
        check_min("c", self.c, 0.0, strict=True)
