"""The policy contract: `Policy.weights(batch) -> Weights` (docs/policies.md, "The contract").

A family module implements `_policy_terms`, the policy-gradient part of J; the base adds the
KL term, zeroes unscored tokens, makes non-finite inputs visible in `coef`, and restricts
`discarded` / `clipped` to eligible tokens (mask = 1 and A != 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies._config import AggConfig, BaseConfig, ParamValue
from stabledrl_cli.policies._masked import count_nonfinite, keep_times, masked_sum
from stabledrl_cli.policies._policy_batch import PolicyBatch
from stabledrl_cli.policies._prepare import prepare
from stabledrl_cli.policies._prepared_batch import PreparedBatch
from stabledrl_cli.policies._registry import PolicyEntry
from stabledrl_cli.policies._rollout import rollout_corrected
from stabledrl_cli.vocab import Rows, Unit


@dataclass(frozen=True)
class Weights:
    """What a policy does to one step. Token arrays are [T], in the order of the input:
    `coef` (dJ/d logp_t of the surrogate objective J), `discarded` and `clipped` (bool: the
    rule zeroed a token's term, or bounded it and kept its gradient), `objective` (0-d J; the
    loss is -J), `norm` (the aggregation's normalizer), `advantages` (as used) and `nonfinite`
    (0-d count of scored tokens whose coef is NaN or inf)."""

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


def num_sequences(prep: PreparedBatch, rows: Rows) -> torch.Tensor:
    """0-d N of a sequence mean: sequences with a scored token, or every row."""
    return prep.num_live_seqs if rows == "scored" else prep.num_rows


def seq_mean_token_mean_norm(prep: PreparedBatch, rows: Rows) -> torch.Tensor:
    """[T] N |y_i|, the normalizer of a sequence mean of token means (shared per step)."""
    key = ("seq_mean_token_mean", rows)
    return prep.memo(key, lambda: num_sequences(prep, rows) * prep.seq_len_tokens)


def agg_norm(prep: PreparedBatch, config: AggConfig) -> torch.Tensor:
    """[T] normalizer norm_t of each token under `config.agg` (docs/policies.md, Aggregation),
    computed once per step and aggregation: policies of the same aggregation share the tensor
    (a replay's metrics share their REINFORCE references through it)."""
    key = ("agg_norm", config.agg, config.rows, config.max_len)
    return prep.memo(key, lambda: _agg_norm(prep, config))


def _agg_norm(prep: PreparedBatch, config: AggConfig) -> torch.Tensor:
    if prep.seq_rank is not None:
        return _rank_agg_norm(prep, config)
    agg = config.agg
    ones = torch.ones_like(prep.logp)
    if agg == "token-mean":
        return prep.num_scored * ones
    if agg == "token-sum":
        return ones
    if agg == "micro-token-mean":
        # Z_k K: each micro-batch's own token mean, averaged over the K micro-batches.
        tokens = prep.micro_sum(prep.seq_len).clamp(min=1.0)
        return prep.per_token((tokens * float(prep.num_micro))[prep.seq_micro])
    n_seq = num_sequences(prep, config.rows)
    if agg == "seq-mean-token-mean":
        return seq_mean_token_mean_norm(prep, config.rows)
    if agg == "seq-mean-token-sum":
        return n_seq * ones
    if agg == "constant":
        assert config.max_len is not None  # AggConfig requires it
        return n_seq * float(config.max_len) * ones
    if agg == "seq-mean-token-sum-norm":
        return n_seq * _horizon(prep, config)
    return _recorded_scale(prep)


def rank_sum(prep: PreparedBatch, per_seq: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """[N] -> [N]: R times the sum over the sequence's rank's part (`rank`, its
    `prep.seq_rank`), clamped to >= 1: a rank's own count, averaged over the R ranks."""
    sums = torch.zeros(prep.ranks, dtype=per_seq.dtype, device=per_seq.device)
    return (sums.index_add_(0, rank, per_seq).clamp(min=1.0) * float(prep.ranks))[rank]


def _rank_agg_norm(prep: PreparedBatch, config: AggConfig) -> torch.Tensor:
    """[T] norm_t of a step whose ranks each normalised their own part (`prep.seq_rank`): the
    normaliser `config.agg` gives over the token's rank's part alone, times the ranks R (the
    all-reduce's mean of the ranks' gradients)."""
    assert prep.seq_rank is not None
    rank, ranks = prep.seq_rank, float(prep.ranks)
    agg = config.agg
    if agg == "token-mean":
        return prep.per_token(rank_sum(prep, prep.seq_len, rank))
    if agg == "token-sum":
        return torch.full_like(prep.logp, ranks)
    if agg == "micro-token-mean":
        # Z_k K_r R: each micro-batch's token mean, averaged over its rank's K_r micro-batches
        # (a micro-batch is one rank's), then over the ranks.
        tokens = prep.micro_sum(prep.seq_len).clamp(min=1.0)
        micro_rank = torch.zeros(prep.num_micro, dtype=torch.int64, device=prep.device)
        micro_rank = micro_rank.scatter_reduce(0, prep.seq_micro, rank, reduce="amax")
        micros = torch.bincount(micro_rank, minlength=prep.ranks).to(prep.dtype)
        return prep.per_token((tokens * micros[micro_rank] * ranks)[prep.seq_micro])
    if agg == "recorded":
        return _recorded_scale(prep) * ranks
    live = prep.seq_live.to(prep.dtype) if config.rows == "scored" else None
    counted = torch.ones_like(prep.seq_len) if live is None else live
    n_seq = prep.per_token(rank_sum(prep, counted, rank))
    if agg == "seq-mean-token-mean":
        return n_seq * prep.seq_len_tokens
    if agg == "seq-mean-token-sum":
        return n_seq
    if agg == "constant":
        assert config.max_len is not None  # AggConfig requires it
        return n_seq * float(config.max_len)
    return n_seq * _horizon(prep, config)  # seq-mean-token-sum-norm


def _horizon(prep: PreparedBatch, config: AggConfig) -> torch.Tensor:
    """[T] H of `seq-mean-token-sum-norm`: `max_len` when given, else verl's horizon
    loss_mask.shape[-1], the longest response of each micro-batch."""
    if config.max_len is not None:
        return torch.full_like(prep.logp, float(config.max_len))
    horizon = torch.zeros(prep.num_micro, dtype=prep.dtype, device=prep.device)
    horizon = horizon.scatter_reduce(0, prep.seq_micro, prep.seq_len, reduce="amax")
    return prep.per_token(horizon.clamp(min=1.0)[prep.seq_micro])


def _recorded_scale(prep: PreparedBatch) -> torch.Tensor:
    """[T] the recorded `loss_scale` (`agg=recorded`), UsageError without it."""
    if prep.loss_scale is None:
        raise UsageError("agg=recorded needs the recorded `loss_scale`, which this batch lacks")
    return prep.loss_scale


def kl_penalty(prep: PreparedBatch, config: BaseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """([T] kl_t, [T] d kl_t / d logp_t) of the KL term beta multiplies (docs/policies.md, KL
    term): k3 = exp(ref - logp) - (ref - logp) - 1, clamped at kl_max (gradient 0 there),
    r k3 with kl_is=token, s_i k3 with kl_is=sequence (its gradient here holds s_i fixed:
    `kl_terms` adds s_i's own). Once per step, kl_is and kl_max: the policies of a replay and
    their indicators share it."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        assert prep.logp_ref is not None
        delta = prep.logp_ref - prep.logp
        kl = torch.exp(delta) - delta - 1.0
        kl_grad = 1.0 - torch.exp(delta)
        if config.kl_max is not None:
            over = kl > config.kl_max
            kl = torch.where(over, torch.full_like(kl, config.kl_max), kl)
            kl_grad = torch.where(over, torch.zeros_like(kl_grad), kl_grad)
        if config.kl_is == "token":  # d(r kl)/d logp = r (kl + d kl/d logp)
            return prep.ratio * kl, prep.ratio * (kl + kl_grad)
        if config.kl_is == "sequence":
            seq_ratio = prep.per_token(torch.exp(prep.seq_mean_log_ratio))
            return seq_ratio * kl, seq_ratio * kl_grad
        return kl, kl_grad

    return prep.memo(("kl_penalty", config.kl_is, config.kl_max), build)


def kl_scale(prep: PreparedBatch, config: BaseConfig, norm: torch.Tensor) -> torch.Tensor:
    """[T] beta w_t / norm_t of the KL term: w the recorded loss_weight (kl_weight=recorded),
    or 1 (kl_weight=none)."""
    if config.kl_weight == "none":
        return config.beta / norm
    return config.beta * prep.weight / norm


def kl_terms(
    prep: PreparedBatch, config: BaseConfig, norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T] beta w_t kl_t / norm_t, [T] its sum's gradient d / d logp_t) of the KL term the
    objective subtracts (`kl_penalty` times `kl_scale`). With kl_is=sequence the sequence ratio
    s_i's gradient, d s_i / d logp_t = s_i / |y_i|, adds to each scored token of sequence i the
    sequence's KL terms summed over |y_i|."""
    kl, kl_grad = kl_penalty(prep, config)
    scale = kl_scale(prep, config, norm)
    value, grad = scale * kl, scale * kl_grad
    if config.kl_is == "sequence":
        grad = grad + prep.per_token(prep.seq_sum(value)) / prep.seq_len_tokens
    return value, grad


class Policy:
    """A policy of the catalogue, bound to its parameters: its entry (name, family, formula,
    source, defaults) and its validated config. Built by `get_policy`."""

    config: BaseConfig

    def __init__(self, config: BaseConfig, entry: PolicyEntry) -> None:
        self.config = config
        self.entry = entry

    @property
    def name(self) -> str:
        """The catalogue's name of the policy (`grpo`), without its parameters (`spec`)."""
        return self.entry.name

    @property
    def family(self) -> str:
        """The family whose code computes it (`ppo-clip` for ppo, grpo and dapo)."""
        return self.entry.family

    @property
    def formula(self) -> str:
        """Its surrogate objective J, in one line (`stabledrl policies` prints it)."""
        return self.entry.formula

    @property
    def source(self) -> str:
        """The paper or framework code the formula and defaults follow."""
        return self.entry.source

    @property
    def params(self) -> dict[str, ParamValue]:
        """Every parameter, defaults filled, in display order."""
        return self.config.params()

    @property
    def spec(self) -> str:
        """Canonical spec: the name plus each parameter that differs from the name's defaults,
        keys sorted (`stabledrl_cli.spec`)."""
        return self.entry.spec_of(self.config)

    def __repr__(self) -> str:
        return f"Policy({self.spec!r})"

    def required_fields(self, unit: Unit = "token") -> set[str]:
        """Batch fields needed beyond logp, logp_old, advantages, mask and seq_id
        (`BaseConfig.required_fields`); UsageError, naming the spec, when the policy cannot act
        on `unit` units."""
        try:
            return self.config.required_fields(unit)
        except UsageError as exc:
            raise UsageError(f"{self.spec}: {exc}") from None

    def norm(self, prep: PreparedBatch) -> torch.Tensor:
        """[T] norm_t of this policy's aggregation."""
        assert isinstance(self.config, AggConfig)
        return agg_norm(prep, self.config)

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        raise NotImplementedError

    def weights(self, batch: PolicyBatch | PreparedBatch) -> Weights:
        """coef, discarded, clipped, objective (and norm, advantages, nonfinite) of one step
        (`Weights` says what each is). UsageError when the batch lacks a field the policy
        needs, or the policy cannot act on its unit; InputError on inconsistent arrays
        (`prepare`)."""
        prep = batch if isinstance(batch, PreparedBatch) else prepare(batch)
        missing = self.required_fields(prep.unit) - prep.fields_present()
        if missing:
            raise UsageError(
                f"policy {self.spec!r} needs batch field(s) {', '.join(sorted(missing))}, "
                "which this batch lacks"
            )
        recorded = prep
        prep = rollout_corrected(prep, self.config)
        adv = prep.advantages(self.config.adv)
        norm = self.norm(prep)
        terms = self._policy_terms(prep, adv, norm)
        coef, objective = terms.coef, terms.objective
        if self.config.beta > 0:
            # The KL term keeps the recorded weight: TRL and verl leave it uncorrected.
            kl, kl_grad = kl_terms(recorded, self.config, norm)
            coef = coef - kl_grad
            objective = objective - masked_sum(prep.mask, kl)
        coef = keep_times(prep.mask, coef)
        # A non-finite input must show in coef even where the rule bounded or zeroed its term
        # (an inf ratio past a clip, REINFORCE ignoring the ratio): training would see it too.
        unsafe = prep.nonfinite_inputs(self.config.adv)
        if unsafe is not None:
            hidden = unsafe & torch.isfinite(coef)
            coef = torch.where(hidden, torch.full_like(coef, float("nan")), coef)
        eligible = prep.eligible(self.config.adv)
        discarded = terms.discarded
        if prep is not recorded:  # a token the rollout correction's mask zeroed is discarded
            discarded = discarded | ((prep.weight == 0) & (recorded.weight != 0))
        return Weights(
            coef=coef,
            discarded=discarded & eligible,
            clipped=terms.clipped & eligible,
            objective=objective,
            norm=norm,
            advantages=adv,
            nonfinite=count_nonfinite(coef, prep.mask),
        )


TokenTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""A token policy's (value [T], d value / d logp [T], discarded [T], clipped [T])."""


class TokenPolicy(Policy):
    """A policy whose objective is a sum of per-token terms value_t * w_t / norm_t."""

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        """-> (value [T], d value / d logp [T], discarded [T], clipped [T])."""
        raise NotImplementedError

    def _policy_terms(
        self, prep: PreparedBatch, adv: torch.Tensor, norm: torch.Tensor
    ) -> PolicyTerms:
        value, dvalue, discarded, clipped = self._token_terms(prep, adv)
        scale = prep.weight_over(norm)
        objective = masked_sum(prep.mask, scale * value)
        return PolicyTerms(
            coef=scale * dvalue, objective=objective, discarded=discarded, clipped=clipped
        )
