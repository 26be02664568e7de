"""The verl integration against the real verl 0.9 package: verl's own `ppo_loss` is driven on
TensorDicts built as verl's trainer builds them (DataProto -> left_right_2_no_padding ->
mini-batches -> micro-batches), the capture records them, and the catalogue's own policy
reproduces verl's loss (`compute_policy_loss_*` + `agg_loss`) and its clip fractions."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from _cli import cli_environment, record_python  # noqa: E402
from _ports import free_port  # noqa: E402
from _steps import policy_batch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from typer.testing import CliRunner  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.metric_utils import compute_data_metrics  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.tracking import Tracking  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.base import BaseEngine  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, response_to_nested  # noqa: E402

from stabledrl_cli.cli.app import app  # noqa: E402
from stabledrl_cli.dump import (  # noqa: E402
    Recorder,
    _manifest_edits,
    open_run,
)
from stabledrl_cli.errors import UsageError  # noqa: E402
from stabledrl_cli.integrations import verl as stabledrl_verl  # noqa: E402
from stabledrl_cli.integrations._verl_capture import (  # noqa: E402
    Groups,
    MicroBatch,
    StepLog,
    capture_micro_batch,
)
from stabledrl_cli.integrations._verl_policy import (  # noqa: E402
    policy_for_actor_config,
)
from stabledrl_cli.policies import PolicyBatch, get_policy  # noqa: E402
from stabledrl_cli.replay.config import ReplayConfig  # noqa: E402
from stabledrl_cli.replay.engine import replay_run  # noqa: E402
from stabledrl_cli.replay.observed import observe  # noqa: E402
from stabledrl_cli.replay.recorded import recorded_run  # noqa: E402
from stabledrl_cli.replay.rollouts import reward_draws  # noqa: E402
from stabledrl_cli.spec import format_spec  # noqa: E402

PROMPT, RESPONSE = 4, 7


def actor_config(**overrides: Any) -> ActorConfig:
    """verl's own ActorConfig (strategy fsdp), with `policy_loss.loss_mode` as `loss_mode` and
    the other `PolicyLossConfig` fields from `policy_loss`."""
    loss_mode = overrides.pop("loss_mode", "vanilla")
    policy_loss = overrides.pop("policy_loss", {})
    return ActorConfig(
        strategy="fsdp",
        rollout_n=3,
        ppo_micro_batch_size_per_gpu=2,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
        **overrides,
    )


def rollout(
    n_prompts: int = 4, group: int = 3, seed: int = 0, scale: float = 0.6, infinite: int = -1
) -> TensorDict:
    """A rollout as verl's trainer hands it to `update_actor`: left-padded prompts, right-padded
    responses, `uid` per prompt, token-level scores, old/ref/rollout log-probs and the model's
    "true" current log-probs in `_logp` (what the fake forward returns), some ratios extreme;
    row `infinite` (>= 0) scored inf, its advantage kept finite."""
    gen = torch.Generator().manual_seed(seed)
    b = n_prompts * group
    prompt_len = torch.randint(1, PROMPT + 1, (b,), generator=gen)
    resp_len = torch.randint(1, RESPONSE + 1, (b,), generator=gen)
    resp_len[1] = RESPONSE
    pmask = (torch.arange(PROMPT)[None] >= PROMPT - prompt_len[:, None]).long()
    rmask = (torch.arange(RESPONSE)[None] < resp_len[:, None]).long()
    attention = torch.cat([pmask, rmask], 1)
    prompts = torch.randint(3, 50, (b, PROMPT), generator=gen) * pmask
    responses = torch.randint(3, 50, (b, RESPONSE), generator=gen) * rmask
    logp = -torch.rand(b, RESPONSE, generator=gen) * 3
    log_ratio = torch.randn(b, RESPONSE, generator=gen) * scale
    log_ratio[0, 0], log_ratio[2, 1], log_ratio[3, 0] = 2.5, -3.0, 1.4  # beyond c, below 1-eps
    score = torch.zeros(b, RESPONSE)
    score[torch.arange(b), resp_len - 1] = torch.randint(0, 2, (b,), generator=gen).float()
    reward = score.sum(-1).view(n_prompts, group)
    adv = ((reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-6)).view(b)
    adv[4] = -1.0
    if infinite >= 0:
        score[infinite, resp_len[infinite] - 1] = math.inf
    ref_noise = 0.3 * torch.randn(b, RESPONSE, generator=gen)
    # lowered where the old or ref log-prob (logp - log_ratio, logp - ref_noise) would pass 0:
    # each stays <= 0, as log-probabilities are, the ratios as drawn
    logp = (logp + torch.minimum(log_ratio, ref_noise).clamp(max=0)) * rmask
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "response_mask": rmask,
        "old_log_probs": (logp - log_ratio) * rmask,
        "advantages": adv[:, None].expand(b, RESPONSE) * rmask,
        "ref_log_prob": (logp - ref_noise) * rmask,
        "rollout_log_probs": (logp - log_ratio - 0.05) * rmask,
        "rollout_is_weights": (0.5 + torch.rand(b, RESPONSE, generator=gen)) * rmask,
        "token_level_scores": score,
        "_logp": logp,
    }
    for name in ("old_log_probs", "ref_log_prob", "rollout_log_probs"):
        assert float(tensors[name].max()) <= 0, name
    uids = np.array([f"prompt-{i // group}" for i in range(b)], dtype=object)
    data = DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids})
    return left_right_2_no_padding(data.to_tensordict())


RESPONSE_FIELDS = (
    "responses",
    "response_mask",
    "loss_mask",
    "old_log_probs",
    "advantages",
    "ref_log_prob",
    "rollout_log_probs",
    "rollout_is_weights",
    "token_level_scores",
)


def nested_responses(td: TensorDict) -> TensorDict:
    """A `rollout` as verl's trainer.use_v1 hands it to the actor: the prompts and every
    response field nested, each row its own length (no `max_response_len`), so that `ppo_loss`
    pads each micro-batch to its own longest response."""
    mask = td["response_mask"]
    lengths = mask.sum(-1).tolist()
    nested = torch.nested.as_nested_tensor(
        [row[:n] for row, n in zip(mask, lengths, strict=True)], layout=torch.jagged
    )
    for key in RESPONSE_FIELDS:
        td[key] = response_to_nested(td[key], nested)
    prompt_lengths = td["attention_mask"][:, :PROMPT].sum(-1).tolist()
    td["prompts"] = torch.nested.as_nested_tensor(
        [row[PROMPT - n :] for row, n in zip(td["prompts"], prompt_lengths, strict=True)],
        layout=torch.jagged,
    )
    return td.exclude("max_response_len", "max_seq_len")


def micro_batches(
    td: TensorDict, mini: int, micro: int, *, with_weights: bool = True
) -> list[list[TensorDict]]:
    """Mini-batches as `train_mini_batch` makes them, each split into micro-batches with the
    global normalisers set as the FSDP engine sets them (one data-parallel rank)."""
    if not with_weights:
        td = td.exclude("rollout_is_weights")
    steps = []
    for mb in tu.make_iterator(td, mini_batch_size=mini, epochs=1, seed=0):
        tu.assign_non_tensor(
            mb,
            global_batch_size=mini,
            batch_num_tokens=int(mb["loss_mask"].sum()),
            dp_size=1,
            use_dynamic_bsz=False,
            micro_batch_size_per_gpu=micro,
        )
        steps.append(prepare_micro_batches(mb)[0])
    return steps


def model_output(micro: TensorDict) -> dict[str, torch.Tensor]:
    """What the engine's forward returns: log-probs over the unpadded sequence, nested, with the
    response's log-probs where `no_padding_2_padding` reads them."""
    lengths = micro["input_ids"].offsets().diff().tolist()
    mask = micro["response_mask"]
    resp_len = (mask.offsets().diff() if mask.is_nested else mask.sum(-1)).tolist()
    rows = []
    for i, (n, r) in enumerate(zip(lengths, resp_len, strict=True)):
        row = torch.zeros(n)
        row[n - r - 1 : n - 1] = micro["_logp"][i, :r]
        rows.append(row)
    values = torch.cat(rows)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return {"log_probs": torch.nested.nested_tensor_from_jagged(values, offsets=offsets)}


def record(
    config: ActorConfig, steps: list[list[TensorDict]], out: Path
) -> tuple[list[list[MicroBatch]], list[list[float]]]:
    """Runs verl's `ppo_loss` on every micro-batch, captures it, logs each mini-batch as a
    step; returns the captured micro-batches and verl's loss per micro-batch."""
    captured, losses = [], []
    groups = Groups.of([str(u) for mb in steps for m in mb for u in m["uid"]])
    width = steps[0][0]["response_mask"].shape[-1]
    policy = policy_for_actor_config(config, response_width=width)
    with Recorder(out, policy=policy, group_ids="global") as rec:
        for n, mb in enumerate(steps):
            micro, step_losses = [], []
            for m in mb:
                output = model_output(m)
                loss, metrics = ppo_loss(config, output, m)
                step_losses.append(float(loss))
                micro.append(capture_micro_batch(config, output, m, metrics))
            StepLog(grad_norm=1.5, max_norm=1.0, lr=1e-6, inner_step=n).write(rec, n, micro, groups)
            captured.append(micro)
            losses.append(step_losses)
    return captured, losses


def micro_batch_of(step: Any, index: int) -> PolicyBatch:
    """The step's arrays restricted to one micro-batch's sequences."""
    seqs = torch.nonzero(step["micro_batch"] == index).flatten()
    tokens = torch.isin(step["seq_id"], seqs)
    remap = torch.full((int(step["seq_id"].max()) + 1,), -1, dtype=torch.int64)
    remap[seqs] = torch.arange(seqs.numel())

    def opt(name: str) -> torch.Tensor | None:
        value = step.get(name)
        return None if value is None else value[tokens]

    return PolicyBatch(
        logp=step["logp"][tokens],
        logp_old=step["logp_old"][tokens],
        advantages=step["advantages"][tokens],
        mask=step["mask"][tokens],
        seq_id=remap[step["seq_id"][tokens].long()],
        group_id=step["group_id"][seqs],
        logp_ref=opt("logp_ref"),
        loss_weight=opt("loss_weight"),
        loss_scale=opt("loss_scale"),
    )


def verl_clipfracs(batch: PolicyBatch, config: ActorConfig, policy: str) -> tuple[float, float]:
    """The formula replay must implement, on recorded arrays, for one micro-batch. Over its
    scored tokens (the denominator is their count), with log r = logp - logp_old:
    - dual-clip (vanilla): r~ = exp(clamp(log r, -20, 20));
      pg_clipfrac = mean[(A > 0 & r~ > 1+eps_high) | (A < 0 & r~ < 1-eps_low)],
      pg_clipfrac_lower = mean[A < 0 & r~ > c];
    - gspo: the same pg_clipfrac on s~_i = exp(min(mean_{t in i} log r_t, 10)) broadcast to
      the sequence's tokens; pg_clipfrac_lower = 0;
    - cispo: pg_clipfrac = mean[r~ < 1-eps_low | r~ > 1+eps_high] whatever A (A = 0 tokens
      count); pg_clipfrac_lower = 0. sapo reports 0 and 0; gpg reports neither;
    - dppo: valid = where(A > 0, p - p_old <= eps_high, p - p_old >= -eps_low) (tv) or the
      binary-KL rule (kl); pg_clipfrac = mean[~valid], pg_clipfrac_lower = mean[valid & r~ > c]."""
    mask = torch.as_tensor(batch.mask).bool().reshape(-1)
    log_r = (torch.as_tensor(batch.logp) - torch.as_tensor(batch.logp_old)).reshape(-1)
    adv = torch.as_tensor(batch.advantages).reshape(-1)
    low, high = 1 - config.clip_ratio_low, 1 + config.clip_ratio_high
    n = mask.sum().clamp(min=1)
    if policy == "gspo":
        seq = torch.as_tensor(batch.seq_id).reshape(-1).long()
        total = torch.zeros(int(seq.max()) + 1).index_add_(0, seq, torch.where(mask, log_r, 0.0))
        count = torch.zeros_like(total).index_add_(0, seq, mask.float()).clamp(min=1)
        ratio = torch.exp((total / count).clamp(max=10))[seq]
    else:
        ratio = torch.exp(log_r.clamp(-20, 20))
    if policy == "dppo":  # verl compute_policy_loss_dppo_tv / _dppo_kl
        logp, logp_old = torch.as_tensor(batch.logp), torch.as_tensor(batch.logp_old)
        prob, old_prob = torch.exp(logp).reshape(-1), torch.exp(logp_old).reshape(-1)
        if config.policy_loss.loss_mode == "dppo_tv":
            valid = torch.where(adv > 0, prob - old_prob <= high - 1, prob - old_prob >= -(1 - low))
        else:
            kl = old_prob * (logp_old - logp).reshape(-1) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
            )
            valid = torch.where(
                adv > 0,
                (kl <= config.clip_ratio_high) | (prob <= old_prob),
                (kl <= config.clip_ratio_low) | (prob >= old_prob),
            )
        lower = valid & (ratio > config.clip_ratio_c)
        return float((~valid & mask).sum() / n), float((lower & mask).sum() / n)
    if policy == "cispo":
        clip = (ratio < low) | (ratio > high)
    else:
        clip = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    lower = (adv < 0) & (ratio > config.clip_ratio_c) if policy == "dual-clip" else clip & False
    return float((clip & mask).sum() / n), float((lower & mask).sum() / n)


def verl_ppo_kl(batch: PolicyBatch) -> float:
    """verl's ppo_kl of one micro-batch: the mean over its scored tokens of -clamp(log r, -20,
    20)."""
    mask = torch.as_tensor(batch.mask).bool()
    log_r = (torch.as_tensor(batch.logp) - torch.as_tensor(batch.logp_old)).clamp(-20, 20)
    return float(-log_r.double()[mask].sum() / (mask.sum() + 1e-8))


def recorded_agg(spec: str) -> Any:
    """The same policy with agg=recorded (verl's own normaliser, per micro-batch exact)."""
    policy = get_policy(spec)
    params = dict(policy.params)
    if "agg" not in params:
        return policy
    params.update(agg="recorded", max_len=None, rows="scored")
    return get_policy(format_spec(policy.name, {k: v for k, v in params.items() if v is not None}))


