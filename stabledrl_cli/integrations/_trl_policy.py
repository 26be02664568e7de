"""TRL `GRPOConfig` (and `RLOOConfig`, `rloo_policy_for_config`) -> the catalogue policy that
reproduces TRL's loss (docs/policies.md).

| TRL config                                   | policy spec                                       |
|----------------------------------------------|---------------------------------------------------|
| loss_type="grpo"                             | grpo:eps_low,eps_high,agg=seq-mean-token-mean     |
| loss_type="sapo"                             | sapo:tau_pos,tau_neg,agg=seq-mean-token-mean      |
| loss_type="dr_grpo"                          | ppo:eps_low,eps_high,agg=constant,max_len=L       |
| loss_type="bnpo"                             | ppo:eps_low,eps_high,agg=micro-token-mean         |
| loss_type="dapo"                             | dapo:eps_low,eps_high,agg=token-mean or recorded  |
| loss_type="cispo"                            | cispo:cap=epsilon_high,agg=token-mean or recorded |
| loss_type="luspo"                            | ppo:eps_low,eps_high,agg=seq-mean-token-sum,      |
|                                              | rows=all (gspo:... when sequence-level)           |
| loss_type="vespo"                            | vespo:k_pos,lambda_pos,k_neg,lambda_neg,          |
|                                              | agg=token-mean or recorded                        |
| importance_sampling_level="sequence"         | gspo:eps_low,eps_high with the loss type's agg    |
| (grpo, bnpo, dr_grpo, dapo, luspo)           | (grpo: seq-mean-token-mean, bnpo:                 |
|                                              | micro-token-mean, dr_grpo: constant, dapo:        |
|                                              | token-mean or recorded)                           |
| delta (grpo, bnpo, dr_grpo, dapo, luspo)     | two-sided:delta,... (same agg); gspo:...,delta    |
|                                              | when sequence-level                               |
| mask_truncated_completions or a rollout_func | the same spec with rows=all                       |
| (grpo, sapo, dr_grpo, gspo)                  |                                                   |
| beta > 0                                     | every spec above gains beta                       |
| use_bias_correction_kl (default) with beta   | ... and kl_is=token (the KL times the ratio), or  |
|                                              | kl_is=sequence when sequence-level (times the     |
|                                              | sequence ratio, vespo's too)                      |
| beta with an entropy, off-policy or vLLM     | ... and kl_weight=none (TRL adds the KL term      |
| weight (recorded as loss_weight)             | after weighting the policy term)                  |

eps_low is TRL's `epsilon`, eps_high its `epsilon_high` (default `epsilon`); for cispo
`epsilon_high` is the absolute cap. bnpo's per-micro-batch token mean reads the recorded
`micro_batch`. grpo, sapo and dr_grpo average over every row of a micro-batch: the catalogue's
default counts rows with a scored token, the same unless a row has none: the cases that can
empty one map to rows=all, `mask_truncated_completions` (a truncated completion masked whole)
and a trainer's `rollout_func` (its `env_mask`, TRL's tool mask, can mask a whole
completion). dapo and cispo divide by the generation batch's token
count times gradient_accumulation_steps / steps_per_generation: that is the optimizer step's
token count (token-mean) only when the two are equal; otherwise it is a number the step does
not contain, and the run's own normaliser is replayed from the recorded `loss_scale`
(agg=recorded); vespo divides as they do. luspo sums each row's tokens and averages over every
row. vespo ignores delta, as TRL does.

Refused, one line each (the catalogue cannot express them, so recording them would be
wrong): sequence-level sampling with cispo or sapo (a sequence ratio under their rule);
vespo with vLLM importance sampling (TRL folds the sampler's ratio into w); the
entropy bonus (`entropy_coef`, `use_adaptive_entropy`); dr_grpo without a
`max_completion_length` (None: TRL's own loss cannot divide by it). An MoE router loss is no part of
the policy: the step records it apart (`dump._schema.LOSS_AUX`), for both trainers.

RLOO (`RLOOConfig`, recorded one entry a completion): `ppo:eps_low,eps_high,
agg=micro-token-mean`, the PPO clip of each completion's ratio, each micro-batch's mean over
its completions, averaged; beta is not in the spec (TRL subtracts it times the sequence KL
from the reward, so it is in the recorded advantages).
"""

