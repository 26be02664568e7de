"""The TRL integration against a real `trl.GRPOTrainer` (1.16.x) on CPU.

A tiny Qwen2 built from a config, a local word-level tokenizer and 8 prompts
(tests/trl_scripts/tiny_grpo.py); num_iterations=2 so ratios move, and
gradient_accumulation_steps (2) != steps_per_generation (4). For every loss type the run's own
policy, replayed on the recorded steps, reproduces TRL's logged loss, and the recorded grad
norm and step numbers are TRL's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import cli_command
from _steps import policy_batch
from _trl import (
    SCRIPTS,
    TRAINERS,
    TRL_METRICS,
    assert_replays_trl_rloo,
    child_env,
    logged_steps,
    tiny,
    torchrun,
    train,
)
from safetensors import safe_open
from tiny_configs import PARITY  # (plain data beside the tiny run's helpers, on _trl's path)
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError
from stabledrl_cli.integrations import trl as integration
from stabledrl_cli.replay.rollouts import reward_draws

__all__ = ["tiny"]  # the tiny run's fixture, shared with the RLOO tests


def _assert_matches_trl(out: Path, spec: str, log_history: list[dict[str, Any]]) -> float:
    """Steps, grad norms and loss of the recorded run equal TRL's log; returns loss_parity."""
    logged = logged_steps(log_history)
    run = sd.open_run(out)
    assert run.policy_spec is not None
    assert run.policy_spec == sd.get_policy(spec).spec
    assert run.step_numbers == sorted(logged)
    for step in run:
        assert step.scalars["grad_norm"] == logged[step.step]["grad_norm"]
        assert step.scalars["lr"] == pytest.approx(logged[step.step]["learning_rate"], rel=1e-12)
    policy = sd.get_policy(spec)
    for step in run:  # the plain spec on the recorded arrays, micro-batches included
        batch = policy_batch(step)
        objective = float(policy.weights(batch).objective)
        assert -objective == pytest.approx(logged[step.step]["loss"], rel=1e-5, abs=1e-7)
    result = sd.replay(out, [spec], device="cpu")
    own = result.own
    assert own is not None and own.spec == sd.get_policy(spec).spec
    objective = dict(
        zip(own.series["step"].tolist(), own.series["objective"].tolist(), strict=True)
    )
    for step, entry in logged.items():
        assert -objective[step] == pytest.approx(entry["loss"], rel=1e-5, abs=1e-7)
    parity = own.summary.loss_parity
    assert parity is not None and parity < 1e-5
    return float(parity)


# -- the config mapping ----------------------------------------------------------------------
MAPPING = [
    ({"loss_type": "grpo"}, "grpo"),
    ({"loss_type": "bnpo"}, "ppo:agg=micro-token-mean"),
    ({"loss_type": "dr_grpo"}, "ppo:agg=constant,max_len=6"),
    ({"loss_type": "dapo", "epsilon_high": 0.28}, "dapo:agg=recorded"),
    ({"loss_type": "dapo", "gradient_accumulation_steps": 4}, "dapo:eps_high=0.2"),
    ({"loss_type": "cispo", "epsilon_high": 5.0}, "cispo:agg=recorded"),
    ({"loss_type": "sapo"}, "sapo"),
    (
        {"loss_type": "grpo", "importance_sampling_level": "sequence"},
        "gspo:eps_high=0.2,eps_low=0.2",
    ),
    (
        {"loss_type": "dapo", "importance_sampling_level": "sequence"},
        "gspo:agg=recorded,eps_high=0.2,eps_low=0.2",
    ),
    (
        {
            "loss_type": "dapo",
            "importance_sampling_level": "sequence",
            "gradient_accumulation_steps": 4,
        },
        "gspo:agg=token-mean,eps_high=0.2,eps_low=0.2",
    ),
    (
        {"loss_type": "bnpo", "importance_sampling_level": "sequence"},
        "gspo:agg=micro-token-mean,eps_high=0.2,eps_low=0.2",
    ),
    (
        {"loss_type": "dr_grpo", "importance_sampling_level": "sequence"},
        "gspo:agg=constant,eps_high=0.2,eps_low=0.2,max_len=6",
    ),
    ({"loss_type": "grpo", "delta": 1.5}, "two-sided:agg=seq-mean-token-mean,delta=1.5"),
    (
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 2.0},
        "gspo:delta=2,eps_high=0.2,eps_low=0.2",
    ),
    (
        {"loss_type": "dapo", "importance_sampling_level": "sequence", "delta": 2.0},
        "gspo:agg=recorded,delta=2,eps_high=0.2,eps_low=0.2",
    ),
    ({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}, "grpo:beta=0.04"),
    ({"loss_type": "grpo", "mask_truncated_completions": True}, "grpo:rows=all"),
    (
        {"loss_type": "dr_grpo", "mask_truncated_completions": True},
        "ppo:agg=constant,max_len=6,rows=all",
    ),
    (
        {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "mask_truncated_completions": True,
        },
        "gspo:eps_high=0.2,eps_low=0.2,rows=all",
    ),
    ({"loss_type": "grpo", "beta": 0.04}, "grpo:beta=0.04,kl_is=token"),
    (
        {
            "loss_type": "grpo",
            "beta": 0.04,
            "use_bias_correction_kl": False,
            "top_entropy_quantile": 0.5,
        },
        "grpo:beta=0.04,kl_weight=none",
    ),
    ({"loss_type": "luspo"}, "ppo:agg=seq-mean-token-sum,rows=all"),
    (
        {"loss_type": "luspo", "importance_sampling_level": "sequence"},
        "gspo:agg=seq-mean-token-sum,eps_high=0.2,eps_low=0.2,rows=all",
    ),
    (
        {"loss_type": "luspo", "delta": 1.5},
        "two-sided:agg=seq-mean-token-sum,delta=1.5,rows=all",
    ),
    ({"loss_type": "vespo"}, "vespo:agg=recorded"),
    (
        {
            "loss_type": "vespo",
            "importance_sampling_level": "sequence",
            "gradient_accumulation_steps": 4,
            "vespo_k_pos": 1.5,
            "vespo_lambda_neg": 2.5,
            "delta": 2.0,
        },
        "vespo:k_pos=1.5,lambda_neg=2.5",
    ),
]