CASES = [
    pytest.param({}, id="vanilla-token-mean"),
    pytest.param({"loss_agg_mode": "seq-mean-token-mean"}, id="vanilla-seq-mean-token-mean"),
    pytest.param({"loss_agg_mode": "seq-mean-token-sum"}, id="vanilla-seq-mean-token-sum"),
    pytest.param({"loss_agg_mode": "seq-mean-token-sum-norm"}, id="vanilla-token-sum-norm"),
    pytest.param({"loss_agg_mode": "token-sum", "clip_ratio_high": 0.28}, id="vanilla-token-sum"),
    pytest.param({"clip_ratio_c": 2.0, "clip_ratio_low": 0.1}, id="vanilla-c2"),
    pytest.param({"clip_ratio_c": math.inf}, id="vanilla-no-dual-clip"),
    pytest.param({"use_kl_loss": True, "kl_loss_coef": 0.05}, id="vanilla-kl"),
    pytest.param({"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}, id="gspo"),
    pytest.param({"loss_mode": "gspo"}, id="gspo-token-mean"),
    pytest.param({"loss_mode": "gspo", "loss_agg_mode": "token-sum"}, id="gspo-token-sum"),
    pytest.param({"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-sum"}, id="gspo-luspo"),
    pytest.param(
        {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 9},
        id="gspo-token-sum-norm",
    ),
    pytest.param({"loss_mode": "sapo"}, id="sapo"),
    pytest.param(
        {
            "loss_mode": "sapo",
            "loss_agg_mode": "seq-mean-token-mean",
            "use_kl_loss": True,
            "kl_loss_coef": 0.05,
        },
        id="sapo-kl",
    ),
    pytest.param({"loss_mode": "cispo", "loss_agg_mode": "token-mean"}, id="cispo"),
    pytest.param({"loss_mode": "gpg", "loss_agg_mode": "seq-mean-token-mean"}, id="gpg"),
    pytest.param({"loss_mode": "dppo_tv", "clip_ratio_c": 2.0}, id="dppo-tv"),
    pytest.param({"loss_mode": "dppo_kl", "clip_ratio_c": math.inf}, id="dppo-kl-untruncated"),
    pytest.param(
        {"loss_mode": "dppo_tv", "loss_agg_mode": "seq-mean-token-mean", "clip_ratio_low": 0.05},
        id="dppo-tv-seq-mean-token-mean",
    ),
    pytest.param(
        {"loss_mode": "dppo_kl", "loss_agg_mode": "token-sum", "clip_ratio_high": 0.02},
        id="dppo-kl-token-sum",
    ),
    pytest.param(
        {"loss_mode": "dppo_kl", "use_kl_loss": True, "kl_loss_coef": 0.05}, id="dppo-kl-kl"
    ),
    pytest.param({"loss_mode": "geo_mean"}, id="geo-mean"),
    pytest.param(
        {"loss_mode": "geo_mean", "clip_ratio_low": 0.1, "clip_ratio_high": 0.3},
        id="geo-mean-asymmetric",
    ),
]


@pytest.mark.parametrize("with_weights", [True, False], ids=["rollout-is", "no-rollout-is"])
@pytest.mark.parametrize("overrides", CASES)
def test_own_policy_reproduces_verl_loss(
    overrides: dict[str, Any], with_weights: bool, tmp_path: Path
) -> None:
    """Each configuration with rollout_is_weights (verl's rollout correction) and without
    (its default)."""
    config = actor_config(**overrides)
    steps = micro_batches(rollout(), mini=6, micro=2, with_weights=with_weights)
    captured, losses = record(config, steps, tmp_path / "run")
    run = open_run(tmp_path / "run")
    own = get_policy(run.policy_spec or "")
    exact = recorded_agg(run.policy_spec or "")
    assert run.step_numbers == [0, 1]
    discarded = 0
    for n, step in enumerate(run):
        verl_step = sum(losses[n])
        # the named aggregation over the merged step, and agg=recorded (verl's own normaliser)
        weights = own.weights(policy_batch(step))
        assert float(weights.objective) == pytest.approx(-verl_step, abs=1e-6)
        discarded += int(weights.discarded.sum())
        for index, loss in enumerate(losses[n]):
            objective = float(exact.weights(micro_batch_of(step, index)).objective)
            assert objective == pytest.approx(-loss, abs=1e-6)
        assert step.scalars["loss"] == pytest.approx(verl_step, abs=1e-6)
        assert step.scalars["inner_step"] == n
        assert (step.get("loss_weight") is not None) == with_weights
    assert sum(len(m) for m in captured) == 6
    if own.name in ("gspo", "dppo"):  # the clip / trust region bound somewhere
        assert discarded > 0


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="vanilla"),
        pytest.param({"clip_ratio_c": 1.5, "clip_ratio_high": 0.28}, id="vanilla-c1.5"),
        pytest.param({"clip_ratio_c": math.inf}, id="vanilla-no-dual-clip"),
        pytest.param({"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}, id="gspo"),
        pytest.param({"loss_mode": "cispo"}, id="cispo"),
        pytest.param(
            {"loss_mode": "dppo_tv", "clip_ratio_high": 0.05, "clip_ratio_c": 1.05}, id="dppo-tv"
        ),
        pytest.param({"loss_mode": "dppo_kl", "clip_ratio_low": 0.01}, id="dppo-kl"),
    ],
)
def test_clip_fractions_match_verl(overrides: dict[str, Any], tmp_path: Path) -> None:
    """verl's pg_clipfrac / pg_clipfrac_lower of each micro-batch equal the fractions of our
    Weights (vanilla, gspo) and the formula `verl_clipfracs` (all); the step records their
    mean over micro-batches as verl averages them, and `replay` recomputes that mean."""
    config = actor_config(**overrides)
    steps = micro_batches(rollout(scale=0.9), mini=6, micro=2)
    captured, _ = record(config, steps, tmp_path / "run")
    run = open_run(tmp_path / "run")
    policy = recorded_agg(run.policy_spec or "")
    (replayed,) = replay_run(
        run, [run.policy_spec or ""], config=ReplayConfig(device="cpu")
    ).policies
    lower_seen = clip_seen = 0.0
    for step, micro in zip(run, captured, strict=True):
        for index, m in enumerate(micro):
            batch = micro_batch_of(step, index)
            w = policy.weights(batch)
            mask = torch.as_tensor(batch.mask).bool()
            scored = mask.sum()
            clipfrac, lower = verl_clipfracs(batch, config, policy.name)
            assert clipfrac == pytest.approx(m.metrics["actor/pg_clipfrac"], abs=1e-6)
            assert lower == pytest.approx(m.metrics["actor/pg_clipfrac_lower"], abs=1e-6)
            lower_seen += lower
            clip_seen += clipfrac
            if policy.name not in ("cispo", "dppo"):  # they count A = 0 tokens (not eligible)
                ratio = torch.exp(torch.as_tensor(batch.logp) - torch.as_tensor(batch.logp_old))
                dual = w.discarded & (w.advantages < 0) & (ratio > 1)
                dual &= policy.name == "dual-clip"  # gspo has no lower clip
                assert float((w.discarded & ~dual).sum() / scored) == pytest.approx(clipfrac)
                assert float(dual.sum() / scored) == pytest.approx(lower)
        mean = sum(m.metrics["actor/pg_clipfrac"] for m in micro) / len(micro)
        assert step.scalars["actor/pg_clipfrac"] == pytest.approx(mean)
        row = replayed.steps[step.step]
        assert row["verl_pg_clipfrac"] == pytest.approx(mean, abs=1e-6)
        lower = sum(m.metrics["actor/pg_clipfrac_lower"] for m in micro) / len(micro)
        assert row["verl_pg_clipfrac_lower"] == pytest.approx(lower, abs=1e-6)
    if policy.name == "dual-clip":  # the dual clip did bind somewhere, unless it is off
        assert (lower_seen > 0) == (config.clip_ratio_c != math.inf)
    if policy.name == "dppo":
        assert clip_seen > 0  # the trust region did bind somewhere


def verl_policy_loss(
    config: ActorConfig,
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(verl's policy loss of [B, L] rows as one micro-batch on one rank, its normalisers the
    rows' own as `ppo_loss` sets them; the log-prob leaf it was computed from)."""
    config.global_batch_info.update(
        dp_size=1,
        batch_num_tokens=int(mask.sum()),
        global_batch_size=mask.shape[0],
        loss_scale_factor=None,
    )
    leaf = logp.clone().requires_grad_(True)
    loss, _ = core_algos.get_policy_loss_fn(config.policy_loss.loss_mode)(
        old_log_prob=logp_old,
        log_prob=leaf,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=weight,
    )
    return loss, leaf


def flat_batch(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    **extra: Any,
) -> PolicyBatch:
    """[B, L] tensors as a flat recording keeps them, one sequence a row."""
    rows, width = logp.shape
    return PolicyBatch(
        logp=logp.flatten(),
        logp_old=logp_old.flatten(),
        advantages=adv.flatten(),
        mask=mask.flatten(),
        seq_id=torch.arange(rows).repeat_interleave(width),
        loss_weight=weight.flatten(),
        **extra,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"loss_mode": "gspo", "loss_agg_mode": agg}, id=f"gspo-{agg}")
        for agg in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum")
    ]
    + [
        pytest.param(
            {
                "loss_mode": "gspo",
                "loss_agg_mode": "seq-mean-token-sum-norm",
                "clip_ratio_low": 0.1,
            },
            id="gspo-seq-mean-token-sum-norm",
        ),
        pytest.param(
            {"loss_mode": "dppo_tv", "clip_ratio_high": 0.05, "clip_ratio_c": 1.05}, id="dppo-tv"
        ),
        pytest.param(
            {
                "loss_mode": "dppo_kl",
                "loss_agg_mode": "seq-mean-token-mean",
                "clip_ratio_low": 0.01,
            },
            id="dppo-kl",
        ),
    ],
)
def test_mapped_policy_gradient_equals_verl_autograd(overrides: dict[str, Any]) -> None:
    """The mapped policy's coef is minus the gradient of verl's loss (its global normalisers
    set as `ppo_loss` sets them) w.r.t. each scored token's log-prob, with advantages and
    rollout weights that vary within a sequence for gspo (the token form) and dppo_tv."""
    gen = torch.Generator().manual_seed(3)
    rows, width = 6, 5
    mask = torch.arange(width)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    mask[4] = False  # a row without a scored token still counts in global_batch_size
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    logp_old = logp - torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3, 0.7, 2.0], dtype=torch.float64)[:, None]
    weight = (0.5 + torch.rand(rows, 1, generator=gen, dtype=torch.float64)).expand(rows, width)
    if overrides["loss_mode"] in ("dppo_tv", "gspo"):  # token-level weights and advantages
        adv = adv + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.3
        weight = 0.5 + torch.rand(rows, width, generator=gen, dtype=torch.float64)
    adv, weight = adv.expand(rows, width) * mask, weight * mask
    config = actor_config(**overrides)
    loss, leaf = verl_policy_loss(config, logp, logp_old, adv, mask, weight)
    loss.backward()
    assert leaf.grad is not None
    batch = flat_batch(logp, logp_old, adv, mask, weight)
    weights = policy_for_actor_config(config, response_width=width).weights(batch)
    assert float(weights.objective) == pytest.approx(-float(loss), abs=1e-12)
    assert torch.allclose(weights.coef, -leaf.grad.flatten(), atol=1e-12)
    assert weights.discarded.any() and not weights.discarded.all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gspo_past_verls_sequence_log_ratio_clamp_equals_verl_autograd(agg: str) -> None:
    """verl's gspo clamps the sequence's mean log r at 10, which zeroes the gradient of a
    sequence past it (kept at exactly 10): the mapped spec names that cap (log_ratio_max=10),
    and its objective and coef are minus verl's loss and its autograd gradient, with A < 0
    and A > 0 past the cap, at it, and inside it."""
    rows, width = 7, 4
    mask = torch.arange(width)[None] < torch.tensor([4, 3, 4, 2, 4, 3, 4])[:, None]
    logp = torch.full((rows, width), -2.0, dtype=torch.float64)
    mean_log_ratio = torch.tensor([10.5, 10.5, 10.0, 10.0, 12.0, 0.1, -0.05], dtype=torch.float64)
    spread = torch.tensor([0.3, -0.1, -0.2, 0.0], dtype=torch.float64)  # sum 0 over 3, 4 tokens
    logp_old = logp - mean_log_ratio[:, None] - spread
    logp_old[2:4] = logp[2:4] - 10.0  # every token's log r exactly 10, so is the mean
    adv = torch.tensor([-1.0, 1.0, -0.7, 0.6, -2.0, -0.5, 0.8], dtype=torch.float64)[:, None]
    gen = torch.Generator().manual_seed(5)
    weight = 0.5 + torch.rand(rows, width, generator=gen, dtype=torch.float64)
    adv = (adv + 0.1 * torch.rand(rows, width, generator=gen, dtype=torch.float64)) * mask
    weight = weight * mask
    config = actor_config(loss_mode="gspo", loss_agg_mode=agg)
    loss, leaf = verl_policy_loss(config, logp, logp_old, adv, mask, weight)
    loss.backward()
    assert leaf.grad is not None
    policy = policy_for_actor_config(config, response_width=width)
    assert "log_ratio_max=10" in policy.spec.split(":")[1].split(",")
    weights = policy.weights(flat_batch(logp, logp_old, adv, mask, weight))
    assert float(weights.objective) == pytest.approx(-float(loss), rel=1e-12)
    assert torch.allclose(weights.coef, -leaf.grad.flatten(), rtol=1e-12, atol=0.0)
    coef = weights.coef.view(rows, width)
    assert not coef[[0, 1, 3, 4]].any()  # past the cap (and A > 0 at it: the clip binds)
    assert all(coef[row][mask[row]].all() for row in (2, 5, 6))  # A < 0 at the cap; inside it


@pytest.mark.parametrize("kl_type", ["low_var_kl", "k3"])
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="vanilla"),
        pytest.param({"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"}, id="gspo"),
        pytest.param({"loss_mode": "cispo", "loss_agg_mode": "seq-mean-token-sum"}, id="cispo"),
    ],
)
def test_kl_loss_past_verls_clamp_equals_verl_autograd(
    overrides: dict[str, Any], kl_type: str
) -> None:
    """verl's KL loss as `ppo_loss` adds it (kl_penalty, agg_loss by loss_agg_mode, times
    kl_loss_coef) with reference log-probs far from the current ones, where verl clamps the
    k3 term at 10 (and log ratio at 20), which zeroes its gradient there: the mapped policy's
    objective and coef are minus verl's loss and its autograd gradient."""
    gen = torch.Generator().manual_seed(11)
    rows, width = 4, 5
    mask = torch.arange(width)[None] < torch.tensor([5, 3, 4, 2])[:, None]
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    logp_old = logp - torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.2
    delta = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    delta[0, :3] = torch.tensor([3.5, -12.0, -25.0], dtype=torch.float64)  # k3 > 10 (clamped)
    delta[1, 1] = 22.0  # log ratio past verl's 20 clamp
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3], dtype=torch.float64)[:, None].expand(rows, width)
    weight = 0.5 + torch.rand(rows, width, generator=gen, dtype=torch.float64)
    adv, weight = adv * mask, weight * mask
    config = actor_config(use_kl_loss=True, kl_loss_coef=0.05, kl_loss_type=kl_type, **overrides)
    pg_loss, leaf = verl_policy_loss(config, logp, logp_old, adv, mask, weight)
    kld = core_algos.kl_penalty(logprob=leaf, ref_logprob=logp + delta, kl_penalty=kl_type)
    kl_loss = core_algos.agg_loss(
        loss_mat=kld,
        loss_mask=mask,
        loss_agg_mode=config.loss_agg_mode,
        **config.global_batch_info,
    )
    loss = pg_loss + kl_loss * config.kl_loss_coef
    loss.backward()
    assert leaf.grad is not None
    batch = flat_batch(logp, logp_old, adv, mask, weight, logp_ref=(logp + delta).flatten())
    weights = policy_for_actor_config(config, response_width=width).weights(batch)
    assert float(weights.objective) == pytest.approx(-float(loss), abs=1e-12)
    assert torch.allclose(weights.coef, -leaf.grad.flatten(), atol=1e-12)