from __future__ import annotations

from typing import Any

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies import Policy, get_policy
from stabledrl_cli.spec import SpecValue, format_spec

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""TRL 1.16's loss types, each recorded (gspo: a PPO-clip type with sequence-level sampling)."""

_PPO_NAMES = {"grpo": "grpo", "bnpo": "ppo", "dr_grpo": "ppo", "dapo": "dapo", "luspo": "ppo"}
_SEQUENCE_LEVEL = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "vespo")
"""Loss types whose loss TRL's sequence-level sampling leaves expressible: the PPO clip of the
sequence ratio (gspo) under the loss type's own normaliser (vespo's ignores it)."""


def _refuse(reason: str) -> UsageError:
    return UsageError(f"cannot record this TRL run: {reason}")


def _epsilons(config: Any) -> dict[str, SpecValue]:
    """eps_low (TRL's `epsilon`) and eps_high (its `epsilon_high`, default `epsilon`)."""
    eps_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
    return {"eps_low": float(config.epsilon), "eps_high": float(eps_high)}


def _policy(name: str, params: dict[str, SpecValue]) -> Policy:
    """The catalogue's policy `name` with `params`; a parameter it refuses is refused in one
    line."""
    try:
        return get_policy(format_spec(name, params))
    except UsageError as exc:
        raise _refuse(str(exc)) from None


def uses_loss_weight(config: Any) -> bool:
    """True when TRL multiplies per-token losses by a weight (recorded as `loss_weight`)."""
    return bool(
        config.top_entropy_quantile < 1.0
        or config.off_policy_mask_threshold is not None
        or (config.use_vllm and config.vllm_importance_sampling_correction)
    )


def _aggregation(config: Any, every_row: bool) -> dict[str, SpecValue]:
    """The `agg` (and `max_len`) that reproduces TRL's normaliser for this config; every_row:
    a row can score no token, and TRL's sequence means count it."""
    loss_type = config.loss_type
    rows: dict[str, SpecValue] = {"rows": "all"} if every_row else {}
    if loss_type == "bnpo":
        return {"agg": "micro-token-mean"}
    if loss_type in ("grpo", "sapo"):
        return {"agg": "seq-mean-token-mean", **rows}
    if loss_type == "luspo":  # (loss * mask).sum(-1).mean(): every row, whatever its mask
        return {"agg": "seq-mean-token-sum", "rows": "all"}
    if loss_type == "dr_grpo":
        return {"agg": "constant", "max_len": int(config.max_completion_length), **rows}
    same_window = config.gradient_accumulation_steps == config.steps_per_generation
    return {"agg": "token-mean" if same_window else "recorded"}


