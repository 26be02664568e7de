"""The newer policies (gppo, clip-cov, kl-cov, gmpo, dppo, gpg, the rollout correction tis=...)
against the real thing: verl's own loss functions and rollout-correction weights, with torch
autograd of verl's loss giving the coefficient. GPPO, which verl does not have, against
autograd of Klear-Reasoner's surrogate as its repository writes it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.errors import UsageError

F64 = torch.float64
B, L = 8, 9


def batch(seed: int, spread: float = 0.6) -> dict[str, torch.Tensor]:
    """[B, L] float64: probabilities of every size (so the DPPO bounds bind both ways),
    log-ratios near 0 and some far out, per-row advantages of both signs and 0, ragged masks
    with one all-masked row, and a rollout engine's log-probs near logp_old."""
    gen = torch.Generator().manual_seed(seed)
    logp_old = torch.log(torch.rand(B, L, generator=gen, dtype=F64).clamp(min=1e-3))
    log_ratio = torch.randn(B, L, generator=gen, dtype=F64) * spread
    logp = logp_old + log_ratio
    adv = torch.randn(B, generator=gen, dtype=F64)
    adv[2] = 0.0
    mask = (torch.rand(B, L, generator=gen) < 0.8).to(F64)
    mask[5] = 0.0
    mask[:, 0] = torch.where(torch.arange(B) == 5, 0.0, 1.0).to(F64)
    rollout = logp_old + torch.randn(B, L, generator=gen, dtype=F64) * 0.5
    return {
        "logp": logp,
        "logp_old": logp_old,
        "adv": adv[:, None].expand(B, L).clone(),
        "mask": mask,
        "rollout": rollout,
    }


def ours(spec: str, data: dict[str, torch.Tensor], **extra: Any) -> Any:
    return get_policy(spec).weights(
        PolicyBatch(
            logp=data["logp"],
            logp_old=data["logp_old"],
            advantages=data["adv"],
            mask=data["mask"],
            **extra,
        )
    )


# ---- verl ------------------------------------------------------------------------------------
VERL_CASES = [
    # (verl loss_mode, ActorConfig overrides, policy_loss overrides, our spec)
    ("gpg", {}, {}, "gpg"),
    ("geo_mean", {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4}, {}, "gmpo"),
    (
        "geo_mean",
        {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3},
        {},
        "gmpo:eps_low=0.1,eps_high=0.3",
    ),
    ("dppo_tv", {}, {}, "dppo"),
    (
        "dppo_tv",
        {"clip_ratio_low": 0.05, "clip_ratio_high": 0.1, "clip_ratio_c": 2.0},
        {},
        "dppo:delta_low=0.05,delta_high=0.1,c=2",
    ),
    (
        "dppo_kl",
        {"clip_ratio_low": 0.05, "clip_ratio_high": 0.02},
        {},
        "dppo:divergence=kl,delta_low=0.05,delta_high=0.02",
    ),
    ("kl_cov", {}, {"kl_cov_ratio": 0.1}, "kl-cov:ratio=0.1"),
    ("kl_cov", {}, {"kl_cov_ratio": 0.02, "ppo_kl_coef": 1.0}, "kl-cov:ratio=0.02,kl_coef=1"),
    # ratio 1 selects every candidate: verl's random draw then has one outcome.
    (
        "clip_cov",
        {},
        {"clip_cov_ratio": 1.0, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0},
        "clip-cov:ratio=1,lb=0,ub=5",
    ),
    (
        "clip_cov",
        {"clip_ratio_high": 0.28},
        {"clip_cov_ratio": 1.0, "clip_cov_lb": -0.5, "clip_cov_ub": 0.2},
        "clip-cov:ratio=1,lb=-0.5,ub=0.2,eps_high=0.28",
    ),
]