@pytest.mark.parametrize(("config", "spec"), MAPPING)
def test_config_maps_to_a_catalogue_spec(tiny: Any, config: dict[str, Any], spec: str) -> None:
    mapped = integration.policy_for_config(tiny.tiny_config("unused", **config))
    assert mapped.spec == sd.get_policy(spec).spec == spec


ROLLOUT_FUNC_MAPPING = [
    ("grpo", "grpo:rows=all"),
    ("sapo", "sapo:rows=all"),
    ("dr_grpo", "ppo:agg=constant,max_len=6,rows=all"),
    ("bnpo", "ppo:agg=micro-token-mean"),  # token means: a row without tokens adds nothing
    ("dapo", "dapo:agg=recorded,eps_high=0.2"),
    ("luspo", "ppo:agg=seq-mean-token-sum,rows=all"),
]


@pytest.mark.parametrize(("loss_type", "spec"), ROLLOUT_FUNC_MAPPING)
def test_a_rollout_func_maps_sequence_means_to_every_row(
    tiny: Any, loss_type: str, spec: str
) -> None:
    """A trainer's rollout_func can leave a row without a scored token (its env_mask), which
    TRL's sequence means count: rows=all, as for mask_truncated_completions."""
    config = tiny.tiny_config("unused", loss_type=loss_type)
    assert integration.policy_for_config(config, rollout_func=True).spec == spec


# -- parity with TRL, per loss type ----------------------------------------------------------


TOKEN_CLIP = {
    "grpo",
    "bnpo",
    "dr_grpo",
    "dapo",
    "dapo-token-mean",
    "delta",
    "delta-below-eps-high",
    "beta",
    "entropy-mask",
    "beta-bias-corrected",
    "luspo",
    "epsilons",
    "steps-per-generation-3",
    "grad-clip",
    "bnpo-delta-beta-trunc",
    "dr_grpo-3-iterations",
    "dapo-off-policy-beta",
    "grpo-accumulation-4",
}


SEQUENCE_CLIP = {
    "gspo",
    "gspo-delta-below-eps-high",
    "luspo-sequence",
    "gspo-beta-off-policy",
    "luspo-sequence-beta",
    "gspo-dapo",
    "gspo-bnpo",
    "gspo-dr_grpo",
}
"""Sequence-level cases: TRL's clip_ratio/* count each micro-batch's clipped rows (one
sequence ratio a row)."""


RECORDED_SCALE = {
    "grpo": "ppo:agg=recorded",
    "bnpo": "ppo:agg=recorded",
    "dr_grpo": "ppo:agg=recorded",
    "luspo": "ppo:agg=recorded",
    "luspo-sequence": "gspo:agg=recorded,eps_low=0.2,eps_high=0.2",
}
"""Cases whose loss TRL's eps (0.2) with the recorded `loss_scale` (agg=recorded) gives."""


def _trl_clip_ratios(
    step: Any, eps_low: float, eps_high: float, delta: float | None
) -> dict[str, float]:
    """TRL's clip_ratio/*_mean of one step from the recorded arrays: per micro-batch, masked
    fractions over scored tokens (strict bounds) of the ratio after its `delta` cap, then
    their unweighted mean."""
    ratio = torch.exp(step["logp"] - step["logp_old"])
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    adv, mask = step["advantages"], step["mask"].bool()
    micro = step["micro_batch"][step["seq_id"].long()]
    low = (ratio < 1 - eps_low) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    fractions: dict[str, list[float]] = {"low": [], "high": [], "region": []}
    for k in micro.unique():
        scored = mask & (micro == k)
        for name, hit in (("low", low), ("high", high), ("region", low | high)):
            fractions[name].append(float((hit & scored).sum() / scored.sum()))
    return {f"clip_ratio/{n}_mean": sum(v) / len(v) for n, v in fractions.items()}


