"""verl `ActorConfig` -> the catalogue policy that reproduces verl's policy loss, and the
per-token normaliser each `loss_agg_mode` divides by (docs/policies.md).

| verl actor config (`policy_loss.loss_mode`)  | policy spec                                       |
|----------------------------------------------|---------------------------------------------------|
| vanilla                                      | dual-clip:eps_low,eps_high,c=clip_ratio_c,agg     |
|                                              | (clip_ratio_c=inf, no dual clip: c=1e9)           |
| gspo                                         | gspo:form=token,log_ratio_max=10,eps_low,         |
|                                              | eps_high,agg                                      |
| sapo                                         | sapo:tau_pos,tau_neg,rows=all                     |
| cispo                                        | cispo:eps_low,eps_high,agg                        |
| gpg                                          | reinforce:agg                                     |
| dppo_tv, dppo_kl                             | dppo:divergence=tv|kl,delta_low=eps_low,          |
|                                              | delta_high=eps_high,c=clip_ratio_c,agg (+         |
|                                              | logp_dtype, as kl_cov's)                          |
| geo_mean                                     | gmpo:eps_low,eps_high,mean=micro (rows=all)       |
| kl_cov                                       | kl-cov:ratio=kl_cov_ratio,kl_coef=ppo_kl_coef,    |
|                                              | cov=micro,agg (+ logp_dtype=bfloat16|float16 when |
|                                              | the model's log-probs are)                        |
| use_kl_loss with kl_loss_coef != 0,          | every spec above but gmpo's gains                 |
| kl_loss_type low_var_kl or k3                | beta=kl_loss_coef, kl_weight=none (verl leaves    |
|                                              | the KL unweighted) and kl_max=10 (its clamp)      |

eps_low is `clip_ratio_low`, eps_high `clip_ratio_high` (each defaulting to `clip_ratio`);
inf, which verl takes for no clip on that side, is 1e9, as clip_ratio_c=inf is.
`loss_agg_mode` -> agg of the same name (token-mean, token-sum, seq-mean-token-mean,
seq-mean-token-sum, seq-mean-token-sum-norm; the last with max_len = `loss_scale_factor`, else
the padded response width verl divides by, `loss_mask.shape[-1]`; with nested responses,
verl's trainer.use_v1, each micro-batch pads to its own longest response, a width that varies
from one micro-batch to the next: agg=recorded, the normaliser recorded per token). verl
divides by the mini-batch's global token count, or by its configured sequence count
`global_batch_size`: the catalogue's Z, and N with rows=all (every sequence, scored or not),
of the step's merged ranks; token-mean's count is of the engine's loss_mask, which verl's v1
trainer leaves as generated when its rollout rejection sampling zeroes tokens of response_mask
(the tokens the loss scores): a step whose micro-batch shows such tokens maps token-mean to
agg=recorded (the hook turns the run's spec to it at the first such step: the earlier steps
replay by it too). The normaliser verl used is also recorded per token
(`loss_scale`), so `agg=recorded` replays it exactly whatever the batch.
verl clamps log r to [-20, 20] (vanilla, sapo, cispo, dppo): the catalogue agrees while the
ratios stay inside that clamp; its clamp of GSPO's sequence log ratio at 10 is the spec's
log_ratio_max=10 and its clamp of the k3 KL at 10 the spec's kl_max=10 (gradient 0 where
either binds). verl's gspo is
the token form (sg(s_i) p_t / sg(p_t)), the catalogue's gspo:form=token: the loss of the
sequence form, and each token's own gradient s_i w_t A_t / norm_t.

geo_mean takes torch.mean over each micro-batch's rows, with no global normaliser (and no
dp_size factor): a rank's loss is the sum of its micro-batches' means, and the ranks'
gradient all-reduce (and verl's logged pg_loss) averages those sums over the data-parallel
ranks. That is gmpo's mean=micro over the recorded `micro_batch`, whose sum a replay divides
by the step's ranks (the run's world_size: the reader keeps each rank's micro-batches
apart). kl_cov penalises the top kl_cov_ratio of each micro-batch's tokens by a covariance
over that micro-batch (each rank's own): kl-cov's cov=micro over the recorded `micro_batch`;
its agg_loss divides by the global normalisers times dp_size like the other modes; it
centres the log-probs for that covariance in the model's output dtype (bfloat16 from
bfloat16 logits without flash-attn's cross-entropy), where rounding reorders near-equal
covariances: the spec names that dtype (`logp_dtype`), and a float64 output is refused. dppo
takes p = exp(log_prob) in that dtype too, whose rounding moves tokens across its trust
region's bound: the same `logp_dtype`. With geo_mean the recorded `loss_scale` is
loss_agg_mode's normaliser (`token_loss_scale`), which verl's GMPO term does not use.

Refused, one line each (the catalogue cannot express them, so recording them would be wrong):
clip_cov (a random draw among each micro-batch's tokens), geo_mean with use_kl_loss (verl
normalises its KL term by loss_agg_mode, gmpo's by its own row mean), sapo with use_kl_loss
unless loss_agg_mode is seq-mean-token-mean (verl's sapo term is always seq-mean-token-mean,
its KL term loss_agg_mode's; beta shares the policy term's); dro, bypass_mode and any
user-registered loss mode, also one registered over a mode above (the mapped policy would
reproduce verl's loss, not the registered one: the hook records such a loss's steps with no
policy instead, `unidentified_loss`); on-policy distillation
(`distillation_ppo_loss`, refused by the hook on the engine); KL types other than low_var_kl
and k3 (k1, abs, k2, the straight-through "+" forms); the entropy bonus (`entropy_coeff != 0`);
kl_cov and dppo of a model whose log-probs are float64 (a float32 recording cannot compute in
them as verl does); seq-mean-token-sum-norm with a `loss_scale_factor` that is not a whole
number (max_len is an integer), but for geo_mean, which ignores it; a step whose
micro-batches map to another spec than the run's first step (`policy_changed`: another padded
width or log-prob dtype).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.integrations._verl_facts import VERL_SEQ_LOG_RATIO_MAX
from stabledrl_cli.policies import Policy, get_policy
from stabledrl_cli.spec import SpecValue, format_spec

LOSS_MODES = (
    "vanilla",
    "gspo",
    "sapo",
    "cispo",
    "gpg",
    "dppo_tv",
    "dppo_kl",
    "geo_mean",
    "kl_cov",
)
"""verl loss modes the integration records."""

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""verl's `loss_agg_mode` values (core_algos.agg_loss)."""

