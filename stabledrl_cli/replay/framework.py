"""The frameworks' own clip metrics of every replayed policy, each computed the framework's way
(docs/replay-json.md defines every denominator).

- TRL 1.16 (`GRPOTrainer._compute_loss`): `clip_ratio/low_mean` = (r < 1 - eps_low) & (A < 0),
  `clip_ratio/high_mean` = (r > 1 + eps_high) & (A > 0), `clip_ratio/region_mean` = either
  (grpo-family policies; r is min(r, delta) for two-sided, the sequence ratio for gspo, capped
  at delta too), and `cispo_clip_ratio` = (r > cap) & (A > 0) (cispo's TRL form). Each is a
  fraction over a micro-batch's scored entries (mask = 1; A = 0 entries count in the
  denominator, which is clamped to >= 1), over its rows for gspo (one value a sequence); TRL
  logs the unweighted mean of the per-micro-batch values. `clip_ratio/low_min` and
  `clip_ratio/high_max` are the nanmin / nanmax over a micro-batch call's rows (on every rank)
  of each row's low / high fraction of its scored entries (NaN for a row without one; gspo: the
  row's hit), averaged over the calls that have a value. `vespo/phi_seq_mean` (vespo) is the
  mean of each row's gamma weight phi over a micro-batch's rows, averaged the same way.
- verl 0.9.1 (`core_algos.compute_policy_loss_vanilla`, `_gspo`, `_cispo`, `_sapo`):
  `pg_clipfrac` and `pg_clipfrac_lower` over a micro-batch's scored entries (denominator
  count + 1e-8), r = exp(clamp(log r, -20, 20)) (gspo: exp(min(mean log r of the sequence,
  10)), NaN on an entry whose own log-prob is not finite), averaged unweighted over the
  micro-batches. vanilla: (A > 0 & r > 1 + eps_high) |
  (A < 0 & r < 1 - eps_low), lower (A < 0 & r > c) for dual-clip; cispo's verl form: r outside
  [1 - eps_low, 1 + eps_high] whatever A, or NaN (verl counts r != clamp(r)), lower 0; sapo: 0
  and 0 (what verl logs); dppo (`_dppo_tv`, `_dppo_kl`): entries outside the trust region
  (A = 0 ones on the lower side), lower: entries inside it whose ratio exceeds c; gmpo
  (`_geo_mean`): entries whose log r lies outside [-eps_low, eps_high] (unclamped), or is NaN
  (log r != clamp(log r)), with A > 0, lower the same with A < 0; clip-cov (`_clip_cov`): the
  entries its draw chose (verl's corr == 0), lower not logged.
  `ppo_kl`: the mean of -log r over a micro-batch's scored entries (the same denominator and
  averaging), log r clamped to [-20, 20] (vanilla, cispo, sapo, dppo) or not (gspo, clip_cov,
  geo_mean); kl_cov logs the mean of |log r| instead.

A step without a recorded `micro_batch` is one micro-batch. In a step joined from several ranks,
TRL's metrics pool each micro-batch call over the ranks (TRL sums the counts across ranks
before dividing) while verl's average each rank's micro-batches on their own. A metric the
framework does not log for a policy (no eps: is, reinforce, stabledrl; sapo in TRL) is NaN (null
in the JSON).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from stabledrl_cli.errors import InputError
from stabledrl_cli.integrations._verl_facts import VERL_SEQ_LOG_RATIO_MAX
from stabledrl_cli.policies import Policy, PreparedBatch, Weights
from stabledrl_cli.policies._family_config import (
    CISPOConfig,
    ClipConfig,
    ClipCovConfig,
    DPPOConfig,
    DualClipConfig,
    GMPOConfig,
    GSPOConfig,
    KLCovConfig,
    SAPOConfig,
    TwoSidedConfig,
    VESPOConfig,
)
from stabledrl_cli.policies._masked import above, below, keep_times
from stabledrl_cli.policies._masked import count as tally
from stabledrl_cli.policies.cov import clip_cov_draw
from stabledrl_cli.policies.dppo import trust_region
from stabledrl_cli.policies.ppo import VERL_LOG_RATIO_CLAMP
from stabledrl_cli.policies.vespo import sequence_gamma_weights
from stabledrl_cli.replay.columns import TRL_METRICS, VERL_METRICS

VERL_MASKED_MEAN_EPS = 1e-8
"""verl's masked_mean divides by mask.sum() + 1e-8."""