def verl_over_ranks(
    config: ActorConfig,
    split: list[list[int]],
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[float, torch.Tensor, PolicyBatch]:
    """verl's policy loss of [B, L] rows split over simulated data-parallel ranks, each rank's
    rows over micro-batches of the sizes `split[rank]`: (the mean over ranks of each rank's
    sum of micro-batch losses, as verl logs pg_loss; the mean over ranks of each replica's
    autograd gradient, as the all-reduce gives; the flat batch of the joined step, each
    rank's micro-batches numbered apart as the reader joins them, with its ranks)."""
    loss_fn = core_algos.get_policy_loss_fn(config.policy_loss.loss_mode)
    ranks = len(split)
    grad = torch.zeros_like(logp)
    verl_loss = 0.0
    for r, rank_rows in enumerate(torch.arange(logp.shape[0]).split([sum(x) for x in split])):
        leaf = logp.clone().requires_grad_(True)  # this rank's replica
        loss = torch.zeros((), dtype=logp.dtype)
        for part in rank_rows.split(split[r]):
            micro_loss, _ = loss_fn(
                old_log_prob=logp_old[part],
                log_prob=leaf[part],
                advantages=adv[part],
                response_mask=mask[part],
                loss_agg_mode=config.loss_agg_mode,
                config=config,
                rollout_is_weights=weight[part],
            )
            loss = loss + micro_loss
        loss.backward()
        assert leaf.grad is not None
        grad += leaf.grad / ranks
        verl_loss += float(loss.detach()) / ranks
    sizes = torch.tensor([size for rank in split for size in rank])
    micro = torch.arange(len(sizes)).repeat_interleave(sizes)
    batch = flat_batch(logp, logp_old, adv, mask, weight, micro_batch=micro, ranks=ranks)
    return verl_loss, grad, batch


@pytest.mark.parametrize(
    "split",
    [
        pytest.param([[6]], id="one"),
        pytest.param([[2, 2, 2]], id="3x2"),
        pytest.param([[1, 4, 1]], id="1-4-1"),
        pytest.param([[2, 1], [1, 2]], id="2-ranks"),
        pytest.param([[2], [1], [3]], id="3-ranks-uneven"),
    ],
)
def test_gmpo_over_micro_batches_equals_verl_autograd(split: list[list[int]]) -> None:
    """verl's geo_mean loss of a rank is the sum of its micro-batches' losses (a torch.mean
    over each one's rows), and the data-parallel all-reduce averages the ranks' gradients:
    `gmpo:mean=micro` over the recorded micro-batches of a step joined from the ranks (each
    rank's micro-batches numbered apart, as the reader joins them) gives minus the mean over
    ranks of those sums and its gradient, uneven micro-batches, a row without a scored
    token, and advantages and rollout weights that vary within a sequence included."""
    gen = torch.Generator().manual_seed(5)
    rows, width, ranks = 6, 5, len(split)
    mask = torch.arange(width)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    mask[4] = False  # still a row of its micro-batch's mean
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    logp_old = logp - torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3, 0.7, -2.0], dtype=torch.float64)[:, None]
    adv = (adv + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.1) * mask
    weight = (0.5 + torch.rand(rows, width, generator=gen, dtype=torch.float64)) * mask
    config = actor_config(loss_mode="geo_mean", clip_ratio_low=0.1, clip_ratio_high=0.3)
    verl_loss, grad, batch = verl_over_ranks(config, split, logp, logp_old, adv, mask, weight)
    policy = policy_for_actor_config(config, response_width=width)
    weights = policy.weights(batch)
    # verl's |y_i| + 1e-8 is float32 with a bool mask, i.e. |y_i|; ours adds 1e-8 in float64:
    # a relative 1e-8 / |y_i| in each of A_i, s_i and the coefficient's 1 / |y_i|
    assert float(weights.objective) == pytest.approx(-verl_loss, rel=1e-7, abs=1e-15)
    assert torch.allclose(weights.coef, -grad.flatten(), rtol=1e-7, atol=1e-15)
    assert weights.discarded.any() and not weights.discarded.all()
    one_mean = get_policy(policy.spec.replace("mean=micro", "mean=step")).weights(batch)
    if sum(map(len, split)) > 1:  # one mean over the step is not verl's loss
        assert float(one_mean.objective) != pytest.approx(-verl_loss, rel=1e-3)
    if ranks > 1:  # the ranks' sums, not averaged, are not verl's loss either
        summed = policy.weights(dataclasses.replace(batch, ranks=1))
        assert float(summed.objective) == pytest.approx(-verl_loss * ranks, rel=1e-7)


def test_kl_cov_step_of_one_micro_batch_reproduces_verl_loss(tmp_path: Path) -> None:
    """A kl_cov step of one micro-batch: verl's covariance ranks that step's tokens, as the
    catalogue's kl-cov does, so the mapped policy gives verl's loss (captured through
    `ppo_loss`, rollout weights and the KL loss included)."""
    overrides = {"policy_loss": {"kl_cov_ratio": 0.2}, "use_kl_loss": True, "kl_loss_coef": 0.05}
    config = actor_config(loss_mode="kl_cov", **overrides)
    steps = micro_batches(rollout(scale=0.9), mini=6, micro=6)
    _, losses = record(config, steps, tmp_path / "run")
    run = open_run(tmp_path / "run")
    own = get_policy(run.policy_spec or "")
    assert own.name == "kl-cov"
    for n, step in enumerate(run):
        (verl_loss,) = losses[n]
        weights = own.weights(policy_batch(step))
        assert float(weights.objective) == pytest.approx(-verl_loss, abs=1e-6)
        assert bool(weights.clipped.any())  # the penalised tokens


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize(
    "split",
    [
        pytest.param([[8]], id="one"),
        pytest.param([[3, 5]], id="2-micro"),
        pytest.param([[4], [4]], id="2-ranks"),
        pytest.param([[2, 2], [3, 1]], id="2-ranks-2-micro"),
    ],
)
def test_kl_cov_over_micro_batches_and_ranks_equals_verl_autograd(
    split: list[list[int]], agg: str
) -> None:
    """verl's kl_cov ranks each micro-batch's tokens by a covariance over that micro-batch (on
    each rank), its agg_loss divides by the global normalisers times dp_size, and the
    all-reduce averages the ranks' gradients: kl-cov:cov=micro over the step joined from the
    ranks gives minus verl's loss (the mean over ranks of each rank's sum) and its gradient,
    with rollout weights and advantages that vary within a sequence."""
    gen = torch.Generator().manual_seed(9)
    rows, width, ranks = 8, 6, len(split)
    mask = torch.arange(width)[None] < torch.tensor([6, 3, 1, 4, 2, 6, 5, 3])[:, None]
    mask[4] = False
    logp = -torch.rand(rows, width, generator=gen, dtype=torch.float64) * 2
    logp_old = logp - torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(rows, 1, generator=gen, dtype=torch.float64)
    adv = (adv + torch.randn(rows, width, generator=gen, dtype=torch.float64) * 0.3) * mask
    weight = (0.5 + torch.rand(rows, width, generator=gen, dtype=torch.float64)) * mask
    config = actor_config(loss_mode="kl_cov", loss_agg_mode=agg, policy_loss={"kl_cov_ratio": 0.25})
    config.global_batch_info.update(
        dp_size=ranks,
        batch_num_tokens=int(mask.sum()),
        global_batch_size=rows,
        loss_scale_factor=None,
    )
    verl_loss, grad, batch = verl_over_ranks(config, split, logp, logp_old, adv, mask, weight)
    policy = policy_for_actor_config(config, response_width=width)
    assert policy.name == "kl-cov" and "cov=micro" in policy.spec
    weights = policy.weights(batch)
    assert float(weights.objective) == pytest.approx(-verl_loss, rel=1e-12, abs=1e-15)
    assert torch.allclose(weights.coef, -grad.flatten(), rtol=1e-12, atol=1e-15)
    sizes = [size for rank in split for size in rank]
    assert int(weights.clipped.sum()) == sum(max(1, int(0.25 * n)) for n in _scored(mask, sizes))
    if len(sizes) > 1:  # ranking the step's tokens together is not verl's loss
        step = get_policy(policy.spec.replace("cov=micro", "cov=step")).weights(batch)
        assert not torch.equal(step.clipped, weights.clipped)


def _scored(mask: torch.Tensor, sizes: list[int]) -> list[int]:
    """Scored tokens of each micro-batch with any (the rows split by `sizes`)."""
    counts = [int(part.sum()) for part in mask.split(sizes)]
    return [n for n in counts if n]


def test_replay_formula_on_extreme_ratios(tmp_path: Path) -> None:
    """|log r| > 20: verl clamps before exp, so the formula (and replay) must clamp too."""
    config = actor_config()
    logp_old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    logp = torch.tensor([[25.0, -25.0, 25.0, -25.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    _, metrics = core_algos.compute_policy_loss_vanilla(logp_old, logp, adv, mask, config=config)
    batch = PolicyBatch(logp=logp, logp_old=logp_old, advantages=adv, mask=mask)
    clipfrac, lower = verl_clipfracs(batch, config, "dual-clip")
    assert (clipfrac, lower) == (metrics["actor/pg_clipfrac"], metrics["actor/pg_clipfrac_lower"])
    assert (clipfrac, lower) == (0.5, 0.25)
    spec = policy_for_actor_config(config, response_width=4).spec
    with Recorder(tmp_path / "run", policy=spec) as rec:
        rec.log_step(0, logp=logp, logp_old=logp_old, advantages=adv, mask=mask)
    result = replay_run(open_run(tmp_path / "run"), [spec], config=ReplayConfig(device="cpu"))
    (row,) = result.policies
    assert (row.steps[0]["verl_pg_clipfrac"], row.steps[0]["verl_pg_clipfrac_lower"]) == (
        pytest.approx(0.5),
        pytest.approx(0.25),
    )


@pytest.mark.parametrize(
    ("overrides", "spec"),
    [
        ({}, "dual-clip"),
        ({"clip_ratio_low": 0.1, "clip_ratio_high": 0.2}, "dual-clip:eps_high=0.2,eps_low=0.1"),
        (
            {"clip_ratio_high": 0.28, "use_kl_loss": True, "kl_loss_coef": 0.01},
            "dual-clip:beta=0.01,eps_high=0.28,kl_max=10,kl_weight=none",
        ),
        (
            {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 512},
            "dual-clip:agg=seq-mean-token-sum-norm,max_len=512,rows=all",
        ),
        (
            {"loss_agg_mode": "seq-mean-token-sum-norm"},
            "dual-clip:agg=seq-mean-token-sum-norm,max_len=7,rows=all",
        ),
        ({"loss_agg_mode": "seq-mean-token-mean"}, "dual-clip:agg=seq-mean-token-mean,rows=all"),
        ({"loss_agg_mode": "token-sum"}, "dual-clip:agg=token-sum"),
        ({"loss_mode": "sapo"}, "sapo:rows=all"),
        ({"use_kl_loss": True, "kl_loss_coef": 0.0}, "dual-clip"),  # a KL term of weight 0
        ({"loss_mode": "sapo", "use_kl_loss": True, "kl_loss_coef": 0.0}, "sapo:rows=all"),
        (
            {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-mean"},
            "gspo:eps_high=0.2,eps_low=0.2,form=token,log_ratio_max=10,rows=all",
        ),
        ({"loss_mode": "gpg"}, "reinforce"),
        (
            {"loss_mode": "gspo"},
            "gspo:agg=token-mean,eps_high=0.2,eps_low=0.2,form=token,log_ratio_max=10",
        ),
        (
            {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-sum", "clip_ratio_low": 1e-3},
            "gspo:agg=seq-mean-token-sum,eps_high=0.2,eps_low=0.001,form=token,log_ratio_max=10,"
            "rows=all",
        ),
        (
            {"loss_mode": "gspo", "loss_agg_mode": "seq-mean-token-sum-norm"},
            "gspo:agg=seq-mean-token-sum-norm,eps_high=0.2,eps_low=0.2,form=token,log_ratio_max=10,"
            "max_len=7,rows=all",
        ),
        ({"loss_mode": "dppo_tv"}, "dppo"),
        # clip_ratio_c=inf: no dual clip (no truncation); c=1e9 lies above any ratio verl's
        # clamp of log r at 20 lets through, so it never binds either
        ({"clip_ratio_c": math.inf}, "dual-clip:c=1000000000"),
        ({"loss_mode": "dppo_tv", "clip_ratio_c": math.inf}, "dppo:c=1000000000"),
        (
            {
                "loss_mode": "dppo_kl",
                "loss_agg_mode": "seq-mean-token-mean",
                "clip_ratio_low": 0.05,
                "clip_ratio_high": 0.1,
                "clip_ratio_c": 10.0,
            },
            "dppo:agg=seq-mean-token-mean,c=10,delta_high=0.1,delta_low=0.05,divergence=kl,rows=all",
        ),
        (
            {"loss_mode": "dppo_tv", "use_kl_loss": True, "kl_loss_coef": 0.01},
            "dppo:beta=0.01,kl_max=10,kl_weight=none",
        ),
        ({"loss_mode": "geo_mean"}, "gmpo:eps_high=0.2,eps_low=0.2,mean=micro"),
        (
            {"loss_mode": "geo_mean", "clip_ratio_low": 0.1, "loss_agg_mode": "token-sum"},
            "gmpo:eps_high=0.2,eps_low=0.1,mean=micro",
        ),
        ({"loss_mode": "kl_cov"}, "kl-cov:cov=micro"),
        (
            {
                "loss_mode": "kl_cov",
                "loss_agg_mode": "seq-mean-token-mean",
                "policy_loss": {"kl_cov_ratio": 0.1, "ppo_kl_coef": 0.5},
                "use_kl_loss": True,
                "kl_loss_coef": 0.01,
            },
            "kl-cov:agg=seq-mean-token-mean,beta=0.01,cov=micro,kl_coef=0.5,kl_max=10,kl_weight=none,"
            "ratio=0.1,rows=all",
        ),
    ],
)
def test_policy_mapping(overrides: dict[str, Any], spec: str) -> None:
    """The mapped policy's canonical spec, which parses back to the same parameters."""
    policy = policy_for_actor_config(actor_config(**overrides), response_width=7)
    assert policy.spec == spec
    assert get_policy(spec).params == policy.params


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"loss_mode": "clip_cov"}, "loss_mode 'clip_cov': verl zeroes a random draw"),
        (
            {"loss_mode": "geo_mean", "use_kl_loss": True},
            "loss_mode 'geo_mean' with use_kl_loss: verl normalises the KL term by",
        ),
        (
            {"loss_mode": "sapo", "use_kl_loss": True},
            "loss_mode 'sapo' with use_kl_loss and loss_agg_mode 'token-mean': verl",
        ),
        ({"loss_mode": "dro"}, "loss_mode 'dro' is not one of"),
        ({"loss_mode": "bypass_mode"}, "loss_mode 'bypass_mode' is not one of"),
        ({"entropy_coeff": 0.01}, "entropy bonus"),
        ({"use_kl_loss": True, "kl_loss_type": "k1"}, "kl_loss_type 'k1'"),
        ({"use_kl_loss": True, "kl_loss_type": "k3+"}, "kl_loss_type 'k3+'"),
        (  # verl divides by 2.5; the catalogue's max_len is an integer
            {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 2.5},
            "loss_scale_factor 2.5 is not a whole number",
        ),
    ],
)
def test_refuses_what_the_catalogue_cannot_express(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(UsageError, match="cannot record this verl run") as info:
        policy_for_actor_config(actor_config(**overrides), response_width=7)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"use_kl_loss": True, "kl_loss_coef": -0.1}, "(beta is kl_loss_coef)"),
        (
            {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 0},
            "(max_len is loss_scale_factor)",
        ),
        ({"clip_ratio_low": float("nan")}, "(eps_low is clip_ratio_low, or clip_ratio when unset)"),
        (
            {"loss_mode": "dppo_tv", "clip_ratio_high": -1.0},
            "(delta_high is clip_ratio_high, or clip_ratio when unset)",
        ),
    ],
)
def test_a_refused_value_names_verls_setting(overrides: dict[str, Any], setting: str) -> None:
    """A verl value the catalogue refuses was named by the catalogue's parameter alone
    ('beta must be a finite number >= 0' for kl_loss_coef=-0.1), a name a verl user never
    wrote: the refusal also says which of verl's settings the parameter is."""
    with pytest.raises(UsageError, match="cannot record this verl run") as info:
        policy_for_actor_config(actor_config(**overrides), response_width=7)
    assert setting in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["vanilla", "geo_mean", "kl_cov"])
