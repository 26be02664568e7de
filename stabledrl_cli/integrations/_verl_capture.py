"""One verl optimizer step, captured micro-batch by micro-batch from what `ppo_loss` used,
then logged to a `Recorder`.

`capture_micro_batch` reads a micro-batch's TensorDict (the padded response tensors verl's
`ppo_loss` selects, plus `uid`, the token scores, `rollout_log_probs` and the global
normalisers) and the model's log-probs; `StepLog` turns a step's micro-batches into one
`Recorder.log_step` call. Token arrays keep each response's scored tokens (a response without
any keeps its first position, unscored, so the sequence stays in the step).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric, reduce_metrics
from verl.utils.py_functional import rename_dict
from verl.workers.utils.padding import no_padding_2_padding

from stabledrl_cli.dump import Recorder
from stabledrl_cli.dump._schema import REWARD_COUNT
from stabledrl_cli.importers._names import standard_source
from stabledrl_cli.integrations._rows import every_row
from stabledrl_cli.integrations._verl_facts import LOGGED_SCALARS, VERL_LOSS_METRICS, VERL_METRICS
from stabledrl_cli.integrations._verl_policy import agg_mode, token_loss_scale

_OPTIONAL = {
    "loss_weight": "rollout_is_weights",
    "logp_ref": "ref_log_prob",
    "logp_rollout": "rollout_log_probs",
}
"""Recorded field -> verl's key in the actor's batch."""

_SCORES = ("token_level_scores", "rm_scores")
"""verl's keys of the token scores, in order: the trainer's `token_level_scores`, else the
reward's `rm_scores`, which verl's v1 trainer (`trainer.use_v1`, verl 0.9's default) hands
the actor instead (its token_level_scores, equal to them, never reach it)."""


@dataclass
class MicroBatch:
    """What verl's `ppo_loss` used for one micro-batch. Token arrays are [B, L] (L = the
    padded response length); per-sequence values are [B]."""

    logp: torch.Tensor
    logp_old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    """[B, L] bool, the response mask: the scored tokens."""
    loss_scale: torch.Tensor
    """[B, L] the normaliser of each token's term in the step's objective (all ranks)."""
    uid: list[str] | None
    """[B] verl's prompt-group id of each sequence; None when the batch has no `uid` (a loop
    of one's own): its prompt groups are unknown."""
    reward: torch.Tensor
    """[B] sum of `token_level_scores`, else of `rm_scores` (`_SCORES`; NaN when absent, and
    for verl's padding samples, `is_padding_sample`)."""
    loss: float
    """verl's policy loss of the micro-batch, pg (+ kl_loss_coef * kl): a rank's losses sum to
    dp_size times its share of the step's objective, so their mean over ranks is the step's."""
    response_width: int | None
    """L, the padded response length the run's batches share; None when the responses came
    nested, each micro-batch padded to its own longest (verl's trainer.use_v1)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """verl's VERL_METRICS of this micro-batch (absent where verl reports none)."""
    optional: dict[str, torch.Tensor] = field(default_factory=dict)
    """[B, L] loss_weight, logp_ref, logp_rollout, where the batch has them."""
    logp_dtype: torch.dtype = torch.float32
    """The dtype of the model's log-probs (`logp` holds them as float32)."""
    rejected_tokens: bool = False
    """Whether the engine's `loss_mask` (whose count is token-mean's batch_num_tokens) holds
    tokens the response mask leaves out: verl's v1 trainer applies its rollout rejection
    sampling to response_mask alone."""


def _metric_value(value: Any) -> float:
    """A verl `Metric` (one value per micro-batch), a tensor or a number -> float."""
    values = getattr(value, "values", None)
    if isinstance(values, list) and values:
        value = values[-1]
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


def _logged_value(name: str, value: Any) -> float | None:
    """One of verl's metrics of an optimizer step as verl's trainer logs it for a training
    step of that one update: a `Metric` (a list of them over the data-parallel ranks) reduced
    by `Metric.aggregate_dp`, as `train_mini_batch` reduces it; plain numbers (`kl_coef`, one
    a micro-batch, a list of them a rank) joined over the ranks as `train_mini_batch` joins
    them and reduced by `reduce_metrics`, as the trainer does. None for anything else."""
    ranks = value if isinstance(value, list) else [value]
    if ranks and all(isinstance(rank, Metric) for rank in ranks):
        return float(Metric.aggregate_dp(ranks))
    numbers = list(chain.from_iterable(r if isinstance(r, list) else [r] for r in ranks))
    if numbers and all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return float(reduce_metrics({name: numbers})[name])
    return None


