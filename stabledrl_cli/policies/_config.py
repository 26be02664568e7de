"""Config dataclasses shared by every policy: KL, advantage mode, aggregation.

Every config is frozen and keyword-only; `__post_init__` validates, so a config built in code
is as safe as one parsed from a spec. Choices are `Literal` types: the spec parser and the
validators read them from the annotations, so error messages list them from one place.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import torch

from stabledrl_cli.errors import UsageError

Agg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant", "recorded"]
AdvMode = Literal["recorded", "center", "zscore", "rloo"]

# Keys every policy takes; they are listed after the policy's own keys.
COMMON_KEYS = ("agg", "max_len", "beta", "adv")


def literal_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a Literal-typed field, else None."""
    hint = typing.get_type_hints(cls)[name]
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


@dataclass(frozen=True, kw_only=True)
class BaseConfig:
    """Keys every policy takes."""

    beta: float = 0.0
    """Weight of the k3 KL penalty towards logp_ref (needs logp_ref); 0 turns it off."""
    adv: AdvMode = "recorded"
    """Advantages as recorded, or recomputed from per-sequence rewards within groups."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = literal_choices(type(self), f.name)
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise UsageError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        check_min("beta", self.beta, 0.0, strict=False)


@dataclass(frozen=True, kw_only=True)
class AggConfig(BaseConfig):
    """Keys of the policies whose normalizer is one of the `agg` kinds."""

    agg: Agg = "token-mean"
    """Normalizer of each token's term: Z, N*|y_i|, N, N*max_len, or the recorded loss_scale."""
    max_len: int | None = None
    """L_max of agg=constant (Dr.GRPO's configured maximum completion length)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.agg == "constant":
            if self.max_len is None:
                raise UsageError("agg=constant needs max_len (an int >= 1)")
            check_min("max_len", self.max_len, 1, strict=False)
        elif self.max_len is not None:
            raise UsageError("max_len only applies to agg=constant")


def agg_norm(prep: Any, agg: str, max_len: int | None) -> torch.Tensor:
    """[T] normalizer norm_t of each token under `agg` (policies.md, Aggregation)."""
    ones = torch.ones_like(prep.logp)
    if agg == "token-mean":
        return prep.num_scored * ones
    if agg == "seq-mean-token-mean":
        return prep.num_live_seqs * prep.seq_len_tokens
    if agg == "seq-mean-token-sum":
        return prep.num_live_seqs * ones
    if agg == "constant":
        return prep.num_live_seqs * float(max_len) * ones
    if agg == "recorded":
        if prep.loss_scale is None:
            raise UsageError("agg=recorded needs the recorded `loss_scale`, which this batch lacks")
        return prep.loss_scale
    raise UsageError(f"unknown agg {agg!r}; valid: {', '.join(typing.get_args(Agg))}")