KL_TYPES = ("low_var_kl", "k3")
"""verl KL types equal to the catalogue's k3 term clamped at kl_max=10."""

VERL_KL_MAX = 10.0
"""verl's kl_penalty clamps the low_var_kl / k3 term at 10 (the spec's kl_max)."""

_SEQ_TOKEN_MEAN_EPS = 1e-8
"""verl's seq-mean-token-mean divides each sequence's sum by its length + 1e-8."""


def _refuse(reason: str) -> UsageError:
    return UsageError(f"cannot record this verl run: {reason}")


def loss_mode(config: Any) -> str:
    """The actor's `policy_loss.loss_mode` (verl's default "vanilla")."""
    return str(config.policy_loss.get("loss_mode", "vanilla"))


def agg_mode(config: Any) -> str:
    """The aggregation verl's loss really uses: sapo always aggregates seq-mean-token-mean."""
    return "seq-mean-token-mean" if loss_mode(config) == "sapo" else str(config.loss_agg_mode)


NO_BOUND = 1e9
"""The bound of a verl setting of inf, which turns that bound off (`_bound`): above e^20, the
largest ratio verl's clamp of log r at 20 lets through, e^10, gspo's capped sequence ratio,
and the probability change or binary KL of dppo and the log r of geo_mean of any finite
log-probs a model gives, so it binds nowhere verl's inf does not."""


def _bound(value: Any) -> float:
    """A verl bound as a float, inf (no bound) as NO_BOUND: the catalogue's are finite."""
    bound = float(value)
    return NO_BOUND if bound == math.inf else bound


def _clip_range(config: Any) -> tuple[float, float]:
    """(clip_ratio_low, clip_ratio_high), each defaulting to clip_ratio; inf as NO_BOUND."""
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return _bound(low), _bound(high)