def _check_recordable(config: Any) -> None:
    loss_type = config.loss_type
    if loss_type not in LOSS_TYPES:
        raise _refuse(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if config.entropy_coef != 0.0 or config.use_adaptive_entropy:
        raise _refuse(
            "the entropy bonus (entropy_coef, use_adaptive_entropy) is not in the catalogue"
        )
    sequence = config.importance_sampling_level == "sequence"
    if sequence and loss_type not in _SEQUENCE_LEVEL:
        raise _refuse(
            f"sequence-level sampling with loss_type {loss_type!r}; only "
            f"{', '.join(repr(t) for t in _SEQUENCE_LEVEL)} map"
        )
    if loss_type == "vespo" and config.use_vllm and config.vllm_importance_sampling_correction:
        raise _refuse("vespo with vLLM importance sampling (TRL folds the sampler ratio into w)")
    if loss_type == "dr_grpo" and config.max_completion_length is None:
        raise _refuse(
            "loss_type 'dr_grpo' divides by max_completion_length, which is None (TRL's own "
            "loss raises a TypeError at the first step): set max_completion_length"
        )


def policy_for_config(config: Any, *, rollout_func: bool = False) -> Policy:
    """The catalogue policy reproducing a TRL 1.16 `GRPOConfig` (table in the module
    docstring; its `.spec` is canonical, e.g. `grpo` for TRL's grpo defaults) of a trainer
    given a `rollout_func` or not; UsageError, one line, for a configuration the catalogue
    cannot express."""
    _check_recordable(config)
    epsilons = _epsilons(config)
    # a truncated completion that TRL masks, or a rollout_func's env_mask, can leave a row no
    # scored token
    every_row = bool(config.mask_truncated_completions or rollout_func)
    params: dict[str, SpecValue]
    loss_type = config.loss_type
    if loss_type == "vespo":
        name, params = (
            "vespo",
            {
                "k_pos": float(config.vespo_k_pos),
                "lambda_pos": float(config.vespo_lambda_pos),
                "k_neg": float(config.vespo_k_neg),
                "lambda_neg": float(config.vespo_lambda_neg),
                **_aggregation(config, every_row),
            },
        )
    elif config.importance_sampling_level == "sequence":
        name, params = "gspo", {**epsilons, **_aggregation(config, every_row)}
        if config.delta is not None:
            params["delta"] = float(config.delta)
    elif loss_type == "cispo":
        name, params = "cispo", {"cap": epsilons["eps_high"], **_aggregation(config, every_row)}
    elif loss_type == "sapo":
        params = {
            "tau_pos": float(config.sapo_temperature_pos),
            "tau_neg": float(config.sapo_temperature_neg),
            **_aggregation(config, every_row),
        }
        name = "sapo"
    else:
        name = _PPO_NAMES[loss_type]
        params = {**epsilons, **_aggregation(config, every_row)}
        if config.delta is not None:
            name, params["delta"] = "two-sided", float(config.delta)
    if config.beta != 0.0:
        params["beta"] = float(config.beta)
        if config.use_bias_correction_kl:  # the KL times TRL's coef_1, of either level
            params["kl_is"] = (
                "sequence" if config.importance_sampling_level == "sequence" else "token"
            )
        if uses_loss_weight(config):  # TRL adds the KL term after its per-token weights
            params["kl_weight"] = "none"
    return _policy(name, params)


def cispo_cap_warning(config: Any) -> str | None:
    """A warning line for cispo whose cap is under 1, where it caps every token's ratio (1 on
    the rollout's own policy), so it scales each gradient down: `epsilon_high` unset (TRL
    then takes `epsilon`, 0.2 by default; its help recommends 5.0) or set so; else None. The
    run is recorded as TRL trains it."""
    if config.loss_type != "cispo":
        return None
    cap = float(_epsilons(config)["eps_high"])
    if cap >= 1:
        return None
    unset = config.epsilon_high is None
    setting, at = (" unset", f"epsilon, {cap:g}") if unset else (f"={cap:g}", f"{cap:g}")
    return (
        f"stabledrl: warning: loss_type='cispo' with epsilon_high{setting} caps each token's "
        f"ratio at {at}, below its on-policy 1: every gradient is scaled down (TRL's help "
        "recommends epsilon_high=5.0); recorded as TRL trains it\n"
    )


def rloo_policy_for_config(config: Any) -> Policy:
    """The catalogue policy reproducing a TRL 1.16 `RLOOConfig`'s loss on a run recorded one
    entry a completion (module docstring; `ppo:agg=micro-token-mean` for TRL's defaults)."""
    return _policy("ppo", {**_epsilons(config), "agg": "micro-token-mean"})