@dataclass(frozen=True)
class MicroBatches:
    """A step's micro-batches: `seq_index` [N] int64, each sequence's micro-batch as a dense
    index in [0, count): a (rank, micro-batch) cell of a joined multi-rank step.
    `pooled_index` [N] in [0, pooled_count): the micro-batch call it belongs to, across ranks
    (TRL sums a call's counts over the ranks before it divides)."""

    seq_index: torch.Tensor
    count: int
    pooled_index: torch.Tensor
    pooled_count: int


def _pooled(index: torch.Tensor, count: int, ranks: int) -> MicroBatches:
    """Cells of a step joined from `ranks` ranks, each rank's micro-batches numbered after the
    ranks before it (the run format's join): with the same K micro-batches on every rank, cell
    r * K + k is call k. Otherwise (uneven ranks) each cell counts as its own call."""
    if ranks > 1 and count % ranks == 0:
        calls = count // ranks
        return MicroBatches(index, count, index % calls, calls)
    return MicroBatches(index, count, index, count)


def micro_batches(
    prep: PreparedBatch,
    micro_batch: torch.Tensor | None,
    raw_seq_id: torch.Tensor,
    *,
    seq_is_raw: bool,
    where: str,
    ranks: int = 1,
) -> MicroBatches:
    """The step's micro-batches from its per-sequence `micro_batch` [N] (None: the whole step
    is one). raw_seq_id: [T] the recorded seq_id; seq_is_raw: prep's sequence index is the
    recorded seq_id (the step has group_id or reward), else a dense renumbering of it; ranks:
    how many ranks' files the step joins."""
    if micro_batch is None:
        zeros = torch.zeros(prep.n_seq, dtype=torch.int64, device=prep.device)
        return MicroBatches(zeros, 1, zeros, 1)
    per_seq = micro_batch.reshape(-1).to(prep.device, torch.int64)
    if seq_is_raw:
        if per_seq.shape[0] != prep.n_seq:
            raise InputError(
                f"{where}: micro_batch has {per_seq.shape[0]} entries but the step has "
                f"{prep.n_seq} sequences (mismatched array lengths)"
            )
    else:
        raw = raw_seq_id.reshape(-1).to(prep.device, torch.int64)
        if raw.numel() and int(raw.max()) >= per_seq.shape[0]:
            raise InputError(
                f"{where}: seq_id {int(raw.max())} has no entry in micro_batch "
                f"({per_seq.shape[0]} entries)"
            )
        per_seq = torch.zeros(prep.n_seq, dtype=torch.int64, device=prep.device).scatter_(
            0, prep.seq, per_seq[raw]
        )
    _, index = torch.unique(per_seq, return_inverse=True)
    return _pooled(index, int(index.max()) + 1 if index.numel() else 1, ranks)


def _token_fraction(
    hit: torch.Tensor, prep: PreparedBatch, micro: MicroBatches, eps: float | None
) -> torch.Tensor:
    """0-d: the unweighted mean over micro-batches of sum(hit & mask) / count(mask) (hit [T]);
    eps None: TRL's way (a call's counts summed over ranks, denominator clamp(min=1)), else
    verl's (each rank's micro-batch on its own, denominator + eps). Once per step for a hit
    tensor: policies of the same bounds share their hits (`_clip_hits`) and so their fraction."""
    return prep.memo_of(
        f"token_fraction:{eps!r}", hit, lambda: _counted_fraction(hit, prep, micro, eps)
    )


def _counted_fraction(
    hit: torch.Tensor, prep: PreparedBatch, micro: MicroBatches, eps: float | None
) -> torch.Tensor:
    seq_index, cells = (
        (micro.pooled_index, micro.pooled_count) if eps is None else (micro.seq_index, micro.count)
    )
    if cells == 1:
        # The int64 count over the float64 denominator: the division widens it exactly.
        return tally(hit & prep.mask) / _scored_denominator(prep, seq_index, cells, eps)
    return _cell_mean((hit & prep.mask).double(), prep, seq_index, cells, eps)