@pytest.mark.parametrize("case", list(PARITY))
def test_own_policy_reproduces_trl(tiny: Any, tmp_path: Path, case: str) -> None:
    out = tmp_path / "run"
    trainer = train(tiny, out, **PARITY[case])
    _assert_matches_trl(out, trainer.stabledrl_policy.spec, trainer.state.log_history)
    bound = trainer.args.max_grad_norm
    for step in sd.open_run(out):  # the norm after clip_grad_norm_ (grad_norm: TRL's, before)
        clipped = min(step.scalars["grad_norm"], bound)
        assert step.scalars["grad_norm_clipped"] == pytest.approx(clipped, rel=1e-5)
    if case == "grad-clip":
        assert all(s.scalars["grad_norm"] > bound for s in sd.open_run(out))
    if case in TOKEN_CLIP:  # the recorded micro-batches reproduce TRL's own clip metrics
        logged = logged_steps(trainer.state.log_history)
        for step in sd.open_run(out):
            ratios = _trl_clip_ratios(
                step, trainer.epsilon_low, trainer.epsilon_high, trainer.args.delta
            )
            for name, value in ratios.items():
                assert value == pytest.approx(logged[step.step][name], abs=1e-6), name
    if case in TOKEN_CLIP | SEQUENCE_CLIP:  # replay's TRL metrics of the own policy are TRL's
        logged = logged_steps(trainer.state.log_history)
        own = sd.replay(out, policies=[trainer.stabledrl_policy.spec], device="cpu").own
        assert own is not None
        for column, name in TRL_METRICS.items():
            for number, value in zip(own.series["step"], own.series[column], strict=True):
                assert value == pytest.approx(logged[int(number)][name], abs=1e-6), column
        assert max(e["clip_ratio/region_mean"] for e in logged.values()) > 0  # some clipped
    if case in RECORDED_SCALE:  # the recorded loss_scale is TRL's own normaliser
        logged = logged_steps(trainer.state.log_history)
        own = sd.replay(out, policies=[RECORDED_SCALE[case]], device="cpu").policies[0]
        for number, value in zip(own.series["step"], own.series["objective"], strict=True):
            assert -value == pytest.approx(logged[int(number)]["loss"], rel=1e-5, abs=1e-7)
    if case.startswith("cispo"):  # TRL logs cispo's own clip ratio instead
        logged = logged_steps(trainer.state.log_history)
        own = sd.replay(out, policies=[trainer.stabledrl_policy.spec], device="cpu").own
        assert own is not None
        for number, value in zip(
            own.series["step"], own.series["trl_cispo_clip_ratio"], strict=True
        ):
            assert value == pytest.approx(logged[int(number)]["cispo_clip_ratio"], abs=1e-6)
    if case.startswith("vespo"):  # and vespo's mean gamma weight
        logged = logged_steps(trainer.state.log_history)
        own = sd.replay(out, policies=[trainer.stabledrl_policy.spec], device="cpu").own
        assert own is not None
        phis = own.series["trl_vespo_phi_seq_mean"]
        for number, value in zip(own.series["step"], phis, strict=True):
            assert value == pytest.approx(logged[int(number)]["vespo/phi_seq_mean"], rel=1e-5)
        assert min(phis) < 0.999  # the weights moved off phi(1) = 1 on the second pass
    if PARITY[case].get("mask_truncated_completions"):  # recorded whole: rows scoring no token
        for step in sd.open_run(out):
            scored = torch.zeros(len(step["group_id"]))
            scored.index_add_(0, step["seq_id"].long(), step["mask"].float())
            assert bool((scored == 0).any()) and bool((scored > 0).any())
    step = sd.open_run(out).step(2)
    assert step.scalars["inner_step"] == 1  # the second update on the same rollout
    accumulation = trainer.args.gradient_accumulation_steps
    assert sorted(set(step["micro_batch"].tolist())) == list(range(accumulation))
    assert ("logp_ref" in step) == ("beta" in PARITY[case])
    weighted = {"top_entropy_quantile", "off_policy_mask_threshold"} & set(PARITY[case])
    assert ("loss_weight" in step) == bool(weighted)


def test_a_lora_run_with_beta_checkpointing_and_bf16_weights_replays_trls_log(
    tiny: Any, tmp_path: Path
) -> None:
    """LoRA as most users train: a peft adapter on bf16 base weights, gradient checkpointing,
    beta > 0 (TRL's reference log-probs from the model with its adapter disabled). The run
    records logp_ref, TRL's grad norms and kl, and its own policy replays TRL's loss and
    clip ratios."""
    peft = pytest.importorskip("peft", reason="the LoRA test needs peft (pip install -e '.[dev]')")
    out = tmp_path / "run"
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config = {"gradient_checkpointing": True, "model_init_kwargs": {"dtype": "bfloat16"}}
    trainer = train(tiny, out, peft_config=lora, loss_type="grpo", beta=0.1, **config)
    trained = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert isinstance(trainer.model, peft.PeftModel)
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    spec = "grpo:beta=0.1,kl_is=token"
    _assert_matches_trl(out, spec, trainer.state.log_history)
    logged = logged_steps(trainer.state.log_history)
    for step in sd.open_run(out):
        assert "logp_ref" in step
        assert step.scalars["kl"] == pytest.approx(logged[step.step]["kl"], rel=1e-6, abs=1e-9)
    own = sd.replay(out, [spec], device="cpu").own
    assert own is not None
    for i, number in enumerate(own.series["step"].tolist()):
        for column, name in TRL_METRICS.items():
            assert own.series[column][i] == pytest.approx(logged[number][name], abs=1e-6)
    assert max(logged[n]["kl"] for n in logged) > 0  # the adapter moved off the reference


def test_inner_step_counts_the_updates_since_the_steps_oldest_rollout(
    tiny: Any, tmp_path: Path
) -> None:
    """gradient_accumulation_steps (3) and steps_per_generation (2) that do not divide each
    other: a rollout is generated mid-step, and the next step begins on it after one update
    (step 2; step 3 ends the epoch's 8 micro-batches after 2). inner_step 0 (the noise floor's
    steps) is a step whose every micro-batch is on-policy."""
    out = tmp_path / "run"
    config = {"gradient_accumulation_steps": 3, "steps_per_generation": 2, "num_iterations": 1}
    train(tiny, out, per_device_train_batch_size=2, num_generations=2, **config)
    run = sd.open_run(out)
    assert [step.scalars["inner_step"] for step in run] == [0, 1, 0, 0]
    for step in run:
        on_policy = torch.equal(step["logp"], step["logp_old"])
        assert on_policy == (step.scalars["inner_step"] == 0), step.step