def test_a_users_loss_registered_over_a_verl_mode_is_refused(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`register_policy_loss(mode)` over one of verl's own modes replaces verl's loss: the
    catalogue's policy of that mode would replay verl's, not the one that trained."""

    def mine(**kwargs: Any) -> Any:
        return compute(**kwargs)

    compute = core_algos.get_policy_loss_fn(mode)
    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, mode, mine)
    with pytest.raises(UsageError, match="cannot record this verl run") as info:
        policy_for_actor_config(actor_config(loss_mode=mode), response_width=7)
    message = str(info.value)
    assert f"loss_mode {mode!r} is registered to" in message and "mine" in message
    assert "not verl's own" in message and "\n" not in message


@pytest.mark.parametrize("mode", ["kl_cov", "dppo_tv", "dppo_kl"])
def test_refuses_kl_cov_and_dppo_of_float64_log_probs(mode: str) -> None:
    """verl's kl_cov and dppo compute in the log-probs' dtype: float64 values a float32
    recording does not hold."""
    config = actor_config(loss_mode=mode)
    with pytest.raises(UsageError, match="cannot record this verl run") as info:
        policy_for_actor_config(config, response_width=7, logp_dtype=torch.float64)
    assert f"loss_mode {mode!r} with torch.float64 log-probs" in str(info.value)
    assert "\n" not in str(info.value)


ENGINE_SCRIPT = Path(__file__).parent / "verl_scripts" / "fsdp_engine_run.py"
MICRO_BATCH_MODES = [
    ("geo_mean", "gmpo:eps_high=0.2,eps_low=0.2,mean=micro"),
    ("kl_cov", "kl-cov:cov=micro,logp_dtype=bfloat16,ratio=0.2"),
]
"""(policy_loss.loss_mode, the spec recorded) of each dynamic-batching engine run."""
KL_LOSS = {"use_kl_loss": True, "kl_loss_coef": 0.1}
ACTOR_SETTINGS = [
    pytest.param(
        1,
        {
            "engine": {"use_dynamic_bsz": False, "micro_batch_size_per_gpu": 1},
            "actor": {"clip_ratio_c": 1.5, "loss_agg_mode": "seq-mean-token-mean"},
        },
        "dual-clip:agg=seq-mean-token-mean,c=1.5,rows=all",
        id="micro-batches-of-1-dual-clip",
    ),
    pytest.param(
        1,
        {"actor": KL_LOSS},
        "dual-clip:beta=0.1,kl_max=10,kl_weight=none",
        id="kl-low-var-kl",
    ),
    pytest.param(
        2,
        {
            "actor": {
                **KL_LOSS,
                "kl_loss_type": "k3",
                "loss_agg_mode": "seq-mean-token-sum-norm",
                "loss_scale_factor": 9,
            },
        },
        "dual-clip:agg=seq-mean-token-sum-norm,beta=0.1,kl_max=10,kl_weight=none,max_len=9,"
        "rows=all",
        id="kl-k3-loss-scale-factor-2-ranks",
    ),
    pytest.param(1, {"calculate_entropy": True}, "dual-clip", id="entropy-computed-coefficient-0"),
]
"""(world, the engine run's SETTINGS, the spec recorded) of each actor-settings engine run."""


LR_WARMUP = {"optimizer": {"lr_warmup_steps": 3}, "rollouts": 3}
"""SETTINGS of an engine run whose learning rate changes every rollout: verl's warmup over 3
scheduler steps (one a rollout), the rollout trained 3 times before the NaN one."""


REFUSED_JOB = ("vanilla", {"actor": {"entropy_coeff": 0.01}, "calculate_entropy": True})
"""(loss_mode, SETTINGS) of an engine run the hook refuses: the entropy bonus (verl's trainer
then computes the entropy)."""


OWN_ROLLOUT_N = {
    True: {"own_rollout_n": [0]},
    False: {"own_rollout_n": [1], "rollouts": 2, "seed": 6},
}
"""SETTINGS of the 2-rank engine runs whose first (True) or second rollout (False) holds a
prompt of its own rollout n."""


REJECTED_ON_RANK_1 = {"rejected": [[1, 0, -1], [1, 1, -1], [1, 5, 0]]}
"""SETTINGS of the 2-rank engine run with verl's rollout rejection sampling on rank 1's part
of the rollout alone: its rows 0 and 1 whole and row 5's first token, in response_mask."""
REJECTED_LATER = {
    "rejected": [[0, 0, -1], [0, 1, -1], [0, 5, 0]],
    "rollouts": 2,
    "rejected_from": 1,
}
"""SETTINGS of the 1-rank engine run whose second rollout (steps 4-7) is rejected so."""


def engine_jobs(world: int) -> list[tuple[str, dict[str, Any]]]:
    """(loss_mode, SETTINGS) of every engine run the tests read on `world` processes; the
    refused run (on 1 process) last, after every run that records, and on 2 processes the
    later rollout of its own rollout n last (the one job whose ranks both warn)."""
    settings = [param.values[1] for param in ACTOR_SETTINGS if param.values[0] == world]
    return [
        ("vanilla", {}),
        *((loss_mode, {}) for loss_mode, _ in MICRO_BATCH_MODES),
        *(("vanilla", each) for each in settings),
        *([("vanilla", REJECTED_LATER), ("vanilla", LR_WARMUP), REFUSED_JOB] if world == 1 else []),
        *(
            [
                ("vanilla", REJECTED_ON_RANK_1),
                ("vanilla", OWN_ROLLOUT_N[True]),
                ("vanilla", OWN_ROLLOUT_N[False]),
            ]
            if world == 2
            else []
        ),
    ]


def job_marker(number: int) -> str:
    """The line `ENGINE_SCRIPT` writes to stderr as it starts its job `number` (from 0)."""
    return f"fsdp_engine_run.py: job {number}\n"


@dataclasses.dataclass
class EngineJob:
    done: subprocess.CompletedProcess[str]
    """The launch that trained the job, with the other jobs of its world."""
    number: int
    """The job's place in the launch."""
    directory: Path
    """The job's TMP: TMP/run, TMP/result.json."""

    @property
    def stderr(self) -> str:
        """The launch's stderr from the job's start to the next job's."""
        after = self.done.stderr.partition(job_marker(self.number))[2]
        return after.partition(job_marker(self.number + 1))[0]


EngineJobs = Callable[..., EngineJob]
EngineRuns = Callable[..., tuple[Any, list[dict[str, Any]]]]


@pytest.fixture(scope="module")
def engine_launches(tmp_path_factory: pytest.TempPathFactory) -> EngineJobs:
    """`engine_launches(world, loss_mode="vanilla", settings=None)`: the EngineJob of verl's
    real FSDP2 engine stepped on CPU with the hook installed (verl_scripts), on `world`
    processes with `policy_loss.loss_mode` loss_mode and the script's SETTINGS `settings`. The
    first call for a world trains every job of `engine_jobs(world)` in one launch, each job its
    own model, worker, hook, run directory and results."""
    launches: dict[int, tuple[subprocess.CompletedProcess[str], list[Path]]] = {}

    def engine_job(
        world: int, loss_mode: str = "vanilla", settings: dict[str, Any] | None = None
    ) -> EngineJob:
        jobs = engine_jobs(world)
        if world not in launches:
            tmp = tmp_path_factory.mktemp(f"engine{world}")
            directories = [tmp / f"job{n}" for n in range(len(jobs))]
            launch = [(d, mode, each) for d, (mode, each) in zip(directories, jobs, strict=True)]
            launches[world] = engine_process(world, launch), directories
        done, directories = launches[world]
        number = jobs.index((loss_mode, settings or {}))
        return EngineJob(done, number, directories[number])

    return engine_job


@pytest.fixture(scope="module")
def engine_runs(engine_launches: EngineJobs) -> EngineRuns:
    """`engine_runs(world, loss_mode="vanilla", settings=None)`: (the recorded run, verl's
    logged metrics of each rank) of that engine job; a launch that fails fails every test
    that reads one of its jobs."""

    def engine_run(
        world: int, loss_mode: str = "vanilla", settings: dict[str, Any] | None = None
    ) -> tuple[Any, list[dict[str, Any]]]:
        job = engine_launches(world, loss_mode, settings)
        assert job.done.returncode == 0, job.done.stderr[-3000:]
        # the hook never breaks the training: a rank whose recording went off says so only
        # here (in any job before the refused one, which warns so by design)
        jobs = engine_jobs(world)
        refused = jobs.index(REFUSED_JOB) if REFUSED_JOB in jobs else len(jobs)
        recorded = job.done.stderr.partition(job_marker(refused))[0]
        assert "recording is off" not in recorded, recorded[-3000:]
        return engine_result(job.directory, world)

    return engine_run


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks-torchrun"])
def engine_run(request: pytest.FixtureRequest, engine_runs: EngineRuns) -> Any:
    """verl's real FSDP2 engine with policy_loss.loss_mode vanilla, on 1 or 2 ranks."""
    return engine_runs(request.param)


def engine_result(tmp: Path, world: int) -> tuple[Any, list[dict[str, Any]]]:
    """(the recorded run, verl's logged metrics of each rank) of an engine job run in `tmp`."""
    result = tmp / "result.json"
    ranks = [json.loads(result.read_text())]
    ranks += [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(1, world)]
    return open_run(tmp / "run"), ranks


def engine_process(
    world: int, jobs: list[tuple[Path, str, dict[str, Any]]]
) -> subprocess.CompletedProcess[str]:
    """`ENGINE_SCRIPT` on `world` processes run to its end, each job (TMP, loss_mode,
    SETTINGS) writing TMP/run and TMP/result.json."""
    if world == 1:
        command = [sys.executable, str(ENGINE_SCRIPT)]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-port", str(free_port()),
        ]  # fmt: skip
        command.append(str(ENGINE_SCRIPT))
    for tmp, loss_mode, settings in jobs:
        tmp.mkdir(parents=True, exist_ok=True)
        command += [str(tmp / "run"), str(tmp / "result.json"), loss_mode, json.dumps(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600 * len(jobs))


@pytest.mark.parametrize("first", [True, False], ids=["first-rollout", "later-rollout"])
def test_a_prompt_of_its_own_rollout_n_keeps_its_split_marks(
    engine_launches: EngineJobs, first: bool
) -> None:
    """verl's v1 trainer lets a prompt take its own `__rollout_n__`: here prompt 0 has 6
    responses, rollout.n 3, on verl's real engine over 2 ranks. The run recorded
    num_generations 3, so a step holding 3 of its 6 read as whole (its split marks cleared:
    adv= recomputed it from half the group). A first rollout of such groups now records no
    num_generations (every partial group stays marked). A later one (the second of three
    rollouts, shuffled so that each of its 4 steps holds 3 of the 6) was only warned of, its
    steps still read 3 of 6 as whole; its steps now record no prompt groups, said once a
    rank, and the other rollouts' steps keep theirs."""
    job = engine_launches(2, "vanilla", OWN_ROLLOUT_N[first])
    assert job.done.returncode == 0, job.done.stderr[-3000:]
    run, _ = engine_result(job.directory, 2)
    warned = [line for line in job.stderr.splitlines() if "stabledrl: warning" in line]
    if not first:
        assert run.manifest["meta"]["num_generations"] == 3
        assert run.step_numbers == list(range(9))
        for step in run:
            assert ("group_id" in step.fields) == (step.step not in (4, 5, 6, 7)), step.step
        assert len(warned) == 2, warned  # once on each rank
        assert "prompt groups of 6 responses, not the run's num_generations 3" in warned[0]
        assert "record no prompt groups" in warned[0]
        return
    assert "num_generations" not in run.manifest["meta"] and warned == []
    for step in list(run)[:4]:
        ids, split = step["group_id"].numpy(), step["group_split"].numpy()
        assert split[ids == 0].tolist() == [1] * int((ids == 0).sum())  # never all 6 here


def test_engine_steps_are_recorded(engine_run: Any) -> None:
    """One step per (epoch, mini-batch), per-rank files, verl's pre-clip norm and skip; its
    `reward_count` the sequences scored on every rank (a join took rank 0's alone)."""
    run, ranks = engine_run
    world = len(ranks)
    assert run.manifest["world_size"] == world
    assert run.manifest["group_ids"] == "global"
    assert run.step_numbers == [0, 1, 2, 3, 4]
    verl_steps = ranks[0]["steps"]
    for n, step in enumerate(run):
        assert step.scalars["inner_step"] == [0, 1, 2, 3, 0][n]
        assert step.scalars["reward_count"] == 6 * world  # every rank's scored sequences
        if n < 4:
            assert step.scalars["grad_norm"] == pytest.approx(verl_steps[n]["grad_norm"], rel=1e-6)
            assert step.scalars["grad_norm_clipped"] <= 0.5 + 1e-6
            assert step.scalars["update_skipped"] == 0
    skipped = run.step(4)
    assert math.isnan(skipped.scalars["grad_norm"])
    assert skipped.scalars["update_skipped"] == 1


def test_engine_loss_and_clip_fractions_match_verl(engine_run: Any) -> None:
    """With the model's real log-probs, our own policy over the merged ranks gives verl's
    logged pg_loss of each mini-batch, and the replay formula over the step's (rank,
    micro-batch) cells gives verl's logged pg_clipfrac and pg_clipfrac_lower."""
    run, ranks = engine_run
    policy = get_policy(run.policy_spec or "")
    config = actor_config()
    for n, step in enumerate(run.steps(0, 4)):
        logged = ranks[0]["steps"][n]
        objective = float(policy.weights(policy_batch(step)).objective)
        assert objective == pytest.approx(-logged["pg_loss"], abs=1e-6)
        assert step.scalars["loss"] == pytest.approx(logged["pg_loss"], abs=1e-6)
        cells = [
            verl_clipfracs(micro_batch_of(step, int(i)), config, policy.name)
            for i in torch.unique(step["micro_batch"])
        ]
        assert len(cells) > len(ranks) and len(cells) % len(ranks) == 0  # same count per rank
        assert sum(c[0] for c in cells) / len(cells) == pytest.approx(logged["pg_clipfrac"])
        lower = sum(c[1] for c in cells) / len(cells)
        assert lower == pytest.approx(logged["pg_clipfrac_lower"])
        assert int(step["group_id"].max()) < 4 * len(ranks)  # one numbering over the ranks


def test_replay_verl_metrics_equal_verls_logged_ones(engine_run: Any) -> None:
    """`stabledrl replay`'s verl_pg_clipfrac / verl_pg_clipfrac_lower / verl_ppo_kl of the
    run's own policy equal what verl logged for each optimizer step (the mean over ranks), on 1
    and 2 ranks."""
    run, ranks = engine_run
    result = replay_run(run, [run.policy_spec or ""], config=ReplayConfig(device="cpu"))
    (own,) = result.policies
    for n in range(4):
        logged, row = ranks[0]["steps"][n], own.steps[n]
        assert row["verl_pg_clipfrac"] == pytest.approx(logged["pg_clipfrac"], abs=1e-6)
        assert row["verl_pg_clipfrac_lower"] == pytest.approx(logged["pg_clipfrac_lower"], abs=1e-6)
        assert row["verl_ppo_kl"] == pytest.approx(logged["ppo_kl"], abs=1e-6)


def test_engine_groups_split_across_ranks_are_marked(engine_run: Any) -> None:
    run, ranks = engine_run
    step = run.step(0)
    split = step["group_split"].bool()
    if len(ranks) == 1:
        # 6 of the rollout's 12 sequences per step: a group is split when a member is elsewhere
        counts = torch.bincount(step["group_id"].long())
        assert torch.equal(split, counts[step["group_id"].long()] < 3)
    else:
        assert bool(split.all())  # every group has members on both ranks


@pytest.mark.parametrize("world", [1, 2], ids=["1-rank", "2-ranks-torchrun"])
@pytest.mark.parametrize(("loss_mode", "spec"), MICRO_BATCH_MODES)
def test_engine_micro_batch_losses_replay_verls_loss(
    loss_mode: str, spec: str, world: int, engine_runs: EngineRuns
) -> None:
    """geo_mean and kl_cov on verl's real FSDP2 engine, dynamic batching cutting each rank's
    mini-batch into micro-batches of its own choosing: the recorded gmpo:mean=micro
    (kl-cov:cov=micro) replays verl's logged pg_loss of every step (on 2 ranks, the mean over
    ranks of each rank's sum of micro-batch losses), and replay's verl_pg_clipfrac(_lower)
    verl's logged ones where verl logs them (geo_mean)."""
    run, ranks = engine_runs(world, loss_mode)
    assert run.manifest["world_size"] == world
    assert run.step_numbers == [0, 1, 2, 3, 4]  # recorded, not refused, on every rank count
    assert run.policy_spec == spec
    result = replay_run(run, [spec], config=ReplayConfig(device="cpu"))
    (own,) = result.policies
    micro = set()
    for n, step in enumerate(run.steps(0, 4)):
        micro.add(int(step["micro_batch"].max()) + 1)
        logged = ranks[0]["steps"][n]
        assert -own.steps[n]["objective"] == pytest.approx(logged["pg_loss"], rel=1e-6, abs=1e-7)
        for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
            if name in logged:
                assert own.steps[n][f"verl_{name}"] == pytest.approx(logged[name], abs=1e-6)
    assert max(micro) > world


@pytest.mark.parametrize(("world", "settings", "spec"), ACTOR_SETTINGS)
def test_engine_actor_settings_replay_verls_logged_metrics(
    world: int, settings: dict[str, Any], spec: str, engine_runs: EngineRuns
) -> None:
    """Actor settings on verl's real FSDP2 engine (2 ppo epochs x 2 mini-batches, then a
    skipped update): one step per optimizer step, and the recorded policy replays verl's
    logged pg_loss (+ kl_loss_coef * kl_loss), pg_clipfrac(_lower), and the recorded ppo_kl
    is verl's, to 1e-6."""
    run, ranks = engine_runs(world, settings=settings)
    assert run.step_numbers == [0, 1, 2, 3, 4]
    assert run.policy_spec == spec
    (own,) = replay_run(run, [spec], config=ReplayConfig(device="cpu")).policies
    coef = float(settings.get("actor", {}).get("kl_loss_coef", 0.0))
    for n, step in enumerate(run.steps(0, 4)):
        logged, row = ranks[0]["steps"][n], own.steps[n]
        loss = logged["pg_loss"] + coef * logged.get("kl_loss", 0.0)
        assert -row["objective"] == pytest.approx(loss, abs=1e-6)
        assert step.scalars["update_skipped"] == 0
        for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
            assert row[f"verl_{name}"] == pytest.approx(logged[name], abs=1e-6)
        cells = [micro_batch_of(step, int(i)) for i in torch.unique(step["micro_batch"])]
        ppo_kl = [verl_ppo_kl(cell) for cell in cells]
        assert sum(ppo_kl) / len(ppo_kl) == pytest.approx(logged["ppo_kl"], abs=1e-6)
        assert step.scalars["actor/ppo_kl"] == logged["ppo_kl"]  # verl's, over every rank
    if "engine" in settings:  # a micro-batch per sequence
        assert int(run.step(0)["micro_batch"].max()) + 1 == run.step(0)["reward"].numel()
    assert run.step(4).scalars["update_skipped"] == 1


def test_engine_rollout_rejection_on_one_rank_is_the_runs(engine_launches: EngineJobs) -> None:
    """verl's rollout rejection sampling on its real FSDP2 engine over 2 ranks, token-mean,
    rank 1's part of the rollout rejected alone. Each rank mapped its own first step and
    rank 0's `dual-clip` was the run's: replay gave 0.3763 for verl's 0.3066 (step 1), no
    warning. The ranks now agree on agg=recorded, which replays verl's pg_loss."""
    job = engine_launches(2, "vanilla", REJECTED_ON_RANK_1)
    assert job.done.returncode == 0, job.done.stderr[-3000:]
    run, ranks = engine_result(job.directory, 2)
    assert "stabledrl:" not in job.stderr
    assert run.policy_spec == "dual-clip:agg=recorded"
    assert run.manifest["meta"]["rejected_tokens_from_step"] == 0
    assert run.step_numbers == [0, 1, 2, 3, 4]
    (own,) = replay_run(run, [run.policy_spec], config=ReplayConfig(device="cpu")).policies
    for n, logged in enumerate(ranks[0]["steps"][:4]):  # step 4: the NaN batch
        assert -own.steps[n]["objective"] == pytest.approx(logged["pg_loss"], abs=1e-6)


def test_engine_rollout_rejection_from_a_later_rollout_turns_the_runs_spec(
    engine_launches: EngineJobs,
) -> None:
    """verl's real FSDP2 engine on 1 rank, token-mean, rejections from the second rollout on:
    step 4 mapped to agg=recorded, not the run's `dual-clip`, and stopped the recording in
    one line, steps 4-8 of 9 lost. The run's spec now turns agg=recorded there (the manifest's
    meta.rejected_tokens_from_step 4, one warning line) and every step replays verl's
    pg_loss, the first 4 too."""
    job = engine_launches(1, "vanilla", REJECTED_LATER)
    assert job.done.returncode == 0, job.done.stderr[-3000:]
    run, ranks = engine_result(job.directory, 1)
    warned = [line for line in job.stderr.splitlines() if "stabledrl:" in line]
    assert len(warned) == 1 and "step 4 holds tokens" in warned[0], warned
    assert run.policy_spec == "dual-clip:agg=recorded"
    assert run.manifest["meta"]["rejected_tokens_from_step"] == 4
    assert "recording_stopped" not in run.manifest
    assert run.step_numbers == list(range(9))
    (own,) = replay_run(run, [run.policy_spec], config=ReplayConfig(device="cpu")).policies
    for n, logged in enumerate(ranks[0]["steps"][:8]):  # step 8: the NaN batch
        assert -own.steps[n]["objective"] == pytest.approx(logged["pg_loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("world", "settings"), [(1, {}), (2, {}), *((p.values[0], p.values[1]) for p in ACTOR_SETTINGS)]
)
def test_engine_steps_hold_verls_clip_frac_and_kl(
    world: int, settings: dict[str, Any], engine_runs: EngineRuns
) -> None:
    """A recorded verl step held verl's pg_clipfrac under verl's own name only, as rank 0's
    mean, and no kl: a baseline from verl's imported log gating `recorded.clip_frac` or
    `recorded.kl` tripped baseline.present. Each step now holds verl's own values of the
    optimizer step over every rank (what `train_mini_batch` returns for it) as `clip_frac` and,
    with use_kl_loss, `kl`: the names `stabledrl import` gives `actor/pg_clipfrac` and
    `actor/kl_loss`. Its `actor/pg_clipfrac`, `actor/pg_clipfrac_lower` and `actor/ppo_kl`,
    under the names verl's dashboard shows, were the rank's own mean (2 ranks: 0.303 where
    verl logged 0.259); they are now verl's numbers of the step too."""
    run, ranks = engine_runs(world, settings=settings)
    kl = bool(settings.get("actor", {}).get("use_kl_loss"))
    for n, step in enumerate(run.steps(0, 4)):
        logged = ranks[0]["steps"][n]
        assert step.scalars["clip_frac"] == logged["pg_clipfrac"]
        for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):  # verl's, under its names
            assert step.scalars[f"actor/{name}"] == logged[name], (n, name)
        assert ("kl" in step.scalars) == kl
        if kl:
            assert step.scalars["kl"] == logged["kl_loss"]
    for path in sorted((run.path / "steps").glob("step-0000000[0-3]*.safetensors")):
        with safe_open(path, "pt") as f:  # each rank's file: verl's number over every rank
            number = int(path.name.split(".")[0].split("-")[1])
            assert float(f.metadata()["clip_frac"]) == ranks[0]["steps"][number]["pg_clipfrac"]
            ppo_kl = float(f.metadata()["actor/ppo_kl"])
            assert ppo_kl == ranks[0]["steps"][number]["ppo_kl"]


@pytest.mark.parametrize(
    ("world", "settings"), [(1, {}), (2, {}), *((p.values[0], p.values[1]) for p in ACTOR_SETTINGS)]
)
def test_engine_steps_hold_verls_loss_terms_under_its_names(
    world: int, settings: dict[str, Any], engine_runs: EngineRuns
) -> None:
    """A recorded verl step held `loss` (verl's `actor/loss`, pg_loss + kl_coef * kl_loss) but
    none of the terms verl's dashboard plots beside it: no `actor/pg_loss`, `actor/kl_coef`
    nor `actor/entropy_loss`. Each now holds verl's own of the optimizer step over every rank,
    under verl's names, with verl's reduction, and a training step's mean of them is what
    verl's trainer logs for it; a term verl does not log is not recorded."""
    run, ranks = engine_runs(world, settings=settings)
    actor = settings.get("actor", {})
    steps = list(run.steps(0, 4))
    for n, step in enumerate(steps):
        logged = ranks[0]["steps"][n]
        assert step.scalars["actor/pg_loss"] == logged["pg_loss"]
        if "entropy_loss" in logged:
            assert step.scalars["actor/entropy_loss"] == logged["entropy_loss"]
        else:
            assert "actor/entropy_loss" not in step.scalars
        if actor.get("use_kl_loss"):
            assert step.scalars["actor/kl_coef"] == pytest.approx(actor["kl_loss_coef"])
            loss = logged["pg_loss"] + step.scalars["actor/kl_coef"] * step.scalars["kl"]
            assert step.scalars["loss"] == pytest.approx(loss, abs=1e-6)
        else:
            assert "actor/kl_coef" not in step.scalars
    for name in ("actor/pg_loss", "actor/kl_coef", "actor/entropy_loss"):
        trainer = ranks[0]["logged"][0]  # the rollout's 4 optimizer steps, as the trainer logs
        assert (name in trainer) == (name in steps[0].scalars), name
        if name in trainer:
            mean = sum(step.scalars[name] for step in steps) / len(steps)
            assert mean == pytest.approx(trainer[name], rel=1e-9), name
    for path in sorted((run.path / "steps").glob("step-0000000[0-3]*.safetensors")):
        with safe_open(path, "pt") as f:  # each rank's file: verl's number over every rank
            number = int(path.name.split(".")[0].split("-")[1])
            pg_loss = float(f.metadata()["actor/pg_loss"])
            assert pg_loss == ranks[0]["steps"][number]["pg_loss"]


def test_a_baseline_from_verls_log_gates_the_recorded_run(
    engine_runs: EngineRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's file log of the job (a line a training step: each actor metric the mean over
    its 2 ppo epochs x 2 mini-batches, as verl's trainer logs it), imported: the baseline it
    writes failed the recorded run, whose series were over optimizer steps (a token-mean
    job's clip_frac.max 0.722, the log's 0.577, over the limit 0.644; the test's statistics
    were over 5 steps, the log's 2). A verl run's series now take one value a training step, as
    verl logs them: the two runs' statistics are equal, and each run's baseline gates the
    other (the recorded run's replays and own-sample collapse figure, which a log cannot
    have, left out)."""
    run, ranks = engine_runs(1, settings={"actor": KL_LOSS})
    log = tmp_path / "verl.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    tracking = Tracking("project", "experiment", ["file"])
    for step, metrics in enumerate(ranks[0]["logged"], start=1):  # RayPPOTrainer.fit's steps
        tracking.log(data=metrics, step=step)
    tracking.logger["file"].finish()
    imported = tmp_path / "imported"
    assert CliRunner().invoke(app, ["import", str(log), "--out", str(imported)]).exit_code == 0
    series = [recorded_run(open_run(r), observe(open_run(r))).series for r in (run.path, imported)]
    for name in ("clip_frac", "kl", "grad_norm", "loss", "actor/pg_loss", "actor/ppo_kl"):
        mine, theirs = series[0][name], series[1][name]
        assert (mine.steps, mine.nonfinite) == (theirs.steps, theirs.nonfinite), name
        assert mine.steps == 2  # the rollout's 4 optimizer steps, then the NaN one's
        for stat in ("first", "last", "min", "max", "mean", "median", "tail"):
            assert mine.stat(stat) == pytest.approx(theirs.stat(stat), rel=1e-6), (name, stat)
    for source, other in ((imported, run.path), (run.path, imported)):
        baseline = tmp_path / f"{source.name}.json"
        written = CliRunner().invoke(app, ["check", str(source), "--write-baseline", str(baseline)])
        assert written.exit_code == 0, written.stderr
        figures = json.loads(baseline.read_text())
        figures["policies"] = {}
        figures["observed"] = {"nonfinite_steps": figures["observed"]["nonfinite_steps"]}
        if source == run.path:
            assert set(figures["recorded"]) >= {"clip_frac", "kl", "grad_norm"}
            figures["recorded"].pop("reward_mean")  # the log above has no score
        baseline.write_text(json.dumps(figures))
        gated = CliRunner().invoke(app, ["check", str(other), "-b", str(baseline)])
        assert gated.exit_code == 0, gated.stdout + gated.stderr


def test_verls_logged_lr_is_imported_as_the_lr_the_recorded_step_used(
    engine_runs: EngineRuns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl logs `actor/lr` after its scheduler stepped (`lr_scheduler_step()`'s return): the
    lr of the next training step's updates. Imported as logged, training step s carried the
    lr of step s + 1 (a warmup's 3.3e-4 at step 1, whose updates the integration recorded at
    0.0). A step's lr is the one its update used: the import now takes step s's from step
    s - 1's line, equal to the recorded steps of rollout s - 1, and the first has none."""
    run, ranks = engine_runs(1, settings=LR_WARMUP)
    logged = ranks[0]["logged"]
    log = tmp_path / "verl.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    tracking = Tracking("project", "experiment", ["file"])
    for step, metrics in enumerate(logged, start=1):  # RayPPOTrainer.fit's steps
        tracking.log(data=metrics, step=step)
    tracking.logger["file"].finish()
    imported_to = str(tmp_path / "imported")
    done = CliRunner().invoke(app, ["import", str(log), "--out", imported_to, "--format", "json"])
    assert done.exit_code == 0, done.stderr
    assert (
        "actor/lr logged at step s is the learning rate set after step s's update"
        in (json.loads(done.stdout)["warnings"][0])
    )
    imported = {step.step: step.scalars.get("lr") for step in open_run(tmp_path / "imported")}
    rollouts: dict[int, set[float]] = {}
    rollout = -1
    for step in run:  # the recorded optimizer steps, by rollout
        rollout += step.scalars["inner_step"] == 0
        rollouts.setdefault(rollout, set()).add(step.scalars["lr"])
    assert len(rollouts) == len(logged) == 4
    assert imported[1] is None
    for number, lrs in rollouts.items():
        assert lrs == {imported[number + 1]} if number else lrs == {0.0}
    assert len({imported[2], imported[3], imported[4]}) == 3  # the warmup moved it


def test_engine_entropy_bonus_is_refused_in_one_line_and_training_goes_on(
    engine_launches: EngineJobs,
) -> None:
    """entropy_coeff != 0 (verl's trainer then computes the entropy): one warning line naming
    the entropy bonus, no step recorded, and verl's 5 updates all run."""
    job = engine_launches(1, *REFUSED_JOB)
    assert job.done.returncode == 0, job.done.stderr[-3000:]
    warnings = [line for line in job.stderr.splitlines() if "stabledrl" in line]
    assert len(warnings) == 1, job.stderr[-3000:]
    assert "cannot record this verl run: the entropy bonus (entropy_coeff != 0)" in warnings[0]
    assert len(json.loads((job.directory / "result.json").read_text())["steps"]) == 5
    assert not list((job.directory / "run").glob("steps/*"))


def test_ray_worker_setup_hook_installs_the_recorder(tmp_path: Path) -> None:
    """`worker_process_setup_hook=stabledrl_cli.integrations.verl.install` runs install() in
    each Ray worker: the engine is hooked there, not in the driver."""
    script = Path(__file__).parent / "verl_scripts" / "ray_setup_hook.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["installed"] and seen["hooked"]
    assert seen["pid"] != seen["driver_pid"]


def test_a_run_directory_other_than_records_out_is_refused_in_one_line(tmp_path: Path) -> None:
    """Under `stabledrl record --out other`, install(out="mine") recorded into mine while the
    optimizer hooks stood down: record then found no step in other and said no
    optimizer.step() ran. install() refuses it before training, in one line."""
    script = (
        "from stabledrl_cli.integrations import verl\nverl.install(out='mine')\nprint('training')\n"
    )
    done, errors = record_python(script, cwd=tmp_path, env=cli_environment(), out="other")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "training" not in done.stdout
    assert errors == [
        "error: install(out=mine) is not the run directory of `stabledrl record --out` "
        f"($STABLEDRL_RUN_DIR), {tmp_path / 'other'}: call install() without out (it defaults "
        "to record's --out) or give both the same directory"
    ], done.stderr
    assert not (tmp_path / "mine").exists()


def test_records_out_given_again_as_out_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same directory, named another way (relative to the working directory), is no
    conflict: the steps go there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "run"))
    assert stabledrl_verl.install("run")
    try:
        train(actor_config())
    finally:
        stabledrl_verl.uninstall()
    assert open_run(tmp_path / "run").step_numbers == [0, 1]


def test_an_overwrite_that_is_not_true_or_false_is_refused_at_install(tmp_path: Path) -> None:
    """Before: install(overwrite="false") was taken for its truth value, and the workers'
    Recorder replaced the run at the first step."""
    with pytest.raises(UsageError) as refused:
        stabledrl_verl.install(tmp_path / "run", overwrite="false")
    assert str(refused.value) == "overwrite must be True or False, not str"
    assert not stabledrl_verl.installed() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("", "out is empty: name the run's directory"),
        (3, "out must be a str or a path object, not int"),
    ],
)
def test_an_out_that_names_no_directory_is_refused_at_install(out: object, message: str) -> None:
    """Before: install(out="") returned False, recording nothing and saying nothing, and
    install(out=3) raised TypeError from os.fspath."""
    with pytest.raises(UsageError) as refused:
        stabledrl_verl.install(out)  # type: ignore[arg-type]
    assert str(refused.value) == message
    assert not stabledrl_verl.installed()