def _cell_mean(
    kept: torch.Tensor, prep: PreparedBatch, seq_index: torch.Tensor, cells: int, eps: float | None
) -> torch.Tensor:
    """0-d: the unweighted mean over the `cells` micro-batches (`seq_index` [N]) of each one's
    sum of `kept` [T] float64 (0 off the scored entries) over its `_scored_denominator`."""
    den = _scored_denominator(prep, seq_index, cells, eps)
    if cells == 1:
        return kept.sum() / den
    zeros = torch.zeros(cells, dtype=torch.float64, device=prep.device)
    return (zeros.index_add(0, prep.per_token(seq_index), kept) / den).mean()


def _scored_denominator(
    prep: PreparedBatch, seq_index: torch.Tensor, cells: int, eps: float | None
) -> torch.Tensor:
    """float64 scored entries of each of the `cells` micro-batches (`seq_index` [N]: each
    sequence's), clamped to >= 1 (eps None, TRL) or plus eps (verl): 0-d with one cell, else
    [cells]. Once per step, micro-batching and eps."""

    def build() -> torch.Tensor:
        if cells == 1:
            den = tally(prep.mask).double()
        else:
            zeros = torch.zeros(cells, dtype=torch.float64, device=prep.device)
            den = zeros.index_add(0, prep.per_token(seq_index), prep.mask.double())
        return den.clamp(min=1.0) if eps is None else den + eps

    return prep.memo_of(f"scored_denominator:{eps!r}", seq_index, build)


def _row_mean(per_seq: torch.Tensor, micro: MicroBatches) -> torch.Tensor:
    """0-d: TRL's sequence-level mean: per micro-batch call, the mean of a value (a hit) over
    its rows (sequences), then the mean over the calls."""
    zeros = torch.zeros(micro.pooled_count, dtype=torch.float64, device=per_seq.device)
    num = zeros.index_add(0, micro.pooled_index, per_seq.double())
    ones = torch.ones(micro.pooled_index.shape[0], dtype=torch.float64, device=per_seq.device)
    rows = zeros.index_add(0, micro.pooled_index, ones)
    return (num / rows.clamp(min=1.0)).mean()


Extreme = Literal["amin", "amax"]
"""TRL's nanmin (`clip_ratio/low_min`) or nanmax (`clip_ratio/high_max`), as a scatter_reduce."""


def _call_extreme(per_seq: torch.Tensor, micro: MicroBatches, reduce: Extreme) -> torch.Tensor:
    """0-d: TRL's `clip_ratio/low_min` (reduce "amin") or `high_max` ("amax"): per micro-batch
    call, the extreme of the per-sequence values [N] over its rows on every rank (TRL gathers
    them, then nanmin/nanmax: NaN rows skipped, NaN when all are), then the mean over the calls
    whose value is not NaN (TRL's log drops NaN entries), NaN when none is."""
    values = per_seq.double()
    missing = math.inf if reduce == "amin" else -math.inf
    held = torch.full((micro.pooled_count,), missing, dtype=torch.float64, device=values.device)
    held = held.scatter_reduce(
        0, micro.pooled_index, torch.nan_to_num(values, nan=missing), reduce=reduce
    )
    return torch.where(torch.isinf(held), math.nan, held).nanmean()


def _token_extreme(
    hit: torch.Tensor, prep: PreparedBatch, micro: MicroBatches, reduce: Extreme
) -> torch.Tensor:
    """0-d: `_call_extreme` of each sequence's fraction of hit [T] over its scored entries
    (TRL's per-row masked mean; NaN for a row without one, as TRL's 0 / 0). Once per step for
    a hit tensor, as `_token_fraction`."""

    def build() -> torch.Tensor:
        per_seq = prep.seq_sum(hit.double()) / prep.seq_len.double()
        return _call_extreme(per_seq, micro, reduce)

    return prep.memo_of(f"token_extreme:{reduce}", hit, build)


def _clip_hits(
    prep: PreparedBatch, ratio: torch.Tensor, adv: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A < 0 & r < 1 - low, A > 0 & r > 1 + high, either), strict as both frameworks compare;
    once per step for the step's own ratio (TRL's and verl's metrics ask for the same)."""

    def hits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lower = below(ratio, 1.0 - low) & below(adv, 0.0)
        upper = above(ratio, 1.0 + high) & above(adv, 0.0)
        return lower, upper, lower | upper

    if ratio is not prep.ratio:
        return hits()
    return prep.memo_of(f"clip_hits:{low!r}:{high!r}", adv, hits)