_SEQUENCE_MEANS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _aggregation(
    mode: str, config: Any, response_width: int | None, rejected_tokens: bool
) -> dict[str, SpecValue]:
    """agg (and rows, max_len) of a verl loss_agg_mode: sequence means count every sequence
    of the mini-batch (verl's global_batch_size). seq-mean-token-sum-norm without
    loss_scale_factor over nested responses (response_width None) divides each micro-batch by
    its own padded width, which no max_len expresses, and token-mean over rejected tokens
    divides by a count that holds them: agg=recorded, verl's normaliser."""
    if mode == "token-mean" and rejected_tokens:
        return {"agg": "recorded"}
    params: dict[str, SpecValue] = {"agg": mode}
    if mode in _SEQUENCE_MEANS:
        params["rows"] = "all"
    if mode == "seq-mean-token-sum-norm":
        factor = config.loss_scale_factor
        if factor is not None and not float(factor).is_integer():
            raise _refuse(
                f"loss_scale_factor {factor!r} is not a whole number: verl divides by it, "
                "the catalogue's max_len is an integer"
            )
        horizon = factor if factor is not None else response_width
        if horizon is None:
            return {"agg": "recorded"}
        params["max_len"] = int(horizon)
    return params


def distillation_refused() -> UsageError:
    """The refusal of an actor that trains on verl's distillation loss."""
    return _refuse(
        "on-policy distillation (distillation.enabled): the actor's loss, verl's "
        "distillation_ppo_loss, adds a teacher's distillation loss the catalogue has no term for"
    )


def custom_loss_refused(name: str) -> UsageError:
    """The refusal of an actor that trains on a loss of its own (`name`), not verl's."""
    return _refuse(
        f"the actor trains with the loss {name}, not verl's ppo_loss: the recorder captures "
        "the terms of verl's own loss only"
    )


def policy_changed(spec: str, run_spec: str) -> UsageError:
    """The refusal of a step whose micro-batches map to `spec`, not the run's `run_spec`."""
    return _refuse(
        f"the step maps to {spec}, not the run's {run_spec}: its padded response width or "
        "log-prob dtype changed (a fixed loss_scale_factor keeps seq-mean-token-sum-norm's "
        "horizon)"
    )


_CLIP_COV = (
    "verl zeroes a random draw (torch's global generator) among each micro-batch's tokens, by "
    "a covariance over that micro-batch; the catalogue's clip-cov draws its own over the step"
)


_HALF_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""Log-prob dtypes other than float32 whose values a float32 recording holds exactly."""


def _logp_dtype(mode: str, logp_dtype: torch.dtype) -> dict[str, SpecValue]:
    """`logp_dtype` of kl-cov and dppo, whose verl losses compute in the log-probs' own dtype
    (kl_cov centres them, dppo takes exp): {} for float32; refused for a dtype whose values
    a float32 recording does not hold."""
    if logp_dtype == torch.float32:
        return {}
    if logp_dtype not in _HALF_DTYPES:
        raise _refuse(
            f"loss_mode {mode!r} with {logp_dtype} log-probs: verl computes in their own "
            "dtype, which a float32 recording cannot reproduce"
        )
    return {"logp_dtype": _HALF_DTYPES[logp_dtype]}


def _kl_loss(config: Any) -> bool:
    """Whether verl's loss has a KL term: use_kl_loss with a non-zero kl_loss_coef."""
    return bool(config.use_kl_loss) and float(config.kl_loss_coef) != 0.0


def unidentified_loss(config: Any) -> str | None:
    """Why the actor's policy loss is none the catalogue can name, when the loss mode is a
    user's (`core_algos.register_policy_loss(mode)`: a function of its own under a new name,
    or over one of verl's modes, replacing verl's `compute_policy_loss_<mode>`); None for
    verl's own loss of that mode, or a mode the registry lacks (verl refuses it), or without
    verl (no registry to ask). Its steps are recorded with no policy: the mapped policy
    would reproduce verl's loss, not the one that trains."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return None
    mode = loss_mode(config)
    registered = core_algos.POLICY_LOSS_REGISTRY.get(mode)
    own = getattr(core_algos, f"compute_policy_loss_{mode}", None)
    if registered is None or registered is own:
        return None
    name = getattr(registered, "__qualname__", repr(registered))
    where = getattr(registered, "__module__", None)
    verls = f"not verl's own compute_policy_loss_{mode}" if own else "not one of verl's losses"
    return (
        f"loss_mode {mode!r} is registered to {where + '.' if where else ''}{name}, {verls}: "
        "no catalogue policy is the run's own"
    )


def _refuse_a_replaced_loss(config: Any) -> None:
    """Refuses a loss mode registered to a user's function (`unidentified_loss`): the
    mapped policy reproduces verl's, not the one that trains."""
    reason = unidentified_loss(config)
    if reason is not None:
        raise _refuse(reason)