def test_a_resumed_job_recorded_with_force_replaces_the_earlier_steps(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """What docs/frameworks.md says of a resumed verl job: each worker numbers its steps from 0, so
    recording it into the earlier run's directory is refused (one warning, training goes on),
    and with overwrite (`--force`) its steps replace the earlier ones, not continue them."""
    run_dir, _ = hooked
    train(actor_config(), grad_norm=0.7)
    stabledrl_verl.uninstall()
    assert stabledrl_verl.install(run_dir)
    train(actor_config(), grad_norm=0.3)  # the resumed job, without overwrite
    stabledrl_verl.uninstall()
    assert capsys.readouterr().err.count("stabledrl: warning:") == 1
    assert [s.scalars["grad_norm"] for s in open_run(run_dir)] == pytest.approx([0.7, 0.7])
    assert stabledrl_verl.install(run_dir, overwrite=True)
    train(actor_config(), grad_norm=0.3)  # with overwrite
    stabledrl_verl.uninstall()
    assert [s.scalars["grad_norm"] for s in open_run(run_dir)] == pytest.approx([0.3, 0.3])


def test_a_second_install_into_another_directory_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """install(out=A) then install(out=B) returned True and went on recording into A, B never
    created. The second call now raises UsageError naming both; the same directory (named
    another way) or no out is still a no-op returning True, and after uninstall() B is taken."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STABLEDRL_RUN_DIR", raising=False)
    assert stabledrl_verl.install(tmp_path / "A")
    try:
        message = f"install(out=B): this process already records into {tmp_path / 'A'}; call "
        with pytest.raises(UsageError) as refused:
            stabledrl_verl.install("B")
        assert str(refused.value) == (
            message + "uninstall() first to record into another directory"
        )
        assert stabledrl_verl.install("A") and stabledrl_verl.install()
        train(actor_config())
    finally:
        stabledrl_verl.uninstall()
    assert open_run(tmp_path / "A").step_numbers == [0, 1]
    assert not (tmp_path / "B").exists()
    assert stabledrl_verl.install("B")
    try:
        train(actor_config())
    finally:
        stabledrl_verl.uninstall()
    assert open_run(tmp_path / "B").step_numbers == [0, 1]


def test_an_unsupported_verl_under_record_warns_and_training_goes_on(tmp_path: Path) -> None:
    """The Ray setup hook (install() without out) in a worker whose verl is not 0.9.x: it
    raised UsageError, which Ray turns into a crashed worker (retried, then WorkerCrashedError
    in the driver, exit 1, tracebacks and no `error:` line). Now one warning, training goes
    on, and record exits 2 with the reason."""
    fake = tmp_path / "site" / "verl-0.10.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: verl\nVersion: 0.10.0\n")
    env = cli_environment()
    env["PYTHONPATH"] = f"{fake.parent}{os.pathsep}{env['PYTHONPATH']}"
    script = "from stabledrl_cli.integrations import verl\nverl.install()\nprint('training')\n"
    done, errors = record_python(script, "--no-optimizer-hooks", cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and done.stdout.strip() == "training"
    reason = "the verl integration supports verl 0.9.x; found verl 0.10.0"
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"stabledrl: warning: cannot record this process: {reason}; recording is off, "
        "training continues"
    ], done.stderr
    assert len(errors) == 1 and reason in errors[0] and errors[0].startswith("error:"), done.stderr


class StubEngine(BaseEngine):  # type: ignore[misc]
    """Just enough of a verl engine for the hook: verl's own BaseEngine.train_batch drives it;
    each micro-batch goes through the loss function it is given; the norm is fixed."""

    def __init__(self, grad_norm: float = 0.7, logp_dtype: torch.dtype = torch.float32) -> None:
        self.grad_norm = grad_norm
        self.logp_dtype = logp_dtype
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-5}])
        self.optimizer_config = SimpleNamespace(clip_grad=1.0)

    def optimizer_zero_grad(self) -> None:
        return None

    def forward_backward_batch(
        self, data: TensorDict, loss_function: Any, forward_only: bool = False
    ) -> dict[str, Any]:
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(data["loss_mask"].sum()))
        tu.assign_non_tensor(data, use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
        for micro in prepare_micro_batches(data)[0]:
            output = {"log_probs": model_output(micro)["log_probs"].to(self.logp_dtype)}
            loss_function(model_output=output, data=micro, dp_group=None)
        return {"metrics": {}}

    def optimizer_step(self) -> float:
        return self.grad_norm

    def is_mp_src_rank_with_outputs(self) -> bool:
        return True

    def get_data_parallel_size(self) -> int:
        return 1

    def get_data_parallel_rank(self) -> int:
        return 0


@pytest.fixture
def hooked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """install() on a fresh run directory; the status file `stabledrl record` would read."""
    status = tmp_path / "status"
    monkeypatch.setenv("STABLEDRL_STATUS_FILE", str(status))
    assert stabledrl_verl.install(tmp_path / "run")
    yield tmp_path / "run", status
    stabledrl_verl.uninstall()


def train(
    config: ActorConfig,
    loss: Any = None,
    grad_norm: float = 0.7,
    unscored: list[int] | None = None,
    logp_dtype: torch.dtype = torch.float32,
    nested: bool = False,
    without_uid: bool = False,
    rejected: list[tuple[int, int]] | None = None,
    **rollout_kw: Any,
) -> Any:
    """Two optimizer steps of the stub engine with verl's ppo_loss (or `loss`), over rows 0-5
    and 6-11 of the rollout; the rows in `unscored` have an all-zero response mask; the
    (row, token) pairs in `rejected` are zeroed in response_mask alone, as verl's v1 trainer's
    rollout rejection sampling zeroes them (its loss_mask kept as generated); the model's
    log-probs come out in `logp_dtype`; `nested`: the responses come nested
    (`nested_responses`); `without_uid`: the batch has no `uid`."""
    engine = StubEngine(grad_norm, logp_dtype)
    loss = loss or functools.partial(ppo_loss, config=config)
    data = rollout(**rollout_kw)
    if without_uid:
        data = data.exclude("uid")
    for key in ("response_mask", "loss_mask"):
        data[key][unscored or []] = 0
    if rejected:
        data["response_mask"] = data["response_mask"].clone()
        for row, token in rejected:
            data["response_mask"][row, token] = 0
    if nested:
        data = nested_responses(data)
    outputs = []
    for mb in tu.make_iterator(data, mini_batch_size=6, epochs=1, seed=0):
        tu.assign_non_tensor(mb, global_batch_size=6)
        outputs.append(engine.train_batch(mb, loss_function=loss))
    return outputs


def test_hook_records_each_train_batch(hooked: Any) -> None:
    run_dir, status = hooked
    outputs = train(actor_config())
    assert [o["metrics"]["grad_norm"] for o in outputs] == [0.7, 0.7]
    stabledrl_verl.uninstall()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1]
    assert run.step(1).scalars["grad_norm"] == pytest.approx(0.7)
    assert run.step(1).scalars["lr"] == pytest.approx(1e-5)
    assert not status.exists()


def test_an_infinite_score_gives_verls_score_mean_and_its_weight(hooked: Any) -> None:
    """verl logs `critic/score/mean` as the plain mean of the sequence scores: an infinite
    one makes it inf. The capture took the mean of the finite scores alone while
    `_scored_rewards`, its weight in a multi-rank join, counted the infinite one too."""
    run_dir, _ = hooked
    train(actor_config(), infinite=3)
    stabledrl_verl.uninstall()
    steps = list(open_run(run_dir))
    assert any(bool(torch.isinf(s["reward"]).any()) for s in steps)
    for step in steps:  # verl's metric_utils: token_level_scores.sum(-1), then torch.mean
        assert step.scalars["reward_mean"] == float(torch.mean(step["reward"].double()))


def test_the_observed_reward_of_a_rollout_is_verls_score_mean(hooked: Any) -> None:
    """A rollout trained as two mini-batches (steps 0 and 1, inner_step 0 and 1): verl logs
    `critic/score/mean` over the whole rollout. The observed-collapse rule read step 0's
    mini-batch alone; it now reads the rollout's mean, verl's number."""
    run_dir, _ = hooked
    train(actor_config())
    stabledrl_verl.uninstall()
    data = rollout()
    shown = ("prompts", "responses", "attention_mask", "response_mask", "token_level_scores")
    batch = DataProto.from_dict(
        tensors={
            **{key: data[key] for key in shown},
            "token_level_rewards": data["token_level_scores"],
            "advantages": data["advantages"],
            "returns": data["advantages"],
        }
    )
    logged = compute_data_metrics(batch, use_critic=False)["critic/score/mean"]
    run = open_run(run_dir)
    series = run.scalar_series_many(["reward_mean", "inner_step"])
    steps, rewards = reward_draws(*series["reward_mean"], *series["inner_step"])
    assert steps.tolist() == [0]
    assert rewards.tolist() == pytest.approx([logged], rel=1e-6)
    assert run.step(0).scalars["reward_mean"] != pytest.approx(logged)  # half the rollout


def test_the_manifest_records_rollout_n_as_num_generations(hooked: Any) -> None:
    """meta.num_generations (rollout.n) tells a multi-rank join when a group the ranks share
    is whole, so it clears the group's group_split (docs/run-format.md)."""
    run_dir, _ = hooked
    train(actor_config())
    stabledrl_verl.uninstall()
    run = open_run(run_dir)
    assert run.manifest["meta"]["num_generations"] == 3
    assert run.group_size == 3


@pytest.mark.parametrize("factor", [4.5, 9, None])
def test_geo_mean_records_the_loss_scale_factor_verl_used(hooked: Any, factor: Any) -> None:
    """verl's GMPO term ignores loss_scale_factor, which only its KL-free loss_agg_mode
    normaliser (the recorded `loss_scale`) holds: any factor is recorded, named in the
    manifest, and the gmpo replay reproduces verl's loss."""
    run_dir, _ = hooked
    config = actor_config(
        loss_mode="geo_mean", loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=factor
    )
    train(config)
    stabledrl_verl.uninstall()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1]
    assert run.manifest["meta"]["loss_scale_factor"] == factor
    own = get_policy(run.policy_spec or "")
    horizon = factor if factor is not None else RESPONSE
    for step in run:  # the loss: the sum of verl's losses of the step's micro-batches
        assert torch.equal(step["loss_scale"], torch.full_like(step["loss_scale"], 6 * horizon))
        objective = float(own.weights(policy_batch(step)).objective)
        assert objective == pytest.approx(-step.scalars["loss"], abs=1e-6)