def _verl_ratio(prep: PreparedBatch, *bounds: float) -> torch.Tensor:
    """verl's ratio exp(clamp(log r, -20, 20)) for comparisons with `bounds`: the step's own
    ratio when every bound lies well inside (e^-20, e^20), where the clamp moves no ratio
    across a bound (both hit the same tokens), so TRL's and verl's hits are computed once."""
    inside = all(
        2 * math.exp(-VERL_LOG_RATIO_CLAMP) < b < 0.5 * math.exp(VERL_LOG_RATIO_CLAMP)
        for b in bounds
    )
    return prep.ratio if inside else prep.clamped_ratio(VERL_LOG_RATIO_CLAMP)


def _verl_unequal_nan(prep: PreparedBatch) -> torch.Tensor:
    """[T] bool: a NaN log r, which verl's cispo (`ratio != clamp(ratio)`) and geo_mean
    (`log r != clamp(log r)`) count as clipped, NaN being unequal to itself."""
    return prep.memo("verl_unequal_nan", lambda: torch.isnan(prep.log_ratio))


def _trl(
    policy: Policy, w: Weights, prep: PreparedBatch, micro: MicroBatches, nan: torch.Tensor
) -> list[torch.Tensor]:
    """[low, high, region, cispo, vespo phi, low min, high max] as 0-d float64 tensors or
    `nan` (not logged for this policy)."""
    config = policy.config
    adv = w.advantages
    if isinstance(config, GSPOConfig):
        seq_adv = prep.seq_sum(adv) / prep.seq_len.clamp(min=1.0)
        seq_ratio = torch.exp(prep.seq_mean_log_ratio)
        if config.delta is not None:
            seq_ratio = torch.clamp(seq_ratio, max=config.delta)  # as for two-sided, below
        low, high, either = _clip_hits(prep, seq_ratio, seq_adv, config.eps_low, config.eps_high)
        return [
            _row_mean(low, micro),
            _row_mean(high, micro),
            _row_mean(either, micro),
            nan,
            nan,
            _call_extreme(low, micro, "amin"),
            _call_extreme(high, micro, "amax"),
        ]
    if isinstance(config, ClipConfig):
        ratio = prep.ratio
        if isinstance(config, TwoSidedConfig) and config.delta is not None:
            ratio = torch.clamp(ratio, max=config.delta)  # TRL clamps coef_1 before its metrics
        low, high, either = _clip_hits(prep, ratio, adv, config.eps_low, config.high)
        return [
            _token_fraction(low, prep, micro, None),
            _token_fraction(high, prep, micro, None),
            _token_fraction(either, prep, micro, None),
            nan,
            nan,
            _token_extreme(low, prep, micro, "amin"),
            _token_extreme(high, prep, micro, "amax"),
        ]
    if isinstance(config, CISPOConfig) and config.cap is not None:
        hit = above(prep.ratio, config.cap) & above(adv, 0.0)
        return [nan, nan, nan, _token_fraction(hit, prep, micro, None), nan, nan, nan]
    if isinstance(config, VESPOConfig):
        phi = _row_mean(sequence_gamma_weights(prep, adv, config), micro)
        return [nan, nan, nan, nan, phi, nan, nan]
    return [nan] * len(TRL_METRICS)