def test_on_policy_grpo_loss_of_zero_is_not_a_parity_failure(tiny: Any, tmp_path: Path) -> None:
    """On-policy grpo (num_iterations=1, steps_per_generation = gradient_accumulation_steps)
    with whole groups in each step: TRL's loss is a sum that cancels to zero, logged as its
    float32 rounding residue. Replay's objective cancels too; loss_parity must not compare
    the two residues (a relative error near 1, a false mismatch) but leave those steps out."""
    out = tmp_path / "run"
    config = {"loss_type": "grpo", "num_iterations": 1, "steps_per_generation": 2}
    trainer = train(tiny, out, **config)
    logged = logged_steps(trainer.state.log_history)
    assert all(abs(entry["loss"]) < 1e-6 for entry in logged.values())  # residues of zero
    own = sd.replay(out, policies=[trainer.stabledrl_policy.spec], device="cpu").own
    assert own is not None
    for number, objective in zip(own.series["step"], own.series["objective"], strict=True):
        assert -objective == pytest.approx(logged[int(number)]["loss"], abs=1e-7)
    assert own.summary.loss_parity is None  # no step holds a loss to compare


def test_unscorable_rewards_recompute_as_trl_does(tiny: Any, tmp_path: Path) -> None:
    """A reward function returning None (TRL: NaN, an unscorable completion): TRL leaves the
    row out of its group's mean and std and gives it advantage 0. Replayed with TRL's
    scale_rewards="group" advantages recomputed from the recorded rewards (adv=zscore), the
    advantages are TRL's, and no step is non-finite. Rows 4g..4g+3 of a call are group g:
    the odd calls leave group 0 one rewarded member and group 1 none, the even ones one
    unscorable row in each."""
    calls: list[int] = []

    def unscorable(completions: list[str], **_: Any) -> list[float | None]:
        calls.append(1)
        none = {1, 2, 3, 4, 5, 6, 7} if len(calls) % 2 else {1, 6}
        return [None if i in none else r for i, r in enumerate(tiny.count_b(completions))]

    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        model=tiny.tiny_model(),
        reward_funcs=unscorable,
        args=tiny.tiny_config(
            str(tmp_path / "trl_out"), num_iterations=1, steps_per_generation=2
        ),  # whole groups in each step
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        stabledrl_out=out,
    )
    trainer.train()
    spec = "dapo:adv=zscore,agg=recorded,eps_high=0.2"
    for step in sd.open_run(out):
        assert bool(torch.isnan(step["reward"]).any())
        recomputed = sd.get_policy(spec).weights(policy_batch(step)).advantages
        assert torch.allclose(recomputed, step["advantages"], atol=1e-5)
    own = sd.replay(out, policies=[spec], device="cpu").policies[0]
    assert own.summary.collapsed_steps == []