def test_refused_config_warns_once_and_training_goes_on(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, status = hooked
    outputs = train(actor_config(entropy_coeff=0.01))
    assert len(outputs) == 2  # training went on
    err = capsys.readouterr().err
    assert err.count("stabledrl: warning:") == 1
    assert "cannot record this verl run: the entropy bonus" in err
    assert status.read_text().startswith("2\t")
    assert not list((run_dir / "steps").glob("*.safetensors"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_mode": mode}
        for mode in ("vanilla", "gspo", "sapo", "cispo", "gpg", "dppo_tv", "dppo_kl", "geo_mean")
    ]
    + [
        {"loss_mode": "kl_cov", "policy_loss": {"kl_cov_ratio": 0.2}},
        {"use_kl_loss": True, "kl_loss_coef": 0.1, "loss_agg_mode": "seq-mean-token-sum-norm"},
    ],
    ids=lambda overrides: "-".join(str(v) for v in overrides.values() if not isinstance(v, dict)),
)
@pytest.mark.parametrize("logp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_loss_mode_with_half_precision_log_probs_replays_verls_numbers(
    hooked: Any, overrides: dict[str, Any], logp_dtype: torch.dtype
) -> None:
    """The model's log-probs in bfloat16 or float16 (rollouts 10, 17 and 39, whose rounding
    moves kl_cov's selection and dppo's trust region): the recorded policy replays verl's
    loss, pg_clipfrac(_lower) and ppo_kl of every step."""
    run_dir, _ = hooked
    stabledrl_verl.uninstall()
    for seed in (10, 17, 39):
        assert stabledrl_verl.install(run_dir / str(seed))
        train(actor_config(**overrides), logp_dtype=logp_dtype, seed=seed)
        stabledrl_verl.uninstall()
        run = open_run(run_dir / str(seed))
        spec = run.policy_spec or ""
        (own,) = replay_run(run, [spec], config=ReplayConfig(device="cpu")).policies
        for step in run:
            row = own.steps[step.step]
            assert -row["objective"] == pytest.approx(step.scalars["loss"], abs=2e-6)
            for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
                if f"actor/{name}" in step.scalars:
                    logged = step.scalars[f"actor/{name}"]
                    assert row[f"verl_{name}"] == pytest.approx(logged, abs=2e-6)


def test_a_grad_norm_the_hook_cannot_read_leaves_training_alone(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An engine whose optimizer_step() returns what float() cannot take (None): verl's
    train_batch goes on and gets it back, recording stops with one warning."""
    run_dir, status = hooked
    outputs = train(actor_config(), grad_norm=None)  # type: ignore[arg-type]
    assert [o["metrics"]["grad_norm"] for o in outputs] == [None, None]
    stabledrl_verl.uninstall()
    err = capsys.readouterr().err
    assert err.count("stabledrl: warning:") == 1 and "grad norm" in err
    assert status.exists()
    assert not (run_dir / "steps").exists() or not list((run_dir / "steps").iterdir())


@pytest.mark.parametrize(
    ("overrides", "spec"),
    [
        ({"loss_mode": "geo_mean"}, "gmpo:eps_high=0.2,eps_low=0.2,mean=micro"),
        (
            {"loss_mode": "kl_cov", "policy_loss": {"kl_cov_ratio": 0.2}},
            "kl-cov:cov=micro,ratio=0.2",
        ),
    ],
    ids=["geo-mean", "kl-cov"],
)
def test_hook_records_steps_of_several_micro_batches_and_replays_them(
    hooked: Any, overrides: dict[str, Any], spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """geo_mean (gmpo:mean=micro) and kl_cov (kl-cov:cov=micro) steps of 3 micro-batches
    record, and replay gives verl's loss of each."""
    run_dir, status = hooked
    train(actor_config(**overrides))
    stabledrl_verl.uninstall()
    assert "stabledrl:" not in capsys.readouterr().err and not status.exists()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1]
    assert run.policy_spec == spec
    assert int(run.step(0)["micro_batch"].max()) == 2
    (own,) = replay_run(run, [spec], config=ReplayConfig(device="cpu")).policies
    for step in run:
        assert -own.steps[step.step]["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)


def trained_replay(
    hooked: Any,
    capsys: pytest.CaptureFixture[str],
    config: ActorConfig,
    spec: str,
    **train_kw: Any,
) -> tuple[Any, Any]:
    """(the run, its replay by `spec`) of `train(config, **train_kw)` under the hook, which
    recorded it without a warning as `spec`."""
    run_dir, status = hooked
    train(config, **train_kw)
    stabledrl_verl.uninstall()
    assert "stabledrl:" not in capsys.readouterr().err and not status.exists()
    run = open_run(run_dir)
    assert run.policy_spec == spec
    (own,) = replay_run(run, [spec], config=ReplayConfig(device="cpu")).policies
    return run, own


@pytest.mark.parametrize(
    ("logp_dtype", "spec"),
    [
        (torch.bfloat16, "kl-cov:cov=micro,logp_dtype=bfloat16,ratio=0.2"),
        (torch.float16, "kl-cov:cov=micro,logp_dtype=float16,ratio=0.2"),
        (torch.float32, "kl-cov:cov=micro,ratio=0.2"),
    ],
    ids=["bfloat16", "float16", "float32"],
)
def test_kl_cov_with_half_precision_log_probs_replays_verls_loss(
    hooked: Any, logp_dtype: torch.dtype, spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """From bfloat16 logits without flash-attn's cross-entropy (this CPU engine) the model's
    log-probs are bfloat16, and verl's kl_cov centres
    them for its covariance in that dtype: rounding there reorders near-equal covariances, so
    a replay ranking them in float32 penalises other tokens (rollout seed 17, step 1: 1.6e-3
    off verl's loss). The run records the dtype in its spec and the replay gives verl's loss."""
    config = actor_config(loss_mode="kl_cov", policy_loss={"kl_cov_ratio": 0.2})
    run, own = trained_replay(hooked, capsys, config, spec, logp_dtype=logp_dtype, seed=17)
    for step in run:
        assert -own.steps[step.step]["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "seed", "spec"),
    [
        ({"loss_mode": "dppo_tv"}, 10, "dppo:logp_dtype=bfloat16"),
        (
            {"loss_mode": "dppo_kl", "clip_ratio_low": 0.05, "clip_ratio_high": 0.05},
            39,
            "dppo:delta_high=0.05,delta_low=0.05,divergence=kl,logp_dtype=bfloat16",
        ),
    ],
    ids=["dppo-tv", "dppo-kl"],
)
def test_dppo_with_bfloat16_log_probs_replays_verls_loss_and_clip_fraction(
    hooked: Any,
    overrides: dict[str, Any],
    seed: int,
    spec: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """verl's dppo takes p = exp(log_prob) in the log-probs' own dtype (bfloat16 from bfloat16
    logits without flash-attn's cross-entropy): its rounding moves tokens across the trust
    region's bound, so a replay taking p
    in float32 kept other tokens (rollout seed 10, dppo_tv: 3.7e-2 off verl's loss, 2.6e-2
    off its pg_clipfrac). The run records the dtype in its spec and the replay gives verl's
    loss and pg_clipfrac."""
    config = actor_config(**overrides)
    run, own = trained_replay(hooked, capsys, config, spec, logp_dtype=torch.bfloat16, seed=seed)
    for step in run:
        row = own.steps[step.step]
        assert -row["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)
        for name in ("pg_clipfrac", "pg_clipfrac_lower"):
            assert row[f"verl_{name}"] == pytest.approx(step.scalars[f"actor/{name}"], abs=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [{"loss_agg_mode": "seq-mean-token-mean"}, {"loss_mode": "geo_mean"}],
    ids=["vanilla", "geo-mean"],
)
def test_steps_and_micro_batches_without_a_scored_token_are_recorded_and_replayed(
    hooked: Any, overrides: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A mini-batch whose every response mask is zero (step 0) and a micro-batch of one
    (rows 6-7 of step 1): training goes on, both steps are recorded, and replay keeps them
    with verl's loss."""
    run_dir, status = hooked
    config = actor_config(**overrides)
    assert len(train(config, unscored=[0, 1, 2, 3, 4, 5, 6, 7])) == 2
    stabledrl_verl.uninstall()
    assert "stabledrl:" not in capsys.readouterr().err and not status.exists()
    run = open_run(run_dir)
    steps = list(run)
    assert len(steps) == 2 and int(steps[0]["mask"].sum()) == 0
    scored = torch.zeros(6).index_add_(0, steps[1]["seq_id"].long(), steps[1]["mask"].float())
    assert scored[:2].sum() == 0 and bool((scored[2:] > 0).all())
    result = replay_run(run, [run.policy_spec or ""], config=ReplayConfig(device="cpu"))
    assert result.skipped == []
    (own,) = result.policies
    for step in steps:
        assert -own.steps[step.step]["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "rejected", "spec"),
    [
        ({}, [(0, 1), (8, 0)], "dual-clip:agg=recorded"),
        ({}, [(0, 1), (2, 0), (2, 1)], "dual-clip:agg=recorded"),  # the second step rejects none
        (
            {"use_kl_loss": True, "kl_loss_coef": 0.1},
            [(0, 1), (8, 0)],
            "dual-clip:agg=recorded,beta=0.1,kl_max=10,kl_weight=none",
        ),
        (
            {"loss_agg_mode": "seq-mean-token-mean"},
            [(0, 1), (8, 0)],
            "dual-clip:agg=seq-mean-token-mean,rows=all",
        ),
    ],
    ids=["token-mean", "token-mean-first-step-only", "token-mean-kl", "seq-mean-token-mean"],
)
def test_rollout_rejection_of_verls_v1_trainer_replays_verls_loss(
    hooked: Any,
    overrides: dict[str, Any],
    rejected: list[tuple[int, int]],
    spec: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """verl's v1 trainer applies rollout rejection sampling to response_mask alone: token-mean
    divides by the engine's loss_mask count, rejected tokens in it. The token-mean run was
    recorded as `dual-clip`, whose count leaves them out: 0.3578 where verl's loss was 0.3435
    (step 0; 0.6863 for 0.4941 with 3 of its 6 sequences rejected whole). It now records
    verl's normaliser (agg=recorded); sequence means, which count response_mask's tokens and
    global_batch_size's sequences, keep their spec."""
    config = actor_config(**overrides)
    run, own = trained_replay(hooked, capsys, config, spec, rejected=rejected, scale=0.9)
    first = 0 if "agg=recorded" in spec else None
    assert run.manifest["meta"].get("rejected_tokens_from_step") == first
    for step in run:
        row = own.steps[step.step]
        assert -row["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)
        for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
            assert row[f"verl_{name}"] == pytest.approx(step.scalars[f"actor/{name}"], abs=1e-6)


def test_a_token_mean_run_whose_rejections_begin_after_its_first_step_records_every_step(
    hooked: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spec is mapped at the first step: a token-mean run whose first step rejected no
    token was `dual-clip`, and a later step that rejected some stopped the recording in one
    line (step 1 of 2 lost). The run's spec now turns agg=recorded at that step, said in one
    line and in the manifest's meta, and it replays verl's loss of every step. The policy and
    its meta.rejected_tokens_from_step are one rewrite of the manifest: they were two, and a
    reader between them (a watch, which reads the run again from its start at each change of
    its manifest: 4.3 s for 2,000 steps) saw the new policy without the step it applies
    from."""
    run_dir, status = hooked
    written = []
    write = _manifest_edits._write_manifest

    def kept(path: Path, text: bytes) -> None:
        write(path, text)
        written.append(json.loads(text))

    monkeypatch.setattr(_manifest_edits, "_write_manifest", kept)
    assert len(train(actor_config(), rejected=[(8, 0)])) == 2
    turned = [m["meta"].get("rejected_tokens_from_step") for m in written
              if m["policy"]["spec"] == "dual-clip:agg=recorded"]  # fmt: skip
    assert turned[:1] == [1] and len(written) == 2, written  # the new run's, the turn's
    stabledrl_verl.uninstall()
    err = capsys.readouterr().err
    assert err.count("stabledrl:") == 1, err
    assert "step 1 holds tokens verl's rollout rejection sampling left in" in err
    assert "the run's spec is now dual-clip:agg=recorded, not dual-clip" in err
    assert not status.exists()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1] and run.policy_spec == "dual-clip:agg=recorded"
    assert run.manifest["meta"]["rejected_tokens_from_step"] == 1
    assert "recording_stopped" not in run.manifest
    (own,) = replay_run(run, [run.policy_spec], config=ReplayConfig(device="cpu")).policies
    for step in run:
        assert -own.steps[step.step]["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)


class LosslessEngine(StubEngine):
    """A stub engine whose micro-batches never reach the loss function (verl's distillation
    loss needs a teacher's top-k log-probs the stub rollout has not)."""

    def forward_backward_batch(
        self, data: TensorDict, loss_function: Any, forward_only: bool = False
    ) -> dict[str, Any]:
        return {"metrics": {}}


def test_distillation_loss_is_refused_in_one_line_and_training_goes_on(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """With `distillation.enabled` the actor trains on verl's `distillation_ppo_loss`, which
    the catalogue cannot express: one warning naming it (and `stabledrl record` is told), no
    step recorded, and every update runs. It passed through unreported: `stabledrl record`
    then said no optimizer step had run at all."""
    from verl.trainer.distillation.losses import distillation_ppo_loss

    run_dir, status = hooked
    config = actor_config()
    loss = functools.partial(distillation_ppo_loss, config=config, distillation_config=None)
    engine = LosslessEngine()
    data = rollout()
    outputs = []
    for mb in tu.make_iterator(data, mini_batch_size=6, epochs=1, seed=0):
        tu.assign_non_tensor(mb, global_batch_size=6)
        outputs.append(engine.train_batch(mb, loss_function=loss))
    assert [o["metrics"]["grad_norm"] for o in outputs] == [0.7, 0.7]
    stabledrl_verl.uninstall()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    assert len(warnings) == 1
    assert "cannot record this verl run: on-policy distillation" in warnings[0]
    assert status.read_text().startswith("2\t")
    assert not (run_dir / "steps").exists() or not list((run_dir / "steps").iterdir())


def test_other_losses_pass_through(hooked: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Any other loss function: not recorded, not touched, said once; recording stays on
    (an actor's ppo_loss in the same process is recorded)."""
    calls = []

    def other_loss(model_output: Any, data: TensorDict, dp_group: Any = None) -> Any:
        calls.append(data.shape[0])
        return torch.tensor(0.0), {}

    run_dir, status = hooked
    train(actor_config(), loss=other_loss)
    assert calls == [2, 2, 2, 2, 2, 2]
    assert not (run_dir / "steps").exists() or not list((run_dir / "steps").iterdir())
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    name = f"{__name__}.test_other_losses_pass_through.<locals>.other_loss"
    assert warnings == [
        f"stabledrl: warning: verl's engine trains with the loss {name}, which is not "
        "recorded (verl's ppo_loss is): its steps are not in the run"
    ]
    assert not status.exists()
    train(actor_config())
    stabledrl_verl.uninstall()
    assert open_run(run_dir).step_numbers == [0, 1]


@pytest.mark.parametrize("name", ["value_loss", "sft_loss"])
def test_verls_critic_and_sft_losses_pass_through_unsaid(
    hooked: Any, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from verl.workers.utils import losses

    loss = functools.partial(getattr(losses, name), config=None)
    engine = LosslessEngine()
    for mb in tu.make_iterator(rollout(), mini_batch_size=6, epochs=1, seed=0):
        tu.assign_non_tensor(mb, global_batch_size=6)
        engine.train_batch(mb, loss_function=loss)
    assert "stabledrl" not in capsys.readouterr().err


def test_a_batch_without_uids_records_no_groups(hooked: Any) -> None:
    """A loop of one's own whose batch has no `uid`: every sequence was recorded as one
    prompt group, not split, so `replay -p grpo:adv=center` recomputed advantages over the
    whole step and said nothing. The groups are unknown, so none is recorded: that replay is
    refused in one line (exit 3), and the one that keeps the advantages runs."""
    run_dir, _ = hooked
    train(actor_config(), without_uid=True)
    stabledrl_verl.uninstall()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1]
    assert "group_id" not in run.step(0).fields and "group_split" not in run.step(0).fields
    refused = CliRunner().invoke(app, ["replay", str(run_dir), "-p", "grpo:adv=center"])
    assert refused.exit_code == 3, refused.output
    said = "step 0 has no 'group_id', which policy 'grpo:adv=center' needs"
    assert refused.stderr.strip().splitlines() == [f"error: {run_dir}: {said}"]
    assert CliRunner().invoke(app, ["replay", str(run_dir), "-p", "grpo"]).exit_code == 0


@pytest.mark.parametrize("mode", ["my_clip", "vanilla"], ids=["own-name", "over-vanilla"])
def test_a_policy_loss_of_a_users_own_records_no_policy_said_in_the_run(
    hooked: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A policy loss the user registers as a plain function (`register_policy_loss(mode)`,
    under a name of its own or over verl's vanilla) was refused with a warning: the job
    trained and left no run. Its steps are now recorded with no policy, the manifest's
    meta.policy_unidentified (which inspect shows) naming the function, said in one
    warning: no catalogue policy is replayed as the run's own, and the recorded batches
    replay under a policy asked for."""

    def my_clip(**kwargs: Any) -> Any:
        return core_algos.compute_policy_loss_vanilla(**kwargs)

    monkeypatch.setitem(core_algos.POLICY_LOSS_REGISTRY, mode, my_clip)
    run_dir, status = hooked
    train(actor_config(loss_mode=mode))
    stabledrl_verl.uninstall()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    name = f"{__name__}.test_a_policy_loss_of_a_users_own_records_no_policy_said_in_the_run"
    said = f"loss_mode {mode!r} is registered to {name}.<locals>.my_clip"
    assert len(warnings) == 1 and said in warnings[0], warnings
    assert not status.exists()
    run = open_run(run_dir)
    assert run.step_numbers == [0, 1] and run.policy_spec is None
    assert said in run.manifest["meta"]["policy_unidentified"]
    shown = CliRunner().invoke(app, ["inspect", str(run_dir)], env={"COLUMNS": "400"})
    assert "meta.policy_unidentified" in shown.output and "my_clip" in shown.output
    (replayed,) = replay_run(run, ["dual-clip"], config=ReplayConfig(device="cpu")).policies
    assert len(replayed.steps) == 2


def test_an_actor_loss_of_its_own_is_refused_in_one_line(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe's own actor loss (set_loss_fn with functools.partial(loss, config=the actor's
    config), as verl's trainer gives its ppo_loss) passed through unrecorded and unsaid, and
    `stabledrl record` then ended with 'no torch optimizer.step() ran' after two steps had
    trained. It is refused as distillation is: one warning naming it, record told."""

    def recipe_loss(config: ActorConfig, model_output: Any, data: TensorDict, dp_group: Any = None):
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
        return 2 * loss, metrics

    run_dir, status = hooked
    train(actor_config(), loss=functools.partial(recipe_loss, config=actor_config()))
    stabledrl_verl.uninstall()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    said = (
        "cannot record this verl run: the actor trains with the loss "
        f"{__name__}.test_an_actor_loss_of_its_own_is_refused_in_one_line.<locals>.recipe_loss, "
        "not verl's ppo_loss"
    )
    assert len(warnings) == 1 and said in warnings[0], warnings
    assert status.read_text().startswith("2\t") and said in status.read_text()
    assert not (run_dir / "steps").exists() or not list((run_dir / "steps").iterdir())


@pytest.mark.parametrize(
    ("overrides", "spec"),
    [
        ({}, "dual-clip:agg=recorded"),
        (
            {"loss_mode": "gspo", "use_kl_loss": True, "kl_loss_coef": 0.1},
            "gspo:agg=recorded,beta=0.1,eps_high=0.2,eps_low=0.2,form=token,kl_max=10,"
            "kl_weight=none,log_ratio_max=10",
        ),
    ],
    ids=["vanilla", "gspo-kl"],
)
def test_nested_responses_replay_verls_horizon_of_each_micro_batch(
    hooked: Any, overrides: dict[str, Any], spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """seq-mean-token-sum-norm without loss_scale_factor over nested responses (verl's
    trainer.use_v1): verl divides each micro-batch by its own padded width (here 7 or 5), which
    no max_len expresses, so the run records agg=recorded (verl's normaliser, kept per token)
    and replay gives verl's loss of every step; the first micro-batch's width as max_len does
    not."""
    run_dir, status = hooked
    train(actor_config(loss_agg_mode="seq-mean-token-sum-norm", **overrides), nested=True)
    stabledrl_verl.uninstall()
    assert "stabledrl:" not in capsys.readouterr().err and not status.exists()
    run = open_run(run_dir)
    assert run.policy_spec == spec
    first_width = spec.replace("agg=recorded", "agg=seq-mean-token-sum-norm,max_len=7,rows=all")
    (own, fixed) = replay_run(run, [spec, first_width], config=ReplayConfig(device="cpu")).policies
    off = 0.0
    for step in run:
        assert -own.steps[step.step]["objective"] == pytest.approx(step.scalars["loss"], abs=1e-6)
        off = max(off, abs(fixed.steps[step.step]["objective"] + step.scalars["loss"]))
    assert off > 1e-3


def widened(td: TensorDict, extra: int) -> TensorDict:
    """A `rollout`'s rows with their responses padded by `extra` more positions (none scored),
    as a loop padding each batch to its own width hands them over."""
    for key in (*RESPONSE_FIELDS, "_logp", "attention_mask"):
        td[key] = torch.nn.functional.pad(td[key], (0, extra))
    tu.assign_non_tensor(td, max_response_len=td["response_mask"].shape[-1])
    return td


def train_then_widen(config: ActorConfig) -> None:
    """Two optimizer steps of the stub engine with verl's ppo_loss: rows 0-5 of the rollout
    padded as it pads them (7 positions), then rows 6-11 padded to 9."""
    loss = functools.partial(ppo_loss, config=config)
    data = rollout()
    engine = StubEngine()
    for rows, extra in ((range(6), 0), (range(6, 12), 2)):
        batch = widened(tu.index_select_tensor_dict(data, torch.tensor(list(rows))), extra)
        tu.assign_non_tensor(batch, global_batch_size=6)
        assert engine.train_batch(batch, loss_function=loss)["metrics"]["grad_norm"] == 0.7


def test_a_step_padded_to_another_width_stops_the_recording_in_one_line(
    hooked: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """seq-mean-token-sum-norm without loss_scale_factor divides by the padded response width,
    which the run's spec holds as max_len from its first step (7): a later step padded to 9
    was recorded all the same, its replay 7/9 of the loss verl trained on. That step now
    stops the recording with one warning naming both specs; step 0 stays, training goes on."""
    run_dir, status = hooked
    train_then_widen(actor_config(loss_agg_mode="seq-mean-token-sum-norm"))
    stabledrl_verl.uninstall()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    assert warnings == [
        "stabledrl: warning: recording step 1: cannot record this verl run: the step maps to "
        "dual-clip:agg=seq-mean-token-sum-norm,max_len=9,rows=all, not the run's "
        "dual-clip:agg=seq-mean-token-sum-norm,max_len=7,rows=all: its padded response "
        "width or log-prob dtype changed (a fixed loss_scale_factor keeps "
        "seq-mean-token-sum-norm's horizon); recording is off, training continues"
    ]
    assert status.read_text().startswith("2\t")
    run = open_run(run_dir)
    assert run.step_numbers == [0]
    (own,) = replay_run(run, [run.policy_spec or ""], config=ReplayConfig(device="cpu")).policies
    assert -own.steps[0]["objective"] == pytest.approx(run.step(0).scalars["loss"], abs=1e-6)


@pytest.mark.parametrize("declared", ["argument", "environment"])
def test_a_declared_reward_range_is_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, declared: str
) -> None:
    """verl runs could declare no reward range (Ray calls the setup hook with no argument), so
    each run's collapse floor was its own lowest reward (docs/collapse.md). install() takes
    reward_range=(low, high), and the setup hook reads $STABLEDRL_REWARD_RANGE=LOW,HIGH."""
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "run"))
    if declared == "argument":
        assert stabledrl_verl.install(tmp_path / "run", reward_range=(0, 1))
    else:
        monkeypatch.setenv("STABLEDRL_REWARD_RANGE", "0,1")
        assert stabledrl_verl.install()
    train(actor_config())
    stabledrl_verl.uninstall()
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1]
    assert run.reward_range == (0.0, 1.0)


def test_a_bad_reward_range_is_refused_at_install_and_warned_by_the_setup_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad range given as the argument, or in $STABLEDRL_REWARD_RANGE with an `out`, is a
    UsageError at install; the setup hook (no `out`) warns once and training goes on
    unrecorded, as for a verl it cannot record (raising would crash every Ray worker)."""
    with pytest.raises(UsageError) as refused:
        stabledrl_verl.install(tmp_path / "run", reward_range=(1, 0))
    assert str(refused.value) == "reward_range must be (low, high), finite, low < high; got (1, 0)"
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("STABLEDRL_REWARD_RANGE", "0..1")
    reason = "$STABLEDRL_REWARD_RANGE '0..1': give LOW,HIGH, two finite numbers with LOW < HIGH"
    with pytest.raises(UsageError, match=re.escape(reason)):
        stabledrl_verl.install(tmp_path / "run")
    assert not stabledrl_verl.install()
    assert not stabledrl_verl.installed() and not (tmp_path / "run").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    assert warnings == [
        f"stabledrl: warning: cannot record this process: {reason} (0,1 for a success rate); "
        "recording is off, training continues"
    ]


def test_a_recording_the_hook_stops_is_noted_in_the_run(hooked: Any) -> None:
    """The hook stopped recording at step 1 (a step it cannot record) while training went on,
    and the run said nothing of it: inspect read 'closed: its Recorder finished', a run that
    looks whole. The stop is now the manifest's recording_stopped, as a failed write's is."""
    run_dir, _ = hooked
    train_then_widen(actor_config(loss_agg_mode="seq-mean-token-sum-norm"))
    stabledrl_verl.uninstall()
    run = open_run(run_dir)
    assert run.step_numbers == [0]
    note = run.manifest["recording_stopped"]
    assert (note["step"], note["rank"]) == (1, 0)
    assert note["reason"].startswith("recording step 1: cannot record this verl run: the step ")
    shown = CliRunner().invoke(app, ["inspect", str(run_dir)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    stopped = "stopped at step 1 (rank 0): recording step 1: cannot record this verl run"
    assert stopped in shown.stdout


def test_stabledrl_force_false_keeps_an_existing_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """$STABLEDRL_FORCE=false read as true (any text but empty or 0 did) and replaced the run;
    it is now off, and text that is no switch is refused as a bad reward range is: a
    UsageError with an `out`, one warning from the setup hook."""
    run = tmp_path / "run"
    with Recorder(run, policy=None) as recorder:
        recorder.log_step(0, loss=1.0)
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(run))
    monkeypatch.setenv("STABLEDRL_FORCE", "false")
    assert stabledrl_verl.install()
    train(actor_config())
    stabledrl_verl.uninstall()
    assert "already exists and is not empty" in capsys.readouterr().err
    assert open_run(run).manifest["policy"] is None
    monkeypatch.delenv("STABLEDRL_RUN_DIR")
    monkeypatch.setenv("STABLEDRL_FORCE", "maybe")
    with pytest.raises(UsageError, match=re.escape("$STABLEDRL_FORCE='maybe': not a switch")):
        stabledrl_verl.install(tmp_path / "other")
    monkeypatch.setenv("STABLEDRL_RUN_DIR", str(tmp_path / "other"))
    assert not stabledrl_verl.install() and not stabledrl_verl.installed()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    assert len(warnings) == 1 and "$STABLEDRL_FORCE='maybe': not a switch" in warnings[0]


def test_a_command_whose_optimizer_stepped_under_the_integration_is_not_said_to_never_step(
    tmp_path: Path,
) -> None:
    """Under record, a process where verl's integration records instead of the optimizer hooks
    (a loss it does not record, an optimizer outside verl's engine) stepped its optimizer and
    recorded no step: record said 'no torch optimizer.step() ran', which was false. It now
    names the integration as what recorded instead, and points at its warnings."""
    script = (
        "import torch\n"
        "from stabledrl_cli.integrations import verl\n"
        "assert verl.install()\n"
        "model = torch.nn.Linear(2, 1)\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "optimizer.step()\n"
    )
    done, _ = record_python(script, cwd=tmp_path, env=cli_environment())
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the command recorded no step: "), line
    assert "nor where the TRL or verl integration records instead: its warnings say" in line