def _verl(
    policy: Policy,
    w: Weights,
    prep: PreparedBatch,
    micro: MicroBatches,
    nan: torch.Tensor,
    zero: torch.Tensor,
) -> list[torch.Tensor]:
    """[pg_clipfrac, pg_clipfrac_lower] as 0-d float64 tensors, `zero` or `nan`."""
    config = policy.config
    adv = w.advantages

    def frac(hit: torch.Tensor) -> torch.Tensor:
        return _token_fraction(hit, prep, micro, VERL_MASKED_MEAN_EPS)

    if isinstance(config, GSPOConfig):
        seq_ratio = torch.exp(prep.seq_mean_log_ratio.clamp(max=VERL_SEQ_LOG_RATIO_MAX))
        _, _, either = _clip_hits(
            prep, prep.per_token(seq_ratio), adv, config.eps_low, config.eps_high
        )
        # verl's token ratio exp(log_prob - log_prob.detach() + mean log r) is NaN where the
        # token's own log-prob is not finite: never clipped there
        return [frac(either & torch.isfinite(prep.logp)), zero]
    if isinstance(config, ClipCovConfig):  # the share of tokens its draw zeroes (corr == 0)
        return [frac(clip_cov_draw(prep, adv, config)[2]), nan]
    if isinstance(config, ClipConfig):
        bounds = [1.0 - config.eps_low, 1.0 + config.high]
        if isinstance(config, DualClipConfig):
            bounds.append(config.c)
        ratio = _verl_ratio(prep, *bounds)
        _, _, either = _clip_hits(prep, ratio, adv, config.eps_low, config.high)
        lower = (
            frac(below(adv, 0.0) & above(ratio, config.c))
            if isinstance(config, DualClipConfig)
            else nan
        )
        return [frac(either), lower]
    if isinstance(config, CISPOConfig) and config.eps_low is not None:
        ceiling = 1.0 + (config.eps_low if config.eps_high is None else config.eps_high)
        ratio = _verl_ratio(prep, 1.0 - config.eps_low, ceiling)
        outside = below(ratio, 1.0 - config.eps_low) | above(ratio, ceiling)
        return [frac(outside | _verl_unequal_nan(prep)), zero]
    if isinstance(config, SAPOConfig):
        return [zero, zero]
    if isinstance(config, DPPOConfig):  # outside the trust region; inside it, r truncated at c
        valid, ratio = trust_region(prep, adv, config)
        return [frac(~valid), frac(valid & above(ratio, config.c))]
    if isinstance(config, GMPOConfig):  # log r outside [-eps_low, eps_high], by the sign of A
        outside = below(prep.log_ratio, -config.eps_low) | above(prep.log_ratio, config.eps_high)
        outside = outside | _verl_unequal_nan(prep)
        return [frac(outside & above(adv, 0.0)), frac(outside & below(adv, 0.0))]
    return [nan, nan]


def _verl_ppo_kl(
    policy: Policy, prep: PreparedBatch, micro: MicroBatches, nan: torch.Tensor
) -> torch.Tensor:
    """verl's ppo_kl (0-d float64, `nan` where verl logs none): verl_F.masked_mean of -log r
    over each micro-batch's scored entries, mean over micro-batches (each rank's on its own)."""
    config = policy.config
    if isinstance(config, KLCovConfig):  # compute_policy_loss_kl_cov logs |log r|
        name, build = "abs", lambda: prep.log_ratio.abs()
    elif isinstance(config, (GSPOConfig, ClipCovConfig, GMPOConfig)):  # no clamp of log r
        name, build = "neg", lambda: -prep.log_ratio
    elif isinstance(config, (ClipConfig, SAPOConfig, DPPOConfig)) or (
        isinstance(config, CISPOConfig) and config.eps_low is not None
    ):
        name, build = (
            "neg_clamped",
            lambda: -prep.log_ratio.clamp(-VERL_LOG_RATIO_CLAMP, VERL_LOG_RATIO_CLAMP),
        )
    else:
        return nan
    values = prep.memo(("verl_ppo_kl", name), build)
    return prep.memo_of(
        "verl_ppo_kl",
        values,
        lambda: _cell_mean(
            keep_times(prep.mask, values).double(),
            prep,
            micro.seq_index,
            micro.count,
            VERL_MASKED_MEAN_EPS,
        ),
    )


def framework_metrics(
    prep: PreparedBatch,
    policies: Sequence[Policy],
    weights: Sequence[Weights],
    micro: MicroBatches,
) -> dict[str, torch.Tensor]:
    """name (`TRL_METRICS`, `VERL_METRICS`) -> [P] float64 on prep.device (columns of one
    [P, M] stack of every policy's 0-d values)."""
    nan = torch.full((), math.nan, dtype=torch.float64, device=prep.device)
    zero = torch.zeros((), dtype=torch.float64, device=prep.device)
    values = [
        value
        for p, w in zip(policies, weights, strict=True)
        for value in (
            *_trl(p, w, prep, micro, nan),
            *_verl(p, w, prep, micro, nan, zero),
            _verl_ppo_kl(p, prep, micro, nan),
        )
    ]
    names = (*TRL_METRICS, *VERL_METRICS)
    table = torch.stack(values).double().view(len(weights), len(names))
    return dict(zip(names, table.unbind(1), strict=True))