def test_an_infinite_reward_gives_trls_logged_reward_and_its_weight(
    tiny: Any, tmp_path: Path
) -> None:
    """TRL logs `reward` as the nanmean of the rewards: an infinite one makes it inf. The
    capture took the mean of the finite rewards alone (a number TRL's dashboard never showed)
    while `_scored_rewards`, its weight in a multi-rank join, counted the infinite one too.
    Both are now over the rewards that are not NaN, as TRL's and the Recorder's."""

    def infinite(completions: list[str], **_: Any) -> list[float]:
        rewards = [float(r) for r in tiny.count_b(completions)]
        return [math.inf, *rewards[1:]]

    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        model=tiny.tiny_model(),
        reward_funcs=infinite,
        args=tiny.tiny_config(str(tmp_path / "trl_out"), num_iterations=1, max_steps=2),
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        stabledrl_out=out,
    )
    trainer.train()
    logged = logged_steps(trainer.state.log_history)
    steps = list(sd.open_run(out))
    assert [s.step for s in steps] == sorted(logged)
    shown = [s for s in steps if "reward" in logged[s.step]]  # logged once per generation
    assert shown and all(logged[s.step]["reward"] == math.inf for s in shown)
    assert [s.scalars["reward_mean"] for s in shown] == [math.inf] * len(shown)
    for step in steps:  # every step: the mean of the rewards that are not NaN
        reward = step["reward"].double()
        assert step.scalars["reward_mean"] == pytest.approx(float(torch.nanmean(reward)))
    for path in sorted((out / "steps").iterdir()):  # its weight: the same rewards, counted
        with safe_open(path, "pt") as f:
            count = int((~torch.isnan(f.get_tensor("reward"))).sum())
            assert f.metadata()["_scored_rewards"] == str(count)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_the_observed_reward_of_a_rollout_is_trls_logged_reward(
    tiny: Any, tmp_path: Path, num_iterations: int
) -> None:
    """steps_per_generation (4) twice gradient_accumulation_steps (2): each rollout is
    trained over two steps (then again, with num_iterations 2), and TRL logs its `reward`, the
    mean over the whole rollout, at its first step. The observed-collapse rule read the first
    step's reward_mean alone (half the rollout: 0.375 where TRL logged 0.3125); it now reads
    the rollout's mean, TRL's number."""
    out = tmp_path / "run"
    trainer = train(tiny, out, num_iterations=num_iterations, max_steps=8)
    logged = {n: e["reward"] for n, e in logged_steps(trainer.state.log_history).items()
              if "reward" in e}  # fmt: skip
    assert len(logged) == 4 // num_iterations  # a rollout logged every 2 * num_iterations steps
    run = sd.open_run(out)
    series = run.scalar_series_many(["reward_mean", "inner_step"])
    steps, rewards = reward_draws(*series["reward_mean"], *series["inner_step"])
    assert steps.tolist() == sorted(logged)
    assert rewards.tolist() == pytest.approx([logged[n] for n in sorted(logged)], rel=1e-6)
    first = sd.open_run(out).step(1).scalars["reward_mean"]
    assert first != pytest.approx(logged[1])  # the first step holds half the rollout


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_a_step_without_a_scored_token_is_recorded_and_replayed(
    tiny: Any, tmp_path: Path, loss_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """mask_truncated_completions with completions that cannot end (min_new_tokens = the
    maximum): steps 2 and 4 of the tiny run score no token. Training is not disturbed, no
    warning is printed, every step is recorded, and replay keeps them all with TRL's loss."""
    out = tmp_path / "run"
    config = {"mask_truncated_completions": True, "generation_kwargs": {"min_new_tokens": 6}}
    trainer = train(tiny, out, loss_type=loss_type, **config)
    assert trainer.state.global_step == 4
    assert "stabledrl:" not in capsys.readouterr().err
    run = sd.open_run(out)
    scored = {step.step: int(step["mask"].sum()) for step in run}
    assert [n for n, count in scored.items() if count == 0] == [2, 4]
    _assert_matches_trl(out, trainer.stabledrl_policy.spec, trainer.state.log_history)
    result = sd.replay(out, [trainer.stabledrl_policy.spec], device="cpu")
    assert result.skipped == []
    assert result.own is not None and result.own.series["step"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        ({"loss_type": "grpo"}, "grpo:rows=all"),
        ({"loss_type": "dr_grpo"}, "ppo:agg=constant,max_len=6,rows=all"),
        (
            {"loss_type": "grpo", "importance_sampling_level": "sequence"},
            "gspo:eps_high=0.2,eps_low=0.2,rows=all",
        ),
    ],
)
def test_a_rollout_funcs_env_mask_that_empties_a_row_replays_trls_loss(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], spec: str
) -> None:
    """A rollout_func's env_mask (TRL's tool mask) that masks a whole completion (one in five
    here) leaves a row without a scored token, which TRL's mean over a micro-batch's rows still
    counts: the run's own policy is the spec with rows=all, and it replays TRL's loss."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), **config),
        rollout_func=tiny.env_masked_rollout(),
        stabledrl_out=out,
    )
    trainer.train()
    assert trainer.stabledrl_policy.spec == spec
    for step in sd.open_run(out):  # rows without a scored token among rows with some
        scored = torch.zeros(len(step["group_id"]))
        scored.index_add_(0, step["seq_id"].long(), step["mask"].float())
        assert bool((scored == 0).any()) and bool((scored > 0).any())
    _assert_matches_trl(out, spec, trainer.state.log_history)


def test_recording_failure_warns_once_and_training_continues(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(sd.Recorder, "log_step", broken)
    trainer = train(tiny, tmp_path / "run")
    assert trainer.state.global_step == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert len(warnings) == 1
    assert "disk on fire" in warnings[0] and "training continues" in warnings[0]


def test_a_step_the_trainer_cannot_record_is_noted_in_the_run(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A micro-batch of step 3 the trainer cannot capture stopped the recording while TRL
    trained on to step 4, and the run said nothing of it: inspect read 'closed: its Recorder
    finished', a run of 2 steps that looks whole. The stop is now the manifest's
    recording_stopped, as a failed write's is, and inspect shows it."""
    captured = integration.RecordingGRPOTrainer._sd_micro_batch

    def failing_at_step_3(self: Any, *args: Any) -> Any:
        if self.state.global_step == 2:
            raise ValueError("cannot take this one")
        return captured(self, *args)

    monkeypatch.setattr(integration.RecordingGRPOTrainer, "_sd_micro_batch", failing_at_step_3)
    out = tmp_path / "run"
    trainer = train(tiny, out)
    assert trainer.state.global_step == 4
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2]
    reason = "recording a micro-batch failed: ValueError: cannot take this one"
    assert run.manifest["recording_stopped"] == {"step": 3, "rank": 0, "reason": reason}
    shown = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert f"stopped at step 3 (rank 0): {reason}" in shown.stdout


