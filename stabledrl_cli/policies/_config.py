"""The parameters every policy takes, as frozen keyword-only config dataclasses (`BaseConfig`,
and `AggConfig` for the `agg` normalizers), and how configs are typed and checked (no torch
here); each family's own config extends them in `_family_config`.

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