def verl_loss_and_grad(
    mode: str,
    actor: dict[str, Any],
    loss: dict[str, Any],
    data: dict[str, torch.Tensor],
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo import core_algos
    from verl.workers.config import ActorConfig, PolicyLossConfig

    config = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=B,
        policy_loss=PolicyLossConfig(loss_mode=mode, **loss),
        **actor,
    )
    logp = data["logp"].clone().requires_grad_(True)
    fn = core_algos.get_policy_loss_fn(mode)
    value, metrics = fn(
        old_log_prob=data["logp_old"],
        log_prob=logp,
        advantages=data["adv"],
        response_mask=data["mask"],
        loss_agg_mode="token-mean",
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    (grad,) = torch.autograd.grad(value, logp)
    return value.detach(), grad, metrics


@pytest.mark.parametrize(
    ("mode", "actor", "loss", "spec"), VERL_CASES, ids=[c[3] for c in VERL_CASES]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_and_coef_equal_verl_autograd(mode, actor, loss, spec, seed):
    data = batch(seed)
    value, grad, _ = verl_loss_and_grad(mode, actor, loss, data)
    weights = ours(spec, data)
    assert_close(weights.objective, -value, rtol=1e-9, atol=1e-12)
    mask = data["mask"].reshape(-1) > 0
    assert_close(weights.coef[mask], -grad.reshape(-1)[mask], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_discarded_and_clipped_match_verl_clip_fractions(seed):
    data = batch(seed, spread=0.9)
    mask = data["mask"].reshape(-1) > 0
    scored = float(mask.sum())
    # verl counts every scored token (A = 0 takes the A < 0 side; its masked mean adds 1e-8
    # to the count); ours count eligible ones
    # (A != 0): a tiny negative advantage makes every token eligible on the same side.
    nudged = {**data, "adv": data["adv"] - (data["adv"] == 0) * 1e-30}
    for mode, spec in (("dppo_tv", "dppo"), ("dppo_kl", "dppo:divergence=kl")):
        _, _, metrics = verl_loss_and_grad(mode, {}, {}, data)
        w = ours(spec, nudged)
        assert float(w.discarded[mask].sum()) / scored == pytest.approx(
            metrics["actor/pg_clipfrac"], abs=1e-7
        )
        assert float(w.clipped[mask].sum()) / scored == pytest.approx(
            metrics["actor/pg_clipfrac_lower"], abs=1e-7
        )
        assert w.discarded[mask].any()


def test_dual_clip_at_c_keeps_r_a_where_verls_autograd_halves_it():
    """float32 log r whose exp is exactly c = 3: verl's min(-r A, -c A) ties, and its gradient
    splits; the catalogue's bound rule keeps r A, as docs/policies.md says."""
    log_r = torch.tensor(math.log(3.0), dtype=torch.float32)
    while float(torch.exp(log_r)) != 3.0:
        log_r = torch.nextafter(log_r, torch.tensor(0.0 if torch.exp(log_r) > 3 else 9.0))
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    data = {
        "logp": logp,
        "logp_old": logp - torch.stack([log_r, log_r, torch.tensor(0.1)]),
        "adv": torch.full((1, 3), -1.0),
        "mask": torch.ones(1, 3),
    }
    value, grad, metrics = verl_loss_and_grad("vanilla", {}, {}, {**data, "mask": data["mask"] > 0})
    w = ours("dual-clip", data)
    assert_close(w.objective, -value)
    assert_close(w.coef, torch.tensor([-1.0, -1.0, -torch.exp(torch.tensor(0.1)) / 3]))
    assert_close(w.coef[:2], -2 * grad.reshape(-1)[:2])
    assert_close(w.coef[2], -grad.reshape(-1)[2])
    assert not w.discarded.any() and metrics["actor/pg_clipfrac_lower"] == 0.0
    section = (Path(__file__).parents[1] / "docs" / "policies.md").read_text().split("### ")
    dual_clip = next(part for part in section if part.startswith("Dual clip"))
    assert "r A / 2" in dual_clip


VERL_CLAMPED = ("vanilla", "gspo", "sapo", "cispo", "gpg", "dppo_tv", "dppo_kl")
"""verl's losses that clamp log r (gspo: its sequence mean) before exp."""


@pytest.mark.parametrize("mode", [*VERL_CLAMPED, "geo_mean", "kl_cov"])
def test_a_logp_old_of_minus_inf_is_flagged_where_verl_trains_on(mode: str) -> None:
    """A scored token whose recorded logp_old is -inf: verl's clamped losses keep a finite loss
    and gradient (its unclamped geo_mean and kl_cov do not), while every replayed policy flags
    the input (docs/policies.md, Numerics, says both)."""
    data = batch(0)
    data["logp_old"][0, 0] = -math.inf
    value, grad, _ = verl_loss_and_grad(mode, {}, {}, {**data, "mask": data["mask"] > 0})
    trains_on = math.isfinite(float(value)) and bool(torch.isfinite(grad).all())
    assert trains_on == (mode in VERL_CLAMPED)
    assert int(ours("dapo", data).nonfinite) == 1
    numerics = " ".join((Path(__file__).parents[1] / "docs" / "policies.md").read_text().split())
    assert "its vanilla, gspo, sapo, cispo, gpg and dppo losses keep a finite loss" in numerics


@pytest.mark.parametrize(
    ("mode", "spec"),
    [("gpg", "gpg"), ("dppo_tv", "dppo"), ("kl_cov", "kl-cov:ratio=0.1"), ("geo_mean", "gmpo")],
)
@pytest.mark.parametrize(
    ("level", "threshold", "tis"),
    [
        ("token", 2.0, "token-truncate"),
        ("token", 1.5, "token-truncate,tis_max=1.5"),
        ("sequence", 3.0, "sequence-truncate,tis_max=3"),
        ("token", "0.5_2.0", "token-mask,tis_min=0.5"),
        ("sequence", "0.2_5.0", "sequence-mask,tis_min=0.2,tis_max=5"),
    ],
)
def test_rollout_correction_equals_verl(mode, spec, level, threshold, tis):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    data = batch(3)
    is_weights, _ = compute_rollout_correction_weights(
        log_ratio=data["logp_old"] - data["rollout"],
        response_mask=data["mask"],
        rollout_is=level,
        rollout_is_threshold=threshold,
    )
    loss = {"kl_cov_ratio": 0.1} if mode == "kl_cov" else {}
    actor = {"clip_ratio": 0.4, "clip_ratio_low": 0.4, "clip_ratio_high": 0.4}
    value, grad, _ = verl_loss_and_grad(
        mode, actor if mode == "geo_mean" else {}, loss, data, rollout_is_weights=is_weights
    )
    sep = "," if ":" in spec else ":"
    weights = ours(f"{spec}{sep}tis={tis}", data, logp_rollout=data["rollout"])
    mask = data["mask"].reshape(-1) > 0
    # verl clamps the log-ratio at +-20 before exp and adds 1e-10 inside gmpo's log: tolerance
    assert_close(weights.objective, -value, rtol=1e-8, atol=1e-10)
    assert_close(weights.coef[mask], -grad.reshape(-1)[mask], rtol=1e-8, atol=1e-10)
    if "mask" in tis and mode != "geo_mean":
        zeroed = (is_weights.reshape(-1) == 0) & mask & (data["adv"].reshape(-1) != 0)
        assert zeroed.any()
        assert bool(weights.discarded[zeroed].all())


@pytest.mark.parametrize(
    ("level", "threshold", "tis"),
    [
        ("token", "1e-10_2.0", "token-mask,tis_min=1e-10"),
        ("token", 1e12, "token-truncate,tis_max=1e12"),
        ("sequence", "1e-10_2.0", "sequence-mask,tis_min=1e-10"),
    ],
)
def test_rollout_correction_past_verls_log_weight_clamp(level, threshold, tis):
    """verl clamps the log weight (the token's, or the sequence's sum) to [-20, 20] before exp;
    the catalogue, as TRL, does not: equal inside the clamp, apart past it only where a bound
    lies beyond e^+-20, as docs/policies.md says."""
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    log_weight = torch.tensor([[-25.0, 25.0, 0.3], [-25.0, -2.0, 0.3], [0.2, -0.1, 0.05]])
    logp = -torch.arange(1.0, 10.0).reshape(3, 3) / 4
    data = {"logp": logp, "logp_old": logp - 0.05, "adv": torch.ones(3, 3)}
    data["mask"] = torch.ones(3, 3)
    verl_weight, _ = compute_rollout_correction_weights(
        log_ratio=log_weight.double(), response_mask=data["mask"].double(), rollout_is=level,
        rollout_is_threshold=threshold,
    )  # fmt: skip
    rollout = data["logp_old"] - log_weight
    got = ours(f"reinforce:tis={tis}", data, logp_rollout=rollout).coef.double() * 9
    if level == "sequence":
        log_weight = log_weight.sum(-1, keepdim=True).expand(3, 3)
    log_weight, verl_weight = log_weight.reshape(-1).double(), verl_weight.reshape(-1)
    inside = log_weight.abs() <= 20
    assert_close(got[inside], verl_weight[inside], rtol=1e-6, atol=0)
    unclamped = torch.exp(log_weight)
    if "truncate" in tis:
        expected = unclamped.clamp(max=1e12)
    else:
        expected = torch.where((unclamped < 1e-10) | (unclamped > 2.0), 0.0, unclamped)
    assert_close(got, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(got[~inside], verl_weight[~inside], rtol=0.5, atol=0)
    docs = (Path(__file__).parents[1] / "docs" / "policies.md").read_text()
    assert "verl clamps it to [-20, 20] before `exp`" in docs


# ---- GPPO ------------------------------------------------------------------------------------
def klear_gppo_loss(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2):
    """Kwai-Klear/KlearReasoner `compute_policy_loss` (gradient-preserving clip), without its
    dual clip, aggregated token-mean."""
    ratio = torch.exp(logp - logp_old)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(
        ratio, (1 - eps_low) / ratio.detach() * ratio, (1 + eps_high) / ratio.detach() * ratio
    )
    return (torch.maximum(pg_losses1, pg_losses2) * mask).sum() / mask.sum()


@pytest.mark.parametrize("params", [{}, {"eps_low": 0.1, "eps_high": 0.28}])
@pytest.mark.parametrize("seed", [0, 1])
def test_gppo_matches_autograd_of_its_surrogate(params, seed):
    data = batch(seed, spread=0.5)
    logp = data["logp"].clone().requires_grad_(True)
    loss = klear_gppo_loss(logp, data["logp_old"], data["adv"], data["mask"], **params)
    (grad,) = torch.autograd.grad(loss, logp)
    spec = "gppo" + ("" if not params else ":" + ",".join(f"{k}={v}" for k, v in params.items()))
    weights = ours(spec, data)
    mask = data["mask"].reshape(-1) > 0
    assert_close(weights.objective, -loss.detach(), rtol=1e-9, atol=1e-12)
    assert_close(weights.coef[mask], -grad.reshape(-1)[mask], rtol=1e-9, atol=1e-12)
    assert not weights.discarded.any()
    assert weights.clipped.any()
    # PPO discards exactly the tokens GPPO keeps with a bounded gradient
    ppo = ours("ppo" + spec[4:], data)
    assert torch.equal(ppo.discarded, weights.clipped)


# ---- GMPO over micro-batches ------------------------------------------------------------------
@pytest.mark.parametrize("rows", ["all", "scored"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gmpo_mean_micro_is_the_sum_of_each_micro_batchs_own_mean(rows, beta):
    """gmpo:mean=micro over a step of uneven micro-batches (one with the all-masked row) is
    the sum of gmpo:mean=step on each micro-batch alone, in objective and coefficient; without
    a recorded micro_batch the step is one micro-batch (mean=step)."""
    data = batch(6)
    micro = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    gen = torch.Generator().manual_seed(6)
    ref = data["logp"] + torch.randn(B, L, generator=gen, dtype=F64) * 0.2
    spec = f"gmpo:rows={rows},beta={beta}"
    whole = ours(f"{spec},mean=micro", data, micro_batch=micro, logp_ref=ref)
    objective = torch.zeros((), dtype=F64)
    coef = torch.zeros(B, L, dtype=F64)
    for k in range(3):
        part = micro == k
        alone = ours(spec, {name: v[part] for name, v in data.items()}, logp_ref=ref[part])
        objective = objective + alone.objective
        coef[part] = alone.coef.reshape(-1, L)
    assert_close(whole.objective, objective, rtol=1e-12, atol=1e-15)
    assert_close(whole.coef, coef.reshape(-1), rtol=1e-12, atol=1e-15)
    step = ours(spec, data, logp_ref=ref)
    assert not torch.allclose(whole.objective, step.objective)
    assert_close(ours(f"{spec},mean=micro", data, logp_ref=ref).objective, step.objective)


def test_kl_cov_micro_selects_within_each_micro_batch():
    """kl-cov:cov=micro over a step of micro-batches (one of them all-masked) is each
    micro-batch's own kl-cov, summed (agg=token-sum: no normaliser shared across them), a
    micro-batch without a scored token included; one micro-batch is cov=step."""
    data = batch(9)
    data["adv"] = data["adv"] * torch.linspace(0.5, 1.5, L, dtype=F64)  # varies within a row
    micro = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])  # micro-batch 2 is row 5, all masked
    spec = "kl-cov:ratio=0.2,kl_coef=0.5,agg=token-sum"
    whole = ours(f"{spec},cov=micro", data, micro_batch=micro)
    objective = torch.zeros((), dtype=F64)
    coef = torch.zeros(B, L, dtype=F64)
    chosen = torch.zeros(B, L, dtype=torch.bool)
    for k in range(4):
        part = micro == k
        alone = ours(spec, {name: v[part] for name, v in data.items()})
        objective = objective + alone.objective
        coef[part] = alone.coef.reshape(-1, L)
        chosen[part] = alone.clipped.reshape(-1, L) & (data["mask"][part] > 0)
    assert_close(whole.objective, objective, rtol=1e-12, atol=1e-15)
    assert_close(whole.coef, coef.reshape(-1), rtol=1e-12, atol=1e-15)
    assert torch.equal(whole.clipped, chosen.reshape(-1))
    assert whole.clipped.any()
    step = ours(spec, data)
    assert not torch.equal(step.clipped, whole.clipped)
    assert torch.equal(ours(f"{spec},cov=micro", data).clipped, step.clipped)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gmpo_mean_micro_averages_the_sums_of_the_steps_ranks(beta):
    """A step joined from 2 ranks (each rank's micro-batches numbered apart): mean=micro is
    the mean over the ranks of each rank's sum of micro-batch means, as the data-parallel
    all-reduce averages the ranks' gradients; mean=step, one mean over the joined rows, does
    not depend on the ranks."""
    data = batch(7)
    micro = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])  # rank 0: 0, 1; rank 1: 2, 3
    gen = torch.Generator().manual_seed(7)
    ref = data["logp"] + torch.randn(B, L, generator=gen, dtype=F64) * 0.2
    spec = f"gmpo:beta={beta}"
    objective = torch.zeros((), dtype=F64)
    coef = torch.zeros(B, L, dtype=F64)
    for rank in (micro < 2, micro >= 2):
        alone = ours(
            f"{spec},mean=micro",
            {name: v[rank] for name, v in data.items()},
            micro_batch=micro[rank],
            logp_ref=ref[rank],
        )
        objective = objective + alone.objective / 2
        coef[rank] = alone.coef.reshape(-1, L) / 2
    joined = ours(f"{spec},mean=micro", data, micro_batch=micro, logp_ref=ref, ranks=2)
    assert_close(joined.objective, objective, rtol=1e-12, atol=1e-15)
    assert_close(joined.coef, coef.reshape(-1), rtol=1e-12, atol=1e-15)
    step = ours(spec, data, micro_batch=micro, logp_ref=ref)
    assert_close(ours(spec, data, micro_batch=micro, logp_ref=ref, ranks=2).coef, step.coef)


def test_ranks_given_as_a_numpy_or_torch_integer_are_the_int_they_hold():
    """ranks=np.int64(2) (a world size read from an array) was refused ('ranks must be an
    integer >= 1, got np.int64(2)'); it is 2, as a torch integer is."""
    data, micro = batch(7), torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    joined = ours("gmpo:mean=micro", data, micro_batch=micro, ranks=2)
    for ranks in (np.int64(2), torch.tensor(2)):
        given = ours("gmpo:mean=micro", data, micro_batch=micro, ranks=ranks)
        assert torch.equal(given.coef, joined.coef)


@pytest.mark.parametrize("ranks", [0, -1, 1.5, True, "2", torch.tensor(2.0), 4097, 2**40])
def test_a_batch_of_no_ranks_or_more_than_a_run_holds_is_refused(ranks):
    """ranks=2**40 was taken: the per-rank sums allocated 8 TiB (torch's RuntimeError), and a
    smaller count could fill the memory instead. A batch comes from as many ranks as a run may
    have (a Recorder's world_size, 4096 at most)."""
    with pytest.raises(UsageError, match=r"ranks must be an integer in \[1, 4096\]"):
        ours("gmpo:mean=micro", batch(1), ranks=ranks)


def test_replay_divides_gmpo_micro_by_the_runs_ranks(tmp_path):
    """`replay` (and its --detail pass) of a run recorded on 2 ranks gives gmpo:mean=micro
    the ranks from the manifest's world_size: the mean over ranks of each rank's sum."""
    from stabledrl_cli.dump import Recorder, open_run
    from stabledrl_cli.replay.config import ReplayConfig
    from stabledrl_cli.replay.engine import replay_run
    from stabledrl_cli.replay.stream import detail_pass

    data = batch(8)
    spec = "gmpo:mean=micro"
    expected = torch.zeros((), dtype=F64)
    contribution = 0.0
    for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
        part = {name: v[rows] for name, v in data.items()}
        micro = torch.tensor([0, 1, 1, 1] if rank == 0 else [0, 0, 1, 1])
        with Recorder(tmp_path / "run", world_size=2, rank=rank, policy=spec) as rec:
            rec.log_step(
                0,
                logp=part["logp"],
                logp_old=part["logp_old"],
                advantages=part["adv"],
                mask=part["mask"],
                micro_batch=micro,
            )
        alone = ours(spec, part, micro_batch=micro)
        expected = expected + alone.objective / 2
        contribution = max(contribution, float(alone.coef.abs().reshape(-1, L).sum(-1).max()))
    run = open_run(tmp_path / "run")
    (own,) = replay_run(run, [spec], config=ReplayConfig(device="cpu")).policies
    assert own.steps[0]["objective"] == pytest.approx(float(expected), rel=1e-6)
    (detail,) = detail_pass(run, [get_policy(spec)], {0: [0]}, torch.device("cpu"), 1)
    (top,) = detail[0]
    assert top.contribution == pytest.approx(contribution / 2, rel=1e-6)


def test_gmpo_micro_on_ranks_without_micro_batch_is_mean_step(tmp_path):
    """A 2-rank run without `micro_batch`: each rank's step is one micro-batch, its parts not
    told apart in the joined step, so gmpo:mean=micro is mean=step (the mean over ranks of
    each rank's mean, the ranks equal in size), not that divided by the ranks again."""
    from stabledrl_cli.dump import Recorder, open_run
    from stabledrl_cli.replay.config import ReplayConfig
    from stabledrl_cli.replay.engine import replay_run

    data = batch(8)
    expected = 0.0
    for rank, rows in enumerate((slice(0, 4), slice(4, 8))):
        part = {name: v[rows] for name, v in data.items()}
        with Recorder(tmp_path / "run", world_size=2, rank=rank, policy="gmpo") as rec:
            rec.log_step(
                0,
                logp=part["logp"],
                logp_old=part["logp_old"],
                advantages=part["adv"],
                mask=part["mask"],
            )
        expected += float(ours("gmpo:mean=micro", part).objective) / 2
    run = open_run(tmp_path / "run")
    micro, step = replay_run(
        run, ["gmpo:mean=micro", "gmpo"], config=ReplayConfig(device="cpu")
    ).policies
    assert micro.steps[0]["objective"] == pytest.approx(expected, rel=1e-6)
    assert micro.steps[0]["objective"] == pytest.approx(step.steps[0]["objective"], rel=1e-12)


# ---- reproducibility and refusals ------------------------------------------------------------
def test_clip_cov_draw_is_reproducible_and_seeded():
    data = batch(4, spread=0.3)
    data["adv"] = data["adv"] + (data["adv"] == 0) * 0.5  # every scored token eligible
    spec = "clip-cov:ratio=0.05,lb=-5,ub=5"
    first, again = ours(spec, data), ours(spec, data)
    other = ours(spec + ",seed=7", data)
    assert torch.equal(first.discarded, again.discarded)
    assert torch.equal(first.coef, again.coef)
    assert not torch.equal(first.discarded, other.discarded)
    ppo = ours("ppo", data)
    chosen = first.discarded & ~ppo.discarded
    assert int(chosen.sum()) == max(1, int(0.05 * int(data["mask"].sum())))


def test_tis_needs_logp_rollout_and_valid_bounds():
    data = batch(0)
    with pytest.raises(UsageError, match="logp_rollout"):
        ours("grpo:tis=token-truncate", data)
    for spec, message in (
        ("grpo:tis_max=3", "tis_min and tis_max apply with tis="),
        ("grpo:tis=token-mask,tis_min=3,tis_max=2", "tis_min must be < tis_max"),
        ("grpo:tis=sideways", "tis must be one of"),
        ("kl-cov:ratio=0", "ratio must be a finite number > 0"),
        ("kl-cov:logp_dtype=bfloat16", "logp_dtype=bfloat16 needs cov=micro"),
        ("kl-cov:cov=micro,logp_dtype=float64", "logp_dtype must be one of"),
        ("dppo:logp_dtype=int8", "logp_dtype must be one of"),
        ("clip-cov:lb=5,ub=1", "lb must be < ub"),
        ("dppo:divergence=js", "divergence must be one of tv, kl"),
    ):
        with pytest.raises(UsageError, match=message):
            get_policy(spec)


def test_tis_leaves_the_kl_term_uncorrected():
    data = batch(1)
    ref = data["logp"] + 0.1
    plain = ours("grpo:beta=0.04", data, logp_ref=ref)
    corrected = ours(
        "grpo:beta=0.04,tis=token-truncate,tis_max=1e-9",
        data,
        logp_ref=ref,
        logp_rollout=data["rollout"],
    )
    # a near-zero cap removes the policy-gradient part, never the KL part
    kl_only = ours("grpo:beta=0.04", {**data, "adv": torch.zeros_like(data["adv"])}, logp_ref=ref)
    assert_close(corrected.coef, kl_only.coef, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(plain.coef, corrected.coef)