def test_a_run_directory_that_cannot_be_written_warns_once_and_training_runs(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, real_open = tmp_path / "run", os.open

    def read_only(file: Any, flags: int, *args: Any) -> int:  # the run's file system only
        if flags & os.O_CREAT and str(file).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    trainer = train(tiny, out)  # the run's manifest cannot be written
    assert trainer.state.global_step == 4
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert len(warnings) == 1
    assert "cannot write it" in warnings[0] and "training continues" in warnings[0]


def test_a_compute_loss_that_bypasses_trls_loss_is_said_once_not_recorded_silently(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compute_loss (the transformers Trainer's public method, which a subclass overrides)
    that computes its own loss, never calling TRL's _compute_loss: nothing of TRL's loss
    reaches the recorder. Training runs to its end, and that its steps are not recorded is
    said once on stderr, rather than an empty run left for replay to find."""

    def own_loss(self: Any, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
        return model(input_ids=inputs["completion_ids"]).logits.mean()

    monkeypatch.setattr(integration.RecordingGRPOTrainer, "compute_loss", own_loss)
    out = tmp_path / "run"
    trainer = train(tiny, out)
    assert trainer.state.global_step == 4
    assert sd.open_run(out).step_numbers == []
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert len(warnings) == 1 and "_compute_loss" in warnings[0], warnings


# -- the README snippet under `stabledrl record` ---------------------------------------------
def test_readme_snippet_records_under_stabledrl_record(tiny: Any, tmp_path: Path) -> None:
    shutil.copy(SCRIPTS / "snippet_train.py", tmp_path / "train.py")
    cmd = [*cli_command(), "record", "--out", "run", "--",
           sys.executable, "train.py"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == [1, 2, 3, 4]
    assert run.policy_spec == "dapo:agg=recorded,eps_high=0.2"  # TRL's default loss_type


WARM_UP = (
    "import sys, torch\n"
    "from tiny_grpo import *\n"
    "from stabledrl_cli.integrations.trl import RecordingGRPOTrainer\n"
    "parts = tiny_parts()\n"
    "optimizer = torch.optim.SGD(parts['model'].parameters(), lr=1e-3)\n"
    "for _ in range(int(sys.argv[1])):  # a warm-up before GRPO\n"
    "    ids = torch.randint(2, 12, (2, 5))\n"
    "    parts['model'](input_ids=ids, labels=ids).loss.backward()\n"
    "    optimizer.step()\n"
    "trainer = RecordingGRPOTrainer(**parts, args=tiny_config('o', max_steps=2))\n"
    "trainer.train()\n"
    "print('trained', trainer.state.global_step)\n"
)
"""A script whose model takes optimizer steps (argv[1] of them) before a recording trainer
is made."""


@pytest.mark.parametrize(
    ("warm_up", "options", "code", "recorded"),
    [(1, [], 2, [0]), (2, [], 2, [0, 1]), (2, ["--no-optimizer-hooks"], 0, [1, 2])],
)
def test_optimizer_steps_before_the_trainer_under_record_leave_the_training_running(
    tiny: Any, tmp_path: Path, warm_up: int, options: list[str], code: int, recorded: list[int]
) -> None:
    """A warm-up's optimizer steps before RecordingGRPOTrainer, under `stabledrl record`: the
    hooks record them (the one step they hold until the next event, or the run they opened),
    and the trainer's steps, numbered from 1, cannot go beside them. Before, two steps made
    the trainer's first step raise the Recorder's 'still open in this process' (the training
    ended unrun) and one step made record fail at exit ('already exists and is not empty').
    Now the training runs unrecorded, said in one warning line naming the option that records
    its steps instead, the hooks' steps kept, and record exits 2; with
    --no-optimizer-hooks the run holds the trainer's steps."""
    script = tmp_path / "train.py"
    script.write_text(WARM_UP)
    command = [*cli_command("record", "--out", "run", *options), "--",
               sys.executable, str(script), str(warm_up)]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=child_env(), capture_output=True, text=True)
    assert done.returncode == code, done.stderr[-2000:]
    assert "trained 2" in done.stdout
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "stabledrl: warning" in line]
    if code:
        assert len(warnings) == 1 and "--no-optimizer-hooks" in warnings[0], warnings
    else:
        assert warnings == []
    run = sd.open_run(tmp_path / "run")
    assert run.step_numbers == recorded
    assert run.policy_spec == (None if code else "dapo:agg=recorded,eps_high=0.2")


# -- two ranks -------------------------------------------------------------------------------
def _assert_step_files(out: Path) -> None:
    names = sorted(p.name for p in (out / "steps").iterdir())
    assert names == [f"step-{s:08d}.rank-{r:04d}.safetensors" for s in (1, 2, 3, 4) for r in (0, 1)]


def _assert_trl_metrics(out: Path, spec: str, logged: dict[int, dict[str, Any]]) -> None:
    """Replay's TRL metrics of the merged run pool each micro-batch call over the ranks, as
    TRL does."""
    own = sd.replay(out, policies=[spec], device="cpu").own
    assert own is not None
    for column, name in TRL_METRICS.items():
        for number, value in zip(own.series["step"], own.series[column], strict=True):
            assert value == pytest.approx(logged[int(number)][name], abs=1e-6), column


def test_two_ranks_with_torchrun(tiny: Any, tmp_path: Path) -> None:
    """Two ranks (gloo), GRPOTrainer then RLOOTrainer in one launch (the ranks start once):
    each rank writes its rows; the joined step replays TRL's loss (DDP averages the ranks')
    and its clip ratios (pooled over the ranks' micro-batch calls)."""
    grpo, rloo = tmp_path / "grpo", tmp_path / "rloo"
    cmd = torchrun("ddp_train.py", str(grpo / "run"), str(grpo / "log.json"), "grpo",
                   str(rloo / "run"), str(rloo / "log.json"), "rloo")  # fmt: skip
    done = subprocess.run(
        cmd, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # GRPOTrainer: a step file a rank, TRL's grad norms, loss and clip metrics
    out = grpo / "run"
    _assert_step_files(out)
    log_history = json.loads((grpo / "log.json").read_text())
    run = sd.open_run(out)
    assert run.manifest["world_size"] == 2
    _assert_matches_trl(out, run.policy_spec or "", log_history)
    logged = logged_steps(log_history)
    assert run.group_ids == "global"
    for step in run:  # the merged step: the ranks' mean loss is TRL's logged loss
        assert step.scalars["loss"] == pytest.approx(logged[step.step]["loss"], rel=1e-6)
        assert step.num_sequences == 8
        assert set(step["group_id"].tolist()) <= set(range(4))  # global ids, not offset
    _assert_trl_metrics(out, run.policy_spec or "", logged)
    # RLOOTrainer: each rank writes its completions (an entry each)
    out = rloo / "run"
    logged = logged_steps(json.loads((rloo / "log.json").read_text()))
    run = sd.open_run(out)
    assert run.manifest["world_size"] == 2 and run.unit == "sequence"
    for step in run:
        assert step.num_sequences == 8
        assert set(step["group_id"].tolist()) <= set(range(4))  # global ids, not offset
        assert step.scalars["loss"] == pytest.approx(logged[step.step]["loss"], rel=1e-6)
        assert step["token_count"].shape == (8,) and int(step["token_count"].min()) >= 0
    own = assert_replays_trl_rloo(out, run.policy_spec or "", logged)
    assert torch.tensor(own.series["trl_clip_ratio_region_mean"]).max() > 0


# -- two ranks, the model sharded by accelerate's FSDP2 plugin --------------------------------
@pytest.fixture(scope="module")
def fsdp2_launch(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank launch under `stabledrl record --out run` (fsdp2_train.py): plain
    `trl.GRPOTrainer` recorded by record's optimizer hooks into "run", then
    RecordingGRPOTrainer into "recorded"; after checking that each training's model really
    was sharded by FSDP2, the directory ("dir"), record's stderr ("stderr") and what rank 0
    wrote of each training ("plain", "recording")."""
    directory = tmp_path_factory.mktemp("fsdp2")
    record = [*cli_command(), "record", "--out", "run", "--"]
    command = [*record, *torchrun("fsdp2_train.py", str(directory / "recorded"), "shown.json")]
    done = subprocess.run(
        command, cwd=directory, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads((directory / "shown.json").read_text())
    for training in ("plain", "recording"):
        assert shown[training]["is_fsdp2"] and shown[training]["dtensor_parameters"], training
        assert shown[training]["model"] == "FSDPQwen2ForCausalLM", training
    return {"dir": directory, "stderr": done.stderr, **shown}


def test_fsdp2_two_ranks_record_trl_grad_norm_and_loss(fsdp2_launch: dict[str, Any]) -> None:
    """DTensor gradients clipped by accelerate: each step's grad_norm is the float TRL logs
    (both read the norm accelerate's clip returned, so they are equal, not close), and the
    run's policy replays TRL's loss and clip ratios."""
    out = fsdp2_launch["dir"] / "recorded"
    log_history = fsdp2_launch["recording"]["log_history"]
    _assert_step_files(out)
    run = sd.open_run(out)
    assert run.manifest["world_size"] == 2
    spec = run.policy_spec or ""
    _assert_matches_trl(out, spec, log_history)
    logged = logged_steps(log_history)
    assert logged[1]["grad_norm"] > 1.0  # max_grad_norm: the norm recorded is the pre-clip one
    assert run.step(1).scalars["grad_norm_clipped"] == pytest.approx(1.0, rel=1e-5)
    _assert_trl_metrics(out, spec, logged)


def test_fsdp2_two_ranks_under_stabledrl_record(fsdp2_launch: dict[str, Any]) -> None:
    """Plain `trl.GRPOTrainer` under `stabledrl record`: the optimizer hooks record each step
    (numbered from 0) with TRL's grad_norm, within float32 rounding (the hooks sum the
    squares of the DTensor shards in float64, torch's clip in float32)."""
    assert "recording failed" not in fsdp2_launch["stderr"]
    logged = logged_steps(fsdp2_launch["plain"]["log_history"])
    run = sd.open_run(fsdp2_launch["dir"] / "run")
    assert run.manifest["world_size"] == 2
    assert run.step_numbers == [n - 1 for n in sorted(logged)]
    for step in run:
        trl = logged[step.step + 1]
        assert step.scalars["grad_norm"] == pytest.approx(trl["grad_norm"], rel=1e-6)
        assert step.scalars["lr"] == pytest.approx(trl["learning_rate"], rel=1e-12)


# -- evaluation, a training that raises, a second training -----------------------------------
def test_evaluation_during_training_is_not_recorded(tiny: Any, tmp_path: Path) -> None:
    """eval_strategy="steps": TRL generates, scores and computes the loss on the eval set
    between optimizer steps; none of it is a training step, and the training steps keep
    TRL's numbers and loss."""
    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(
            str(tmp_path / "trl_out"),
            loss_type="grpo",
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=4,
        ),
        eval_dataset=tiny.tiny_dataset(4),
        stabledrl_out=out,
    )
    trainer.train()
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert evaluated == [1, 2, 3, 4]
    _assert_matches_trl(out, trainer.stabledrl_policy.spec, trainer.state.log_history)


def test_training_that_raises_keeps_its_finished_steps(tiny: Any, tmp_path: Path) -> None:
    """An exception out of train() after step 3 (a callback here): steps 1-3, each finished
    by its optimizer step, are in the run, whole, and replay."""
    from transformers import TrainerCallback  # with trl (the `tiny` fixture)

    class Boom(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise RuntimeError("boom")

    out = tmp_path / "run"
    trainer = integration.RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="grpo"),
        callbacks=[Boom()],
        stabledrl_out=out,
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    run = sd.open_run(out)
    assert run.step_numbers == [1, 2, 3]
    assert run.integrity.ok
    own = sd.replay(out, policies=[trainer.stabledrl_policy.spec], device="cpu").own
    assert own is not None and own.summary.loss_parity is not None
    assert own.summary.loss_parity < 1e-5


def test_training_that_raises_before_its_first_step_leaves_no_run(
    tiny: Any, tmp_path: Path
) -> None:
    """A reward function that raises at the first rollout: the run was opened as the first
    step began and no step was recorded. Before, its manifest and empty steps/ stayed, and
    the fixed script's rerun into the directory was refused ('already exists and is not empty
    (manifest.json); pass overwrite=True'; under `stabledrl record`, 'pass --force'). Now the
    directory is left as the training found it, and the rerun records."""

    def broken(completions: list[str], **_: Any) -> list[float]:
        raise KeyError("answer")

    out = tmp_path / "run"

    def trainer(reward: Any) -> Any:
        return integration.RecordingGRPOTrainer(
            model=tiny.tiny_model(),
            reward_funcs=reward,
            args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="grpo", max_steps=2),
            train_dataset=tiny.tiny_dataset(),
            processing_class=tiny.tiny_tokenizer(),
            stabledrl_out=out,
        )

    with pytest.raises(KeyError, match="answer"):
        trainer(broken).train()
    assert not out.exists() or list(out.iterdir()) == []
    fixed = trainer(tiny.count_b)
    fixed.train()
    assert sd.open_run(out).step_numbers == [1, 2]


SECOND_TRAINING = [("same trainer", True), ("another trainer", True), ("another trainer", False)]
"""(who trains second, stabledrl_overwrite): TRL numbers the second training's steps from 1."""


@pytest.mark.parametrize(("second", "overwrite"), SECOND_TRAINING)
def test_a_second_training_never_replaces_the_first_ones_steps(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str, overwrite: bool
) -> None:
    """train() twice into one run directory in one process: on one trainer, or on a second
    one (a script that trains in phases under `stabledrl record`, which gives both its run
    directory; --force goes to the first training's Recorder, which replaces the run once).
    TRL numbers the second training's steps
    from 1 again, so recording them would replace the first training's. The first's steps
    stay; the second trains unrecorded, said once on stderr (neither replacing the first's
    steps, with overwrite, nor stopped by the first's run, without)."""
    out = tmp_path / "run"

    def trainer(seed: int) -> Any:
        return integration.RecordingGRPOTrainer(
            model=tiny.tiny_model(seed),  # another seed: another model, other losses
            reward_funcs=tiny.count_b,
            args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="grpo", max_steps=2),
            train_dataset=tiny.tiny_dataset(),
            processing_class=tiny.tiny_tokenizer(),
            stabledrl_out=out,
            stabledrl_overwrite=overwrite,
        )

    first_trainer = trainer(0)
    first_trainer.train()
    first = {s.step: s.scalars["loss"] for s in sd.open_run(out)}
    capsys.readouterr()
    second_trainer = first_trainer if second == "same trainer" else trainer(1)
    second_trainer.train()
    assert second_trainer.state.global_step == 2  # the second training ran
    assert {s.step: s.scalars["loss"] for s in sd.open_run(out)} == first
    warnings = [line for line in capsys.readouterr().err.splitlines() if "stabledrl:" in line]
    assert len(warnings) == 1 and "second train()" in warnings[0]


@pytest.mark.parametrize(
    ("given", "warned"),
    [("grpo", True), ("dapo:agg=recorded", False), (None, False), ("grpo" * 25_000, True)],
)
def test_a_record_policy_the_trainer_does_not_record_is_named(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any, given: Any, warned: bool
) -> None:
    """`stabledrl record -p grpo -- python train.py` with a dapo GRPOConfig recorded dapo, TRL's
    loss, and said nothing of the -p (it is `log_policy_batch`'s spec): one warning now names
    both; a -p naming the trainer's own policy, or none, says nothing. A $STABLEDRL_POLICY of
    100,000 characters (set by hand: `record` refuses such a spec) is cut in the line."""
    if given is None:
        monkeypatch.delenv("STABLEDRL_POLICY", raising=False)
    else:
        monkeypatch.setenv("STABLEDRL_POLICY", given)
    trainer = integration.RecordingGRPOTrainer(
        model=tiny.tiny_model(),
        reward_funcs=tiny.count_b,
        args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="dapo", epsilon_high=0.28),
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        stabledrl_out=tmp_path / "run",
    )
    assert trainer.stabledrl_policy.spec.startswith("dapo")
    lines = [line for line in capfd.readouterr().err.splitlines() if "stabledrl:" in line]
    as_given = given if given != "grpo" * 25_000 else f"{given[:120]!r}... (100,000 characters)"
    expected = (
        f"stabledrl: warning: record --policy {as_given} is not what RecordingGRPOTrainer "
        f"records: it records TRL's loss as its config makes it, {trainer.stabledrl_policy.spec}"
    )
    assert lines == ([expected] if warned else [])


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_declared_reward_range_is_the_runs(tiny: Any, tmp_path: Path, trainer: str) -> None:
    """A recording trainer could declare no reward range, so every TRL run's collapse floor was
    its own lowest reward (docs/collapse.md: a success rate stepping from 0.8 to 0.7 then
    reads as a collapse). stabledrl_reward_range=(0, 1) is the run's manifest's; a range
    that is no (low, high) is refused at construction. The meta's reward_weights are the
    config's, 0.1 (was TRL's float32 tensor read as 0.10000000149011612)."""
    config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config
    out = tmp_path / "run"
    recording = getattr(integration, trainer)(
        **tiny.tiny_parts(),
        args=config(str(tmp_path / "trl_out"), reward_weights=[0.1]),
        stabledrl_out=out,
        stabledrl_reward_range=(0.0, 1.0),
    )
    recording.train()
    manifest = sd.open_run(out).manifest
    assert manifest["reward_range"] == [0.0, 1.0]
    assert manifest["meta"]["reward_weights"] == [0.1]
    with pytest.raises(UsageError) as refused:
        getattr(integration, trainer)(
            **tiny.tiny_parts(),
            args=config(str(tmp_path / "trl_out2")),
            stabledrl_out=tmp_path / "other",
            stabledrl_reward_range=(1.0, 0.0),
        )
    assert str(refused.value).startswith("stabledrl_reward_range must be (low, high)")
    assert not (tmp_path / "other").exists()
