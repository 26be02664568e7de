"""The catalogue: a plain dict of names, each a policy class with its defaults, formula and
source. `get_policy(spec)` is the one way in; a failed lookup lists the valid names or keys."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._base import Policy, param_order
from stabledrl_cli.policies._spec import convert_value, split_spec
from stabledrl_cli.policies.cispo import CISPOPolicy
from stabledrl_cli.policies.gspo import GSPOPolicy
from stabledrl_cli.policies.ppo import DualClipPolicy, PPOPolicy, TwoSidedPolicy
from stabledrl_cli.policies.reference import ISPolicy, ReinforcePolicy
from stabledrl_cli.policies.sapo import SAPOPolicy
from stabledrl_cli.policies.stabledrl import StableDRLPolicy


@dataclass(frozen=True)
class PolicyEntry:
    """One name of the catalogue: a class, the defaults it overrides, and its documentation."""

    name: str
    cls: type[Policy]
    formula: str
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.cls.family

    @property
    def keys(self) -> list[str]:
        return param_order(self.cls.Config)

    def default_params(self) -> dict[str, Any]:
        """Every parameter of the bare name (None = unset, e.g. a required two-sided delta)."""
        config = self.cls.Config(**self.overrides)
        return {key: getattr(config, key) for key in self.keys}

    def build(self, params: dict[str, Any]) -> Policy:
        config = self.cls.Config(**{**self.overrides, **params})
        return self.cls(
            config,
            name=self.name,
            formula=self.formula,
            source=self.source,
            defaults=self.default_params(),
        )


_PPO_FORMULA = "min(r A, clip(r, 1-eps_low, 1+eps_high) A) / norm"

REGISTRY: dict[str, PolicyEntry] = {
    entry.name: entry
    for entry in (
        PolicyEntry(
            "ppo",
            PPOPolicy,
            _PPO_FORMULA,
            "TRL GRPOTrainer._compute_loss; verl core_algos.compute_policy_loss_vanilla",
        ),
        PolicyEntry(
            "grpo",
            PPOPolicy,
            _PPO_FORMULA + ", norm = N |y_i|",
            "TRL loss_type=grpo (DeepSeekMath GRPO)",
            {"agg": "seq-mean-token-mean"},
        ),
        PolicyEntry(
            "dapo",
            PPOPolicy,
            _PPO_FORMULA + ", clip-higher eps_high=0.28, norm = Z",
            "DAPO arXiv:2503.14476; TRL loss_type=dapo",
            {"eps_high": 0.28, "agg": "token-mean"},
        ),
        PolicyEntry(
            "dual-clip",
            DualClipPolicy,
            "A<0: max(min(r A, clip(r) A), c A); A>=0: min(r A, clip(r) A)",
            "verl compute_policy_loss_vanilla clip_ratio_c (dual-clip PPO, Ye et al. 2020)",
        ),
        PolicyEntry(
            "two-sided",
            TwoSidedPolicy,
            "min(min(r, delta) A, clip(r, 1-eps_low, 1+eps_high) A) / norm",
            "TRL GRPOConfig.delta (INTELLECT-2)",
        ),
        PolicyEntry(
            "gspo",
            GSPOPolicy,
            "min(s_i A, clip(s_i) A) / (N |y_i|), s_i = exp(mean_t log r_t)",
            "GSPO arXiv:2507.18071; TRL importance_sampling_level=sequence",
        ),
        PolicyEntry(
            "cispo",
            CISPOPolicy,
            "sg(min(r, cap)) A logp / norm; verl form sg(clip(r, 1-eps_low, 1+eps_high))",
            "MiniMax-M1 arXiv:2506.13585; TRL loss_type=cispo; verl compute_policy_loss_cispo",
        ),
        PolicyEntry(
            "sapo",
            SAPOPolicy,
            "sigmoid(tau (r-1)) 4/tau A / norm, tau = tau_pos if A>0 else tau_neg",
            "TRL loss_type=sapo (Soft Adaptive Policy Optimization)",
        ),
        PolicyEntry(
            "is",
            ISPolicy,
            "r A / norm (no clipping)",
            "plain importance sampling: the reference for discarded gradient",
        ),
        PolicyEntry(
            "reinforce",
            ReinforcePolicy,
            "A logp / norm (no ratio)",
            "verl core_algos.compute_policy_loss_gpg (GPG); REINFORCE",
        ),
        PolicyEntry(
            "stabledrl",
            StableDRLPolicy,
            "mean_g sum_i softmax_g(min(mean_t log r_t, log c)) A_i ELBO_i",
            "StableDRL arXiv:2603.06743; networks/llada_svpo.py::compute_loss_spg (use_snis)",
        ),
    )
}

# What a replay runs by default: one spec a policy. two-sided needs delta: 4 as in INTELLECT-2.
STANDARD_CATALOGUE: list[str] = [
    "grpo",
    "dapo",
    "dual-clip",
    "two-sided:delta=4",
    "gspo",
    "cispo",
    "sapo",
    "is",
    "reinforce",
    "stabledrl",
]


def catalogue() -> list[PolicyEntry]:
    """Every name of the catalogue, in display order."""
    return list(REGISTRY.values())


def parse_spec(spec: str) -> tuple[PolicyEntry, dict[str, Any]]:
    """-> (entry, typed parameters given); UsageError on an unknown name, key or a bad value."""
    name, raw = split_spec(spec)
    entry = REGISTRY.get(name)
    if entry is None:
        raise UsageError(f"unknown policy {name!r}; valid: {', '.join(REGISTRY)}")
    hints = typing.get_type_hints(entry.cls.Config)
    params: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in entry.keys:
            raise UsageError(
                f"unknown key {key!r} for policy {name!r}; valid keys: {', '.join(entry.keys)}"
            )
        try:
            params[key] = convert_value(key, text, hints[key])
        except UsageError as exc:
            raise UsageError(f"policy spec {spec!r}: {exc}") from None
    return entry, params


def get_policy(spec: str | Policy) -> Policy:
    """`NAME` or `NAME:key=value,...` -> Policy. A Policy passes through unchanged."""
    if isinstance(spec, Policy):
        return spec
    entry, params = parse_spec(spec)
    try:
        return entry.build(params)
    except UsageError as exc:
        raise UsageError(f"policy spec {spec!r}: {exc}") from None
