"""The catalogue: a plain dict of names, each declared with its config, defaults, formula and
source (no torch here). `resolve_spec` types a spec against it; `_lookup.get_policy(spec)` is
the one way to a computing `Policy`, whose family module (and torch) `PolicyEntry.policy_class`
imports on first use. A failed lookup lists the valid names or keys."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from stabledrl_cli.errors import UsageError, quoted, quoted_spec
from stabledrl_cli.policies._config import (
    AggConfig,
    BaseConfig,
    ParamValue,
    param_order,
    type_hints,
)
from stabledrl_cli.policies._family_config import (
    CISPOConfig,
    ClipConfig,
    ClipCovConfig,
    DPPOConfig,
    DualClipConfig,
    GMPOConfig,
    GPPOConfig,
    GSPOConfig,
    KLCovConfig,
    SAPOConfig,
    StableDRLConfig,
    TwoSidedConfig,
    VESPOConfig,
)
from stabledrl_cli.policies._spec import convert_value
from stabledrl_cli.spec import format_spec, split_spec


@dataclass(frozen=True)
class PolicyEntry:
    """One name of the catalogue: its family, config, the defaults it overrides, documentation,
    and where its computation lives."""

    name: str
    family: str
    config: type[BaseConfig]
    compute: str
    """`module:Class` of the computing `Policy` (imported on first use)."""
    formula: str
    source: str
    overrides: dict[str, ParamValue] = field(default_factory=dict)
    """Defaults of this name that differ from the config's (e.g. grpo's agg)."""
    required: dict[str, str] = field(default_factory=dict)
    """Keys without a default (the spec must give them), each with an example value."""
    conventions: str = ""
    """Where this name's defaults follow one source and differ from another (docs/policies.md,
    Conventions), with the knob that selects the other."""
    clauses: dict[str, dict[str, str]] = field(default_factory=dict)
    """key -> its value -> the convention that value keeps, after `conventions` in the row of
    a spec with it (a value not listed adds none): what a key's default says is not said of
    a spec that sets another."""

    def conventions_of(self, params: dict[str, ParamValue]) -> str:
        """The conventions of a spec of this name with `params` (every parameter)."""
        chosen = [
            values[str(params[key])]
            for key, values in self.clauses.items()
            if str(params.get(key)) in values
        ]
        return "; ".join(part for part in (self.conventions, *chosen) if part)

    @property
    def keys(self) -> list[str]:
        """Every key the spec of this name takes, in display order."""
        return param_order(self.config)

    @cached_property
    def defaults(self) -> dict[str, ParamValue]:
        """Every parameter of the bare name (None = unset, e.g. a required two-sided delta)."""
        return self.config(**self.overrides).params()  # type: ignore[arg-type]

    def make_config(self, params: dict[str, ParamValue]) -> BaseConfig:
        """The config of this name with `params` given; UsageError on a bad or missing value."""
        config = self.config(**{**self.overrides, **params})  # type: ignore[arg-type]
        for key, example in self.required.items():
            if getattr(config, key) is None:
                raise UsageError(
                    f"{key} is required for {self.name}, e.g. {self.name}:{key}={example}"
                )
        return config

    def spec_of(self, config: BaseConfig) -> str:
        """Canonical spec: the name plus each parameter that differs from the name's defaults
        *given the others* (eps_high defaults to eps_low: `dual-clip:eps_low=0.1,eps_high=0.2`
        keeps eps_high=0.2), so that parsing the spec gives `config` back."""
        target = config.params()
        given = {k: v for k, v in target.items() if self.defaults.get(k) != v}
        while True:
            implied = self.config(**{**self.overrides, **given}).params()  # type: ignore[arg-type]
            missing = {k: v for k, v in target.items() if implied[k] != v and k not in given}
            if not missing:
                return format_spec(self.name, given)
            given.update(missing)

    def policy_class(self) -> type[Any]:
        """The computing class, a `Policy` subclass (imports its family module, and torch)."""
        module, _, cls = self.compute.partition(":")
        found: type[Any] = getattr(importlib.import_module(module), cls)
        return found


_PPO_FORMULA = "min(r A, clip(r, 1-eps_low, 1+eps_high) A) / norm"
_ROWS = (
    "N counts rows with a scored token (rows=scored, verl without global_batch_size; "
    "TRL's mean over rows and verl's global_batch_size: rows=all)"
)
CONVENTIONS = (
    "adv=center|zscore|rloo: a group of one has mean 0 and std 1, so A = r_i (verl); "
    "rows=scored by default; agg=micro-token-mean and seq-mean-token-sum-norm per micro-batch"
)
"""The conventions every policy shares (docs/policies.md, Conventions)."""
_FAMILIES = "stabledrl_cli.policies"

REGISTRY: dict[str, PolicyEntry] = {
    entry.name: entry
    for entry in (
        PolicyEntry(
            "ppo",
            "ppo-clip",
            ClipConfig,
            f"{_FAMILIES}.ppo:PPOPolicy",
            _PPO_FORMULA,
            "TRL GRPOTrainer._compute_loss; verl core_algos.compute_policy_loss_vanilla",
            conventions="strict clip bounds; r unclamped",
            clauses={"agg": {"token-mean": "Z of the step (verl token-mean)"}},
        ),
        PolicyEntry(
            "grpo",
            "ppo-clip",
            ClipConfig,
            f"{_FAMILIES}.ppo:PPOPolicy",
            _PPO_FORMULA + ", norm = N |y_i| by default",
            "TRL loss_type=grpo (DeepSeekMath GRPO)",
            {"agg": "seq-mean-token-mean"},
            conventions=_ROWS,
        ),
        PolicyEntry(
            "dapo",
            "ppo-clip",
            ClipConfig,
            f"{_FAMILIES}.ppo:PPOPolicy",
            _PPO_FORMULA + ", clip-higher (eps_high 0.28), norm = Z by default",
            "DAPO arXiv:2503.14476; TRL loss_type=dapo",
            {"eps_high": 0.28, "agg": "token-mean"},
            conventions="Z of the optimizer step (TRL: of the generation batch, the same when "
            "gradient_accumulation_steps = steps_per_generation, else agg=recorded)",
        ),
        PolicyEntry(
            "dual-clip",
            "ppo-clip",
            DualClipConfig,
            f"{_FAMILIES}.ppo:DualClipPolicy",
            "A<0: max(min(r A, clip(r) A), c A); A>=0: min(r A, clip(r) A)",
            "verl compute_policy_loss_vanilla clip_ratio_c (dual-clip PPO, Ye et al. 2020)",
            conventions="log r clamped to [-20, 20] as verl; r = c keeps r A",
        ),
        PolicyEntry(
            "two-sided",
            "ppo-clip",
            TwoSidedConfig,
            f"{_FAMILIES}.ppo:TwoSidedPolicy",
            "min(min(r, delta) A, clip(r, 1-eps_low, 1+eps_high) A) / norm",
            "TRL GRPOConfig.delta (INTELLECT-2)",
            required={"delta": "4"},
            conventions="A < 0 with r > max(delta, 1+eps_high) is discarded (TRL's clip metrics "
            "do not count it); a delta below 1+eps_high discards A > 0 past delta",
        ),
        PolicyEntry(
            "gspo",
            "sequence-clip",
            GSPOConfig,
            f"{_FAMILIES}.gspo:GSPOPolicy",
            "min(min(s_i, delta) A, clip(s_i) A) / norm (default N |y_i|, delta none), "
            "s_i = exp(mean_t log r_t)",
            "GSPO arXiv:2507.18071; TRL importance_sampling_level=sequence",
            conventions=_ROWS + "; sequence log-ratio unclamped (verl clamps it at 10)",
        ),
        PolicyEntry(
            "cispo",
            "clipped-is",
            CISPOConfig,
            f"{_FAMILIES}.cispo:CISPOPolicy",
            "sg(min(r, cap)) A logp / norm; verl form sg(clip(r, 1-eps_low, 1+eps_high))",
            "MiniMax-M1 arXiv:2506.13585; TRL loss_type=cispo; verl compute_policy_loss_cispo",
            conventions="cap alone: TRL's absolute cap; eps_low/eps_high: verl's band; "
            "log r unclamped (verl clamps it at 20)",
        ),
        PolicyEntry(
            "sapo",
            "soft-gate",
            SAPOConfig,
            f"{_FAMILIES}.sapo:SAPOPolicy",
            "sigmoid(tau (r-1)) 4/tau A / norm, tau = tau_pos if A>0 else tau_neg",
            "TRL loss_type=sapo (Soft Adaptive Policy Optimization); verl loss_mode=sapo",
            {"agg": "seq-mean-token-mean"},
            conventions="seq-mean-token-mean as TRL and verl; "
            + _ROWS
            + "; log r unclamped (verl clamps it at 20)",
        ),
        PolicyEntry(
            "vespo",
            "soft-gate",
            VESPOConfig,
            f"{_FAMILIES}.vespo:VESPOPolicy",
            "sg(phi_i) A logp / norm, phi = e^lambda w^k e^(-lambda w), log w_i = sum_t log r_t",
            "VESPO arXiv:2602.10693; TRL loss_type=vespo (GRPOTrainer.get_gamma_weights)",
            conventions="A >= 0 takes k_pos, lambda_pos (TRL); log r clamped to [-20, 20], "
            "log w to [log 1e-8, 20], a NaN or inf phi is 0, as TRL",
        ),
        PolicyEntry(
            "is",
            "reference",
            AggConfig,
            f"{_FAMILIES}.reference:ISPolicy",
            "r A / norm (no clipping)",
            "plain importance sampling: the reference for discarded gradient",
            conventions="infinite only where r |A| overflows the dtype",
        ),
        PolicyEntry(
            "reinforce",
            "reference",
            AggConfig,
            f"{_FAMILIES}.reference:ReinforcePolicy",
            "A logp / norm (no ratio)",
            "verl core_algos.compute_policy_loss_gpg (GPG); REINFORCE",
            conventions="no ratio",
            clauses={"agg": {"token-mean": "Z of the step (verl token-mean)"}},
        ),
        PolicyEntry(
            "stabledrl",
            "self-normalized",
            StableDRLConfig,
            f"{_FAMILIES}.stabledrl:StableDRLPolicy",
            "mean_g sum_i softmax_g(min(mean_t log r_t, log c)) A_i ELBO_i",
            "StableDRL arXiv:2603.06743; networks/llada_svpo.py::compute_loss_spg (use_snis)",
            clauses={
                "level": {
                    "token": "level=token: log w_t = min(log r_t, log c), one weight a token"
                },
                "rows": {
                    "scored": "rows=scored: a row without scored tokens leaves the softmax (the "
                    "public code gives it log w = 0: rows=all)",
                    "all": "rows=all: a row without scored tokens keeps log w = 0 in the "
                    "softmax, as the public code",
                },
                "norm": {
                    "group": "g a prompt group, groups averaged (norm=group)",
                    "batch": "g the whole step: one softmax (norm=batch)",
                    "micro": "g a micro-batch: a softmax each, their mean (norm=micro)",
                },
            },
        ),
        PolicyEntry(
            "gpg",
            "reference",
            AggConfig,
            f"{_FAMILIES}.reference:ReinforcePolicy",
            "A logp / norm (no ratio)",
            "GPG arXiv:2504.02546; verl loss_mode=gpg (compute_policy_loss_gpg)",
            conventions="the same as reinforce, under verl's name",
            clauses={"agg": {"token-mean": "Z of the step (verl token-mean)"}},
        ),
        PolicyEntry(
            "gppo",
            "gradient-preserving",
            GPPOConfig,
            f"{_FAMILIES}.gppo:GPPOPolicy",
            "min(r A, clip(r, b/sg(r) r) A) / norm: past the clip, coef = b A, b the bound",
            "GPPO arXiv:2508.07629 (Klear-Reasoner); Kwai-Klear/KlearReasoner core_algos",
            conventions="no dual clip; nothing discarded, bounded tokens are clipped",
        ),
        PolicyEntry(
            "clip-cov",
            "covariance",
            ClipCovConfig,
            f"{_FAMILIES}.cov:ClipCovPolicy",
            "PPO clip; a random ratio x Z of the unclipped tokens with lb < cov < ub discarded",
            "arXiv:2505.22617 (Entropy Mechanism); verl loss_mode=clip_cov",
            conventions="cov over the step (verl: per micro-batch); the draw depends on seed "
            "and the step's shape, not on torch's global generator",
        ),
        PolicyEntry(
            "kl-cov",
            "covariance",
            KLCovConfig,
            f"{_FAMILIES}.cov:KLCovPolicy",
            "(r A - kl_coef |log r| on the top ratio x Z tokens by cov) / norm",
            "arXiv:2505.22617 (Entropy Mechanism); verl loss_mode=kl_cov",
            conventions="kl_coef 0.1 by default as verl's ActorConfig (its function's "
            "fallback is 1)",
            clauses={
                "cov": {
                    "step": "cov over the step (verl: per micro-batch, cov=micro)",
                    "micro": "cov per recorded micro-batch, as verl (cov=micro)",
                }
            },
        ),
        PolicyEntry(
            "gmpo",
            "geometric-mean",
            GMPOConfig,
            f"{_FAMILIES}.gmpo:GMPOPolicy",
            "mean_i A_i exp(mean_t sgn(A) min(sgn(A) log r, sgn(A) clip(log r)))",
            "GMPO arXiv:2507.20673; verl loss_mode=geo_mean (compute_policy_loss_geo_mean)",
            {"rows": "all"},
            conventions="eps 0.4 by default as the paper (verl uses its clip_ratio); "
            "|y_i| + 1e-8 as verl",
            clauses={
                "rows": {
                    "all": "rows=all as verl's mean over the batch",
                    "scored": "rows=scored: a row without scored tokens leaves the mean (verl: "
                    "rows=all)",
                },
                "mean": {
                    "step": "mean=step one mean over the step (verl: mean=micro, each "
                    "micro-batch's mean, summed)",
                    "micro": "mean=micro each micro-batch's mean, summed, as verl",
                },
            },
        ),
        PolicyEntry(
            "dppo",
            "probability-trust-region",
            DPPOConfig,
            f"{_FAMILIES}.dppo:DPPOPolicy",
            "sg(min(r, c)) A logp / norm where p - p_old (tv) or binary KL (kl) stays in bound",
            "DPPO arXiv:2602.04879; verl loss_mode=dppo_tv / dppo_kl; prime-rl",
            conventions="log r clamped to [-20, 20] as verl; c 3 by default as verl's ActorConfig",
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

MAX_POLICIES = 4096
"""The most policies one evaluation takes: the settings of a tune (their per-step rows are held
for the whole run) and the policies a baseline names (`check -b` replays each)."""


def catalogue() -> list[PolicyEntry]:
    """Every name of the catalogue, in display order."""
    return list(REGISTRY.values())


def parse_spec(spec: str) -> tuple[PolicyEntry, dict[str, ParamValue]]:
    """-> (entry, typed parameters given); UsageError on an unknown name, key or a bad value."""
    name, raw = split_spec(spec)
    entry = REGISTRY.get(name)
    if entry is None:
        raise UsageError(f"unknown policy {quoted(name)}; valid: {', '.join(REGISTRY)}")
    hints = type_hints(entry.config)
    params: dict[str, ParamValue] = {}
    for key, text in raw.items():
        if key not in entry.keys:
            raise UsageError(
                f"unknown key {quoted(key)} for policy {name!r}; "
                f"valid keys: {', '.join(entry.keys)}"
            )
        try:
            params[key] = convert_value(key, text, hints[key])
        except UsageError as exc:
            raise UsageError(f"policy spec {quoted_spec(spec)}: {exc}") from None
    return entry, params


def resolve_spec(spec: str) -> tuple[PolicyEntry, BaseConfig]:
    """-> (entry, validated config) without importing torch; UsageError on any bad spec."""
    entry, params = parse_spec(spec)
    try:
        return entry, entry.make_config(params)
    except UsageError as exc:
        raise UsageError(f"policy spec {quoted_spec(spec)}: {exc}") from None