def logged_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The LOGGED_SCALARS of one optimizer step, from verl's metrics of it (the `metrics` of
    `TrainingWorker.train_batch`'s output: a `Metric` of the step's micro-batches, a list of
    them over the data-parallel ranks), named as verl's trainer logs them (`rename_dict`) and
    reduced as verl reduces them (`_logged_value`); and the VERL_METRICS and
    VERL_LOSS_METRICS under verl's own names, reduced the same way."""
    logged = rename_dict(dict(metrics), "actor/")
    sources = {standard: standard_source(standard, logged) for standard in LOGGED_SCALARS}
    sources.update({name: name for name in (*VERL_METRICS, *VERL_LOSS_METRICS)})
    scalars: dict[str, float] = {}
    for recorded, name in sources.items():
        if name is not None and name in logged:
            value = _logged_value(name, logged[name])
            if value is not None:
                scalars[recorded] = value
    return scalars


_PADDING_UID = re.compile(r"pad[0-9a-f]{32}\Z")
"""The uid verl's v1 trainer gives its padding samples (`upsample_batch_to_divisible_size`:
"pad" + a uuid4's hex)."""


def is_padding_sample(uid: str, mask: torch.Tensor) -> bool:
    """Whether a sequence is one of the no-op samples verl's v1 trainer appends to make the
    batch divisible by the mini-batch size (its uid `_PADDING_UID`, its response unscored:
    `mask` [L] all False). verl's loss leaves it out, but for the sequence count it divides
    by; its logged scores (`critic/score/mean`) leave it out too."""
    return not bool(mask.any()) and is_padding_uid(uid)


def is_padding_uid(uid: str) -> bool:
    """Whether a prompt-group id is the one verl's v1 trainer gives its padding samples (a
    group of as many as the batch lacked, not a prompt's rollout.n)."""
    return _PADDING_UID.match(uid) is not None


def _non_tensor(data: TensorDict, key: str) -> Any:
    return tu.get_non_tensor_data(data=data, key=key, default=None)


def capture_micro_batch(
    config: Any, model_output: Mapping[str, Any], data: TensorDict, metrics: Mapping[str, Any]
) -> MicroBatch:
    """The arrays of one micro-batch, detached on CPU (config: verl's ActorConfig; data: the
    micro-batch's TensorDict; metrics: what `ppo_loss` returned)."""
    log_prob = no_padding_2_padding(model_output["log_probs"].detach(), data)
    names = ["response_mask", "old_log_probs", "advantages"]
    names += [key for key in (*_OPTIONAL.values(), *_SCORES) if key in data]
    padded = data.select(*names).to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool).cpu()
    loss_scale = token_loss_scale(
        agg_mode(config),
        mask,
        batch_num_tokens=_non_tensor(data, "batch_num_tokens"),
        global_batch_size=_non_tensor(data, "global_batch_size"),
        loss_scale_factor=config.loss_scale_factor,
    )
    scores = next((padded[key] for key in _SCORES if key in padded), None)
    reward = (
        scores.detach().float().sum(-1).cpu()
        if scores is not None
        else torch.full((mask.shape[0],), math.nan)
    )
    uids = [str(u) for u in data["uid"]] if "uid" in data else None
    if uids is not None:  # verl's padding samples count in no score verl logs
        padding = [is_padding_sample(uid, row) for uid, row in zip(uids, mask, strict=True)]
        reward[torch.tensor(padding, dtype=torch.bool)] = math.nan
    loss = _metric_value(metrics["actor/pg_loss"])
    if config.use_kl_loss and "kl_loss" in metrics:
        loss += float(config.kl_loss_coef) * _metric_value(metrics["kl_loss"])
    return MicroBatch(
        logp=log_prob.float().cpu(),
        logp_old=padded["old_log_probs"].detach().float().cpu(),
        advantages=padded["advantages"].detach().float().cpu(),
        mask=mask,
        loss_scale=loss_scale,
        uid=uids,
        reward=reward,
        loss=loss,
        metrics={name: _metric_value(metrics[name]) for name in VERL_METRICS if name in metrics},
        optional={
            ours: padded[key].detach().float().cpu()
            for ours, key in _OPTIONAL.items()
            if key in padded
        },
        logp_dtype=log_prob.dtype,
        response_width=None if data["response_mask"].is_nested else mask.shape[-1],
        rejected_tokens=rejects_tokens(data),
    )


def _count(mask: torch.Tensor) -> int:
    """The tokens a mask holds, padded or nested."""
    return int((mask.values() if mask.is_nested else mask).to(torch.bool).sum())


def rejects_tokens(data: TensorDict) -> bool:
    """Whether the engine's `loss_mask` in `data` (whose count is token-mean's
    batch_num_tokens) holds tokens its `response_mask` (the tokens the loss scores) leaves
    out: verl's v1 trainer applies its rollout rejection sampling to response_mask alone.
    False without either mask."""
    if "loss_mask" not in data or "response_mask" not in data:
        return False
    return _count(data["loss_mask"]) != _count(data["response_mask"])