def _check_recordable(config: Any) -> None:
    mode = loss_mode(config)
    if mode == "clip_cov":
        raise _refuse(f"loss_mode 'clip_cov': {_CLIP_COV}")
    if mode == "geo_mean" and _kl_loss(config):
        raise _refuse(
            "loss_mode 'geo_mean' with use_kl_loss: verl normalises the KL term by "
            "loss_agg_mode, the catalogue's gmpo by its own mean over rows"
        )
    if mode == "sapo" and _kl_loss(config) and config.loss_agg_mode != agg_mode(config):
        raise _refuse(
            f"loss_mode 'sapo' with use_kl_loss and loss_agg_mode {config.loss_agg_mode!r}: "
            "verl aggregates its sapo term seq-mean-token-mean and its KL term by "
            "loss_agg_mode, the catalogue's beta term as its policy term"
        )
    _refuse_a_replaced_loss(config)
    if mode not in LOSS_MODES:
        raise _refuse(f"loss_mode {mode!r} is not one of {', '.join(LOSS_MODES)}")
    if agg_mode(config) not in AGG_MODES:
        raise _refuse(
            f"loss_agg_mode {config.loss_agg_mode!r} is not one of {', '.join(AGG_MODES)}"
        )
    if float(config.entropy_coeff) != 0.0:
        raise _refuse("the entropy bonus (entropy_coeff != 0) is not in the catalogue")
    if _kl_loss(config) and config.kl_loss_type not in KL_TYPES:
        raise _refuse(
            f"kl_loss_type {config.kl_loss_type!r}; only {', '.join(KL_TYPES)} (k3) map to beta"
        )


def _dual_clip_c(config: Any, default: float) -> float:
    """verl's clip_ratio_c (`default` when unset); inf, which turns the dual clip off (and
    leaves dppo's ratio untruncated), as NO_BOUND."""
    return _bound(config.get("clip_ratio_c", default))


def _or(value: Any, fallback: float) -> float:
    return float(value) if value is not None else fallback


def policy_for_actor_config(
    config: Any,
    response_width: int | None,
    logp_dtype: torch.dtype = torch.float32,
    rejected_tokens: bool = False,
) -> Policy:
    """The catalogue policy reproducing a verl 0.9 `ActorConfig` (table in the module
    docstring). response_width: the padded response length (the horizon of
    seq-mean-token-sum-norm without `loss_scale_factor`; a flat recording keeps scored tokens
    only, so the padded width is not in the step), None when the responses come nested and
    each micro-batch pads them to its own longest (verl's trainer.use_v1). logp_dtype: the
    dtype of the model's log-probs, in which kl_cov centres them and dppo takes exp.
    rejected_tokens: the batch's loss_mask counts tokens its response_mask leaves out (verl's
    v1 trainer applies rollout rejection sampling to response_mask alone), which token-mean's
    batch_num_tokens counts. UsageError, one line, for a configuration the catalogue cannot
    express."""
    _check_recordable(config)
    mode = loss_mode(config)
    eps_low, eps_high = _clip_range(config)
    # verl's GMPO term takes no loss_agg_mode (nor its loss_scale_factor): none to map
    agg = (
        {}
        if mode == "geo_mean"
        else _aggregation(agg_mode(config), config, response_width, rejected_tokens)
    )
    params: dict[str, SpecValue]
    if mode == "vanilla":
        c = _dual_clip_c(config, 3.0)
        name, params = "dual-clip", {"eps_low": eps_low, "eps_high": eps_high, "c": c, **agg}
    elif mode == "gspo":
        bounds = {"eps_low": eps_low, "eps_high": eps_high, "log_ratio_max": VERL_SEQ_LOG_RATIO_MAX}
        name, params = "gspo", {"form": "token", **bounds, **agg}
    elif mode == "sapo":
        tau = {"tau_pos": float(config.tau_pos), "tau_neg": float(config.tau_neg)}
        name, params = "sapo", {**tau, **agg}
    elif mode == "cispo":
        name, params = "cispo", {"eps_low": eps_low, "eps_high": eps_high, **agg}
    elif mode == "gpg":
        name, params = "reinforce", dict(agg)
    elif mode == "geo_mean":
        name, params = "gmpo", {"eps_low": eps_low, "eps_high": eps_high, "mean": "micro"}
    elif mode == "kl_cov":
        kl_cov = {  # compute_policy_loss_kl_cov's fallbacks for an unset value
            "ratio": _or(config.policy_loss.get("kl_cov_ratio"), 0.0002),
            "kl_coef": _or(config.policy_loss.get("ppo_kl_coef"), 1.0),
        }
        dtype = _logp_dtype(mode, logp_dtype)
        name, params = "kl-cov", {**kl_cov, "cov": "micro", **dtype, **agg}
    else:
        c = _dual_clip_c(config, 20.0)  # verl's dppo default (ActorConfig's is 3)
        bounds = {"delta_low": eps_low, "delta_high": eps_high, "c": c}
        dtype = _logp_dtype(mode, logp_dtype)
        name, params = "dppo", {"divergence": mode.removeprefix("dppo_"), **bounds, **dtype, **agg}
    if _kl_loss(config):  # verl weights its policy term only by rollout_is_weights
        params["beta"] = float(config.kl_loss_coef)
        params["kl_weight"] = "none"
        params["kl_max"] = VERL_KL_MAX
    try:
        return get_policy(format_spec(name, params))
    except UsageError as exc:
        raise _refuse(_with_verls_setting(str(exc))) from None


