"""Clip-Cov and KL-Cov (The Entropy Mechanism of RL for Reasoning LMs, arXiv:2505.22617;
verl `compute_policy_loss_clip_cov` / `_kl_cov`): act on the few tokens whose centred
advantage times centred logp, cov_t = (A_t - mean A) (logp_t - mean logp) over the step's
scored tokens, is largest: the tokens that drive entropy collapse.

- clip-cov: PPO's clip (no dual clip), plus: among the tokens the clip leaves alone whose
  cov_t lies in (lb, ub), max(1, int(ratio x scored)) chosen at random lose their gradient
  (discarded). The draw is a function of `seed` and the step's shape (its token and scored
  counts), made on the CPU: a replay is reproducible on any device, and the seed is in the
  spec. It is not the training run's own draw (verl uses torch's global generator).
- kl-cov: plain importance sampling r A, minus kl_coef |log r| on the max(1, int(ratio x
  scored)) tokens of largest cov_t (clipped: their gradient is penalised, r A - kl_coef
  sign(log r)). With cov=micro the means, the count and the selection are each recorded
  micro-batch's own (a micro-batch without a scored token selects none).
verl takes both means over each micro-batch; clip-cov's, and kl-cov's with cov=step, are over
the optimizer step.
"""

from __future__ import annotations

import torch

from stabledrl_cli.policies._base import TokenPolicy, TokenTerms
from stabledrl_cli.policies._family_config import ClipCovConfig, KLCovConfig
from stabledrl_cli.policies._masked import keep_times, ratio_times
from stabledrl_cli.policies._prepared_batch import PreparedBatch
from stabledrl_cli.policies.ppo import ppo_terms


def covariance(prep: PreparedBatch, adv: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """[T] (A - mean A)(logp - mean logp), means over the scored tokens of `part` ([T] bool:
    the step, or one rank's part of it; an unscored entry's value never enters, a NaN or an
    infinity there neither)."""
    scored = prep.mask & part
    count = scored.sum().to(prep.dtype).clamp(min=1.0)
    mean_adv = torch.where(scored, adv, 0.0).sum() / count
    mean_logp = torch.where(scored, prep.logp, 0.0).sum() / count
    return (adv - mean_adv) * (prep.logp - mean_logp)


def _parts(prep: PreparedBatch) -> list[torch.Tensor]:
    """[T] bool each: the step, or of a step whose ranks each normalised their own part
    (`seq_rank`), each rank's part: what one process computes its loss over."""
    if prep.seq_rank is None:
        return [torch.ones_like(prep.mask)]
    rank = prep.per_token(prep.seq_rank)
    return [rank == r for r in range(prep.ranks)]


def top_covariance(
    prep: PreparedBatch, adv: torch.Tensor, ratio: float, logp_dtype: str, *, per_micro: bool
) -> torch.Tensor:
    """[T] bool: in each micro-batch (per_micro; else the whole step, or each rank's part of
    a step whose ranks each normalised their own: `seq_rank`) with scored tokens, the
    max(1, int(ratio x its scored tokens)) of largest (A - mean A)(logp - mean logp), means
    over its scored tokens. As verl's kl_cov: on the CPU, over the scored tokens in order,
    logp centred in the run's `logp_dtype` (float32: the replay's own), so that a tie or
    near-tie of covariances (equal advantages, or logp rounded to bfloat16) is broken the same
    way."""
    chosen = torch.zeros(prep.num_tokens, dtype=torch.bool)
    scored, adv_cpu, logp = prep.mask.cpu(), adv.detach().cpu(), prep.logp.cpu()
    if per_micro:
        micro, parts = prep.per_token(prep.seq_micro).cpu(), prep.num_micro
    elif prep.seq_rank is not None:  # each rank selected over its own part
        micro, parts = prep.per_token(prep.seq_rank).cpu(), prep.ranks
    else:
        micro, parts = torch.zeros(prep.num_tokens, dtype=torch.int64), 1
    if logp_dtype != "float32":
        logp = logp.to(getattr(torch, logp_dtype))
    for k in range(parts):
        members = torch.nonzero(scored & (micro == k)).flatten()
        if members.numel():
            a, lp = adv_cpu[members], logp[members]
            cov = (a - a.mean()) * (lp - lp.mean())
            size = max(1, int(ratio * members.numel()))
            chosen[members[torch.topk(cov, size).indices]] = True
    return chosen.to(prep.device)


def selection_size(scored: int, ratio: float) -> int:
    """max(1, int(ratio x scored tokens)): verl's clip_num / k_percent_nums."""
    return max(1, int(ratio * scored))


def clip_cov_draw(
    prep: PreparedBatch, adv: torch.Tensor, cfg: ClipCovConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([T] PPO's clipped value, [T] bool clipped by PPO's rule, [T] bool chosen by the draw)
    of clip-cov over `adv` (the advantages cfg makes), over the step or each rank's part
    (`_parts`): once per step and configuration, for the policy and for verl's `pg_clipfrac`
    (the share of tokens the draw chose)."""

    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value, clipped_by_rule = ppo_terms(prep.ratio, adv, cfg.eps_low, cfg.high)
        chosen = torch.zeros_like(prep.mask)
        for part in _parts(prep):
            cov = covariance(prep, adv, part)
            candidates = part & prep.mask & ~clipped_by_rule & (cov > cfg.lb) & (cov < cfg.ub)
            index = torch.nonzero(candidates.cpu()).flatten()
            scored = int((prep.mask & part).sum())
            shape_key = int(part.sum()) * 1_000_003 + scored
            seed = (cfg.seed * 2_654_435_761 + shape_key) % 2**63
            order = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed))
            chosen_index = index[order][: selection_size(scored, cfg.ratio)].to(prep.device)
            chosen = chosen.index_fill_(0, chosen_index, True)
        return value, clipped_by_rule, chosen

    key = ("clip_cov_draw", cfg.eps_low, cfg.high, cfg.lb, cfg.ub, cfg.ratio, cfg.seed, cfg.adv)
    return prep.memo(key, build)


class ClipCovPolicy(TokenPolicy):
    """Clip-Cov (verl `clip_cov`): PPO's `min(r A, clip(r) A) / norm`, and a random max(1,
    ratio x scored) of the unclipped tokens with lb < cov < ub are discarded."""

    config: ClipCovConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        value, clipped_by_rule, chosen = clip_cov_draw(prep, adv, self.config)
        discarded = clipped_by_rule | chosen
        dvalue = keep_times(~discarded, ratio_times(prep.ratio, adv))
        return keep_times(~chosen, value), dvalue, discarded, torch.zeros_like(discarded)


class KLCovPolicy(TokenPolicy):
    """KL-Cov (verl `kl_cov`): `r A / norm`, minus kl_coef |log r| / norm on the max(1, ratio x
    scored) tokens of largest covariance (clipped), over the step or each micro-batch."""

    config: KLCovConfig

    def _token_terms(self, prep: PreparedBatch, adv: torch.Tensor) -> TokenTerms:
        cfg = self.config
        per_micro = cfg.cov == "micro"
        chosen = top_covariance(prep, adv, cfg.ratio, cfg.logp_dtype, per_micro=per_micro)
        log_ratio = prep.log_ratio
        is_value = ratio_times(prep.ratio, adv)
        value = torch.where(chosen, is_value - cfg.kl_coef * log_ratio.abs(), is_value)
        dvalue = torch.where(chosen, is_value - cfg.kl_coef * torch.sign(log_ratio), is_value)
        return value, dvalue, torch.zeros_like(chosen), chosen