@dataclass(frozen=True)
class Groups:
    """Global prompt groups of one rollout: the same numbering on every data-parallel rank."""

    index: dict[str, int]
    """uid -> global group id (rank of the uid among the rollout's sorted uids)."""
    size: dict[str, int]
    """uid -> number of the group's sequences in the rollout, over all ranks."""
    recorded: bool = True
    """False when the rollout's steps record no prompt groups (`Session.check_group_sizes`:
    a multi-rank run whose join would take part of a larger group for a whole one)."""

    def prompt_sizes(self) -> set[int]:
        """The sizes of the rollout's prompt groups, verl's padding samples' group left out
        (`is_padding_uid`)."""
        return {n for uid, n in self.size.items() if not is_padding_uid(uid)}

    @classmethod
    def of(cls, uids: list[str]) -> Groups:
        """From every uid of the rollout (all ranks), one per sequence."""
        size: dict[str, int] = {}
        for uid in uids:
            size[uid] = size.get(uid, 0) + 1
        return cls({uid: i for i, uid in enumerate(sorted(size))}, size)


def _group_fields(
    micro: list[MicroBatch], groups: Groups | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(group_id, group_split) of a step's sequences (`StepLog.write`); (None, None) when a
    micro-batch has no uids or the rollout's groups are not recorded (`Groups.recorded`)."""
    if any(m.uid is None for m in micro) or (groups is not None and not groups.recorded):
        return None, None
    uids = [uid for m in micro for uid in m.uid or ()]
    groups = groups if groups is not None and all(u in groups.index for u in uids) else None
    local = Groups.of(uids)
    index = (groups or local).index
    group_id = torch.tensor([index[u] for u in uids], dtype=torch.int64)
    split = [groups is not None and local.size[u] < groups.size[u] for u in uids]
    return group_id, torch.tensor(split, dtype=torch.uint8)


@dataclass
class StepLog:
    """The scalars of one optimizer step, beside its micro-batches."""

    grad_norm: float
    """Pre-clip norm that the engine's `optimizer_step()` returned."""
    max_norm: float | None
    """The clip threshold (`optim.clip_grad`)."""
    lr: float | None
    inner_step: int
    """0 for the first update on a fresh rollout."""
    scalars: dict[str, float] = field(default_factory=dict)

    def write(
        self, recorder: Recorder, step: int, micro: list[MicroBatch], groups: Groups | None
    ) -> None:
        """Logs the micro-batches as optimizer step `step` (groups: the rollout's, else the
        step's own uids number the groups and none is marked split; without a micro-batch's
        uids, or when the rollout's groups are not recorded, the step records no group_id nor
        group_split: a replay that recomputes advantages by group is refused, not given one
        group of every sequence), with its `reward_count`, the sequences scored (verl's
        padding samples are not): the weight of its reward in its rollout's."""
        kept = [every_row(m.mask) for m in micro]

        def tokens(rows: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([r[k] for r, k in zip(rows, kept, strict=True)])

        sizes = [k.shape[0] for k in kept]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        seq_id = tokens(
            [
                torch.arange(start, start + k.shape[0])[:, None].expand_as(k)
                for start, k in zip(starts, kept, strict=True)
            ]
        )
        group_id, split = _group_fields(micro, groups)
        optional = {
            name: tokens([m.optional[name] for m in micro])
            for name in _OPTIONAL
            if all(name in m.optional for m in micro)
        }
        scalars = dict(self.scalars)
        for name in VERL_METRICS:
            values = [m.metrics[name] for m in micro if name in m.metrics]
            if values and name not in scalars:  # verl's own over every rank, when given
                scalars[name] = sum(values) / len(values)
        finite = math.isfinite(self.grad_norm)
        scalars["update_skipped"] = 0.0 if finite else 1.0
        clip = 1.0
        if self.max_norm is not None and finite:
            clip = min(1.0, self.max_norm / (self.grad_norm + 1e-6))
        reward = torch.cat([m.reward for m in micro])
        scalars[REWARD_COUNT] = float(reward.isnan().logical_not().sum())
        recorder.log_step(
            step,
            logp=tokens([m.logp for m in micro]),
            logp_old=tokens([m.logp_old for m in micro]),
            advantages=tokens([m.advantages for m in micro]),
            mask=tokens([m.mask for m in micro]),
            seq_id=seq_id,
            group_id=group_id,
            reward=reward,
            micro_batch=torch.cat(
                [torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)]
            ),
            group_split=split,
            loss_scale=tokens([m.loss_scale for m in micro]),
            grad_norm=self.grad_norm,
            grad_norm_clipped=self.grad_norm * clip,
            loss=sum(m.loss for m in micro),
            lr=self.lr,
            inner_step=self.inner_step,
            scalars=scalars,
            **optional,
        )