VERL_SETTINGS = {
    "eps_low": "clip_ratio_low, or clip_ratio when unset",
    "eps_high": "clip_ratio_high, or clip_ratio when unset",
    "delta_low": "clip_ratio_low, or clip_ratio when unset",
    "delta_high": "clip_ratio_high, or clip_ratio when unset",
    "c": "clip_ratio_c",
    "tau_pos": "tau_pos",
    "tau_neg": "tau_neg",
    "ratio": "policy_loss.kl_cov_ratio",
    "kl_coef": "policy_loss.ppo_kl_coef",
    "beta": "kl_loss_coef",
    "max_len": "loss_scale_factor",
}
"""The verl actor setting each parameter of a mapped spec comes from (the module docstring's
table)."""
_REFUSED_PARAMETER = re.compile(r"': (\w+) (?:must|expects) ")


def _with_verls_setting(reason: str) -> str:
    """The catalogue's refusal of a spec parameter, and which of verl's settings it is: a
    verl user wrote kl_loss_coef, not beta."""
    found = _REFUSED_PARAMETER.search(reason)
    if found is None or found.group(1) not in VERL_SETTINGS:
        return reason
    return f"{reason} ({found.group(1)} is {VERL_SETTINGS[found.group(1)]})"


def token_loss_scale(
    mode: str,
    mask: torch.Tensor,
    *,
    batch_num_tokens: float | None,
    global_batch_size: float | None,
    loss_scale_factor: float | None,
) -> torch.Tensor:
    """[B, L] float64: the normaliser of each token's term in the step's objective over all
    data-parallel ranks, as verl's `agg_loss` divides by it (mask: [B, L] the micro-batch's
    response mask). verl multiplies each rank's loss by dp_size and the data-parallel gradient
    averages over ranks: the two cancel, so a rank's loss is dp_size times its share
    sum_t value_t / loss_scale_t. Without the global counts verl normalises by the
    micro-batch's own (dp_size is then 1)."""
    maskf = mask.to(torch.float64)
    ones = torch.ones_like(maskf)
    live = float((maskf.sum(-1) > 0).sum())
    seqs = float(global_batch_size) if global_batch_size is not None else live
    if mode == "token-mean":
        tokens = float(batch_num_tokens) if batch_num_tokens is not None else float(maskf.sum())
        return tokens * ones
    if mode == "token-sum":
        return ones
    if mode == "seq-mean-token-sum":
        return seqs * ones
    if mode == "seq-mean-token-sum-norm":
        horizon = float(loss_scale_factor) if loss_scale_factor is not None else mask.shape[-1]
        return seqs * horizon * ones
    if mode == "seq-mean-token-mean":
        lengths = maskf.sum(-1, keepdim=True) + _SEQ_TOKEN_MEAN_EPS
        return seqs * lengths.expand_as(maskf)
    raise _refuse(f"loss_agg_mode {mode!r} is not one of {', '.join(AGG_MODES)}")
