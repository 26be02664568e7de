"""The policy contract: `Policy.weights(batch) -> Weights` (policies.md, "The contract").

A family module implements `_policy_terms`, the policy-gradient part of J; the base adds the
KL term, zeroes unscored tokens, makes non-finite inputs visible in `coef`, and restricts
`discarded` / `clipped` to eligible tokens (mask = 1 and A != 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._batch import PolicyBatch, PreparedBatch, prepare
from stabledrl_cli.policies._config import COMMON_KEYS, AggConfig, BaseConfig, agg_norm


@dataclass(frozen=True)
class Weights:
    """What a policy does to one step. Token arrays are [T], in the order of the input."""

    coef: torch.Tensor
    """[T] dJ/d(logp_t) of the policy's surrogate objective J (0 on unscored tokens)."""
    discarded: torch.Tensor
    """[T] bool: eligible tokens whose policy-gradient term the policy's own rule zeroes."""
    clipped: torch.Tensor
    """[T] bool: eligible tokens whose weight was bounded or rescaled, gradient kept."""
    objective: torch.Tensor
    """0-d: the value of J (the recorded loss is -J)."""
    norm: torch.Tensor
    """[T] normalizer of the policy's own aggregation: the REINFORCE reference of the same
    aggregation is A_t * w_t / norm_t, the IS reference r_t * A_t * w_t / norm_t."""
    advantages: torch.Tensor
    """[T] the advantages actually used (after `adv=` recomputation)."""
    nonfinite: torch.Tensor
    """0-d int64: scored tokens whose coef is NaN or inf (propagated, never raised)."""


@dataclass(frozen=True)
class PolicyTerms:
    """A family's policy-gradient part, before KL and masking."""

    coef: torch.Tensor
    objective: torch.Tensor
    discarded: torch.Tensor
    clipped: torch.Tensor


def format_value(value: Any) -> str:
    """Spec text of a parameter value; parsing it back gives the same value."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def param_order(config_cls: type) -> list[str]:
    """The config's own keys first, then the keys every policy shares."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    return [n for n in names if n not in COMMON_KEYS] + [n for n in COMMON_KEYS if n in names]


class Policy:
    """A policy of the catalogue, bound to its parameters."""

    Config: ClassVar[type[BaseConfig]] = BaseConfig
    family: ClassVar[str] = ""
    required_keys: ClassVar[dict[str, str]] = {}
    """Keys without a default (the spec must give them), each with an example value."""

    def __init__(
        self,
        config: BaseConfig,
        *,
        name: str,
        formula: str = "",
        source: str = "",
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.formula = formula
        self.source = source
        self._defaults = defaults if defaults is not None else {}
        self._check_config()

    def _check_config(self) -> None:
        """Checks that need the policy, not just the config: the required keys."""
        for key, example in self.required_keys.items():
            if getattr(self.config, key) is None:
                raise UsageError(
                    f"{key} is required for {self.name}, e.g. {self.name}:{key}={example}"
                )

    @property
    def params(self) -> dict[str, Any]:
        """Every parameter, defaults filled, in display order."""
        return {name: getattr(self.config, name) for name in param_order(type(self.config))}

    @property
    def spec(self) -> str:
        """Canonical spec: the name plus each parameter that differs from the name's defaults."""
        parts = [
            f"{key}={format_value(value)}"
            for key, value in self.params.items()
            if value is not None and self._defaults.get(key) != value
        ]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"Policy({self.spec!r})"

    def required_fields(self, unit: str = "token") -> set[str]:
        """Batch fields needed beyond logp, logp_old, advantages, mask and seq_id."""
        needed: set[str] = set()
        if self.config.beta > 0:
            needed.add("logp_ref")
        if self.config.adv != "recorded":
            needed |= {"reward", "group_id"}
        if isinstance(self.config, AggConfig) and self.config.agg == "recorded":
            needed.add("loss_scale")
        return needed

    def norm(self, prep: PreparedBatch) -> torch.Tensor:
        """[T] norm_t of this policy's aggregation."""
        assert isinstance(self.config, AggConfig)
        return agg_norm(prep, self.config.agg, self.config.max_len)

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        raise NotImplementedError

    def weights(self, batch: PolicyBatch | PreparedBatch) -> Weights:
        """coef, discarded, clipped, objective (and norm, advantages) of one step."""
        prep = batch if isinstance(batch, PreparedBatch) else prepare(batch)
        missing = self.required_fields(prep.unit) - prep.fields_present()
        if missing:
            raise UsageError(
                f"policy {self.spec!r} needs batch field(s) {', '.join(sorted(missing))}, "
                "which this batch lacks"
            )
        adv = prep.advantages(self.config.adv)
        norm = self.norm(prep)
        terms = self._policy_terms(prep, adv, norm)
        coef, objective = terms.coef, terms.objective
        zero = torch.zeros((), dtype=prep.dtype, device=prep.device)
        if self.config.beta > 0:
            assert prep.logp_ref is not None
            delta = prep.logp_ref - prep.logp
            kl = torch.exp(delta) - delta - 1.0
            scale = self.config.beta * prep.weight / norm
            coef = coef + scale * (torch.exp(delta) - 1.0)
            objective = objective - torch.where(prep.mask, scale * kl, zero).sum()
        coef = torch.where(prep.mask, coef, zero)
        # A non-finite input must show in coef even where the rule bounded or zeroed its term
        # (an inf ratio past a clip, REINFORCE ignoring the ratio): training would see it too.
        hidden = prep.mask & ~(prep.finite_inputs & torch.isfinite(adv)) & torch.isfinite(coef)
        coef = torch.where(hidden, torch.full_like(coef, float("nan")), coef)
        eligible = prep.mask & (adv != 0)
        return Weights(
            coef=coef,
            discarded=terms.discarded & eligible,
            clipped=terms.clipped & eligible,
            objective=objective,
            norm=norm,
            advantages=adv,
            nonfinite=(prep.mask & ~torch.isfinite(coef)).sum(),
        )


class TokenPolicy(Policy):
    """A policy whose objective is a sum of per-token terms value_t * w_t / norm_t."""

    def _token_terms(
        self, prep: PreparedBatch, adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (value [T], d value / d logp [T], discarded [T], clipped [T])."""
        raise NotImplementedError

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        value, dvalue, discarded, clipped = self._token_terms(prep, adv)
        scale = prep.weight / norm
        zero = torch.zeros((), dtype=prep.dtype, device=prep.device)
        objective = torch.where(prep.mask, scale * value, zero).sum()
        return PolicyTerms(
            coef=scale * dvalue, objective=objective, discarded=discarded, clipped=clipped
        )


def keep_times(keep: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value where keep, else 0 * value: a zeroed term stays 0 but an inf or NaN one turns NaN,
    as autograd's 0 * local-derivative does in training."""
    return keep.to(value.dtype) * value
