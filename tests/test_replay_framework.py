"""The frameworks' own clip metrics in a replay equal TRL's and verl's formulas, transcribed
from their sources, per micro-batch and averaged the way each framework logs them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Step
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.columns import TRL_METRICS, VERL_METRICS
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.hdf5 import read_hdf5, write_hdf5

runner = CliRunner()
SEQ_LENGTHS = (4, 6, 3, 5, 7, 2, 5, 4)
"""Eight sequences: the first three form micro-batch 0, the other five micro-batch 1."""
MICRO = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int32)
POLICIES = (
    "grpo", "dapo", "two-sided:delta=1.3", "dual-clip:c=1.5", "gspo:eps_high=0.05,eps_low=0.05",
    "cispo:cap=1.1", "cispo:eps_low=0.1", "sapo", "is", "reinforce", "stabledrl",
)  # fmt: skip


def _step(rng: np.random.Generator) -> dict[str, np.ndarray]:
    seq_id = np.repeat(np.arange(len(SEQ_LENGTHS)), SEQ_LENGTHS).astype(np.int32)
    n = seq_id.size
    reward = rng.random(len(SEQ_LENGTHS)).astype(np.float32)
    adv_seq = np.round(rng.normal(size=len(SEQ_LENGTHS)), 2).astype(np.float32)
    adv_seq[[1, 4]] = 0.0  # A = 0 sequences: scored, in every denominator
    mask = (rng.random(n) > 0.2).astype(np.uint8)  # some padding inside the micro-batches
    logp_old = (-2.0 + rng.normal(size=n)).astype(np.float32)
    logp = (logp_old + 0.3 * rng.normal(size=n)).astype(np.float32)
    return {
        "logp": logp,
        "logp_old": logp_old,
        "advantages": adv_seq[seq_id],
        "mask": mask,
        "seq_id": seq_id,
        "group_id": (np.arange(len(SEQ_LENGTHS)) // 4).astype(np.int32),
        "reward": reward,
    }


def _record(path: Path, *, micro: bool, steps: int = 3) -> Path:
    rng = np.random.default_rng(7)
    with sd.Recorder(path, policy="grpo", unit="token") as rec:
        for step in range(steps):
            arrays = _step(rng)
            extra = {"micro_batch": MICRO} if micro else {}
            rec.log_step(step, **arrays, **extra, loss=0.0, inner_step=0)
    return path


def _padded(arrays: dict[str, torch.Tensor], rows: np.ndarray) -> dict[str, torch.Tensor]:
    """TRL's layout of one micro-batch: (B, L) log-probs and mask, (B, 1) advantages."""
    seq_id = arrays["seq_id"].long().numpy()
    width = max(SEQ_LENGTHS)
    out = {
        "logp": torch.zeros(rows.size, width),
        "logp_old": torch.zeros(rows.size, width),
        "mask": torch.zeros(rows.size, width),
        "advantages": torch.zeros(rows.size, 1),
    }
    for b, row in enumerate(rows):
        tokens = np.flatnonzero(seq_id == row)
        for key in ("logp", "logp_old", "mask"):
            out[key][b, : tokens.size] = arrays[key][tokens].float()
        out["advantages"][b, 0] = arrays["advantages"][tokens[0]]
    return out


def _trl_micro(batch: dict[str, torch.Tensor], spec: str) -> dict[str, float]:
    """TRL 1.16 `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py, lines 3083-3095 for
    coef_1, 3114-3116 for delta, 3255-3286 for the metrics), one process, one micro-batch."""
    policy = get_policy(spec)
    config = policy.config
    mask, advantages = batch["mask"], batch["advantages"]
    log_ratio = batch["logp"] - batch["logp_old"]
    if policy.name == "gspo":  # importance_sampling_level == "sequence"
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    else:
        log_importance_weights = log_ratio
    coef_1 = torch.exp(log_importance_weights)
    if policy.name == "two-sided":
        coef_1 = torch.clamp(coef_1, max=config.delta)

    def global_masked_mean(x: torch.Tensor) -> float:
        if x.shape[1] == 1:
            local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]))
        else:
            local_sum, local_count = (x * mask).sum(), mask.sum().float()
        return float(local_sum / local_count.clamp(min=1.0))

    def masked_seq_mean(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def nanmin(x: torch.Tensor) -> float:  # trl.trainer.utils.nanmin
        return math.nan if torch.isnan(x).all() else float(torch.min(x[~torch.isnan(x)]))

    def nanmax(x: torch.Tensor) -> float:
        return math.nan if torch.isnan(x).all() else float(torch.max(x[~torch.isnan(x)]))

    if policy.name == "cispo":
        is_cispo_clipped = (coef_1 > config.cap) & (advantages > 0)
        return {"trl_cispo_clip_ratio": global_masked_mean(is_cispo_clipped.float())}
    epsilon_low, epsilon_high = config.eps_low, config.eps_high
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    return {
        "trl_clip_ratio_low_mean": global_masked_mean(is_low_clipped.float()),
        "trl_clip_ratio_high_mean": global_masked_mean(is_high_clipped.float()),
        "trl_clip_ratio_region_mean": global_masked_mean(is_region_clipped.float()),
        "trl_clip_ratio_low_min": nanmin(masked_seq_mean(is_low_clipped.float())),
        "trl_clip_ratio_high_max": nanmax(masked_seq_mean(is_high_clipped.float())),
    }


def _verl_micro(batch: dict[str, torch.Tensor], spec: str) -> dict[str, float]:
    """verl 0.9.1 core_algos.compute_policy_loss_vanilla (dual-clip c) / _cispo / _gspo, their
    pg_clipfrac, pg_clipfrac_lower and ppo_kl, with verl_F.masked_mean = sum / (mask.sum() +
    1e-8)."""
    policy = get_policy(spec)
    config = policy.config
    mask = batch["mask"]
    advantages = batch["advantages"].expand_as(mask)

    def masked_mean(values: torch.Tensor) -> float:
        return float((values * mask).sum() / (mask.sum() + 1e-8))

    negative_approx_kl = batch["logp"] - batch["logp_old"]
    low, high = 1 - config.eps_low, 1 + config.eps_high
    if policy.name == "gspo":
        seq_lengths = torch.sum(mask, dim=-1).clamp(min=1)
        seq_kl = torch.sum(negative_approx_kl * mask, dim=-1) / seq_lengths
        ratio = torch.exp(torch.clamp(seq_kl.unsqueeze(-1).expand_as(mask), max=10.0))
        pg_losses1 = -advantages * ratio
        pg_losses2 = -advantages * torch.clamp(ratio, low, high)
        return {
            "verl_pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1).float()),
            "verl_pg_clipfrac_lower": 0.0,
            "verl_ppo_kl": masked_mean(-negative_approx_kl),
        }
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ppo_kl = masked_mean(-negative_approx_kl)
    ratio = torch.exp(negative_approx_kl)
    if policy.name == "cispo":
        clipped_ratio = torch.clamp(ratio, low, high)
        return {
            "verl_pg_clipfrac": masked_mean((ratio != clipped_ratio).float()),
            "verl_pg_clipfrac_lower": 0.0,
            "verl_ppo_kl": ppo_kl,
        }
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, low, high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    out = {
        "verl_pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1).float()),
        "verl_ppo_kl": ppo_kl,
    }
    if policy.name == "dual-clip":
        pg_losses3 = -advantages * config.c
        lower = torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float()
        out["verl_pg_clipfrac_lower"] = masked_mean(lower)
    return out


def _expected(step: Step, spec: str, groups: list[np.ndarray]) -> dict[str, float]:
    """Each framework's metrics of the step: per micro-batch, then their unweighted mean."""
    policy = get_policy(spec)
    clip = policy.name in ("grpo", "dapo", "two-sided", "dual-clip", "gspo")
    cispo_form = getattr(policy.config, "cap", None) is not None  # TRL's form, else verl's
    cells = []
    for rows in groups:
        batch = _padded({k: step[k] for k in step.fields}, rows)
        cell: dict[str, float] = {}
        if clip or (policy.name == "cispo" and cispo_form):
            cell |= _trl_micro(batch, spec)
        if clip or (policy.name == "cispo" and not cispo_form):
            cell |= _verl_micro(batch, spec)
        cells.append(cell)
    # TRL's log drops a NaN micro-batch value before it averages
    valid = {key: [c[key] for c in cells if not math.isnan(c[key])] for key in cells[0]}
    return {key: sum(v) / len(v) if v else math.nan for key, v in valid.items()}


@pytest.mark.parametrize("micro", [True, False], ids=["micro-batches", "whole-step"])
def test_trl_and_verl_metrics_equal_the_frameworks_formulas(tmp_path, micro):
    path = _record(tmp_path / "run", micro=micro)
    result = replay_run(sd.open_run(path), list(POLICIES), config=ReplayConfig(device="cpu"))
    groups = [np.flatnonzero(m == MICRO) for m in (0, 1)] if micro else [np.arange(8)]
    for number in range(3):
        step = sd.open_run(path).step(number)
        for p in result.policies:
            row = p.steps[number]
            expected = _expected(step, p.spec, groups)
            for key in (*TRL_METRICS, *VERL_METRICS):
                if key in expected:
                    assert row[key] == pytest.approx(expected[key], abs=1e-6), (p.spec, key)
                else:
                    assert math.isnan(row[key]) or (p.name == "sapo" and "verl" in key), key
            if p.name == "sapo":
                assert (row["verl_pg_clipfrac"], row["verl_pg_clipfrac_lower"]) == (0.0, 0.0)
            assert row["scored_tokens"] == int(step["mask"].sum())


def test_micro_batches_change_the_mean(tmp_path):
    """The two micro-batches differ in size: their unweighted mean is not the pooled fraction
    (so the test above tells the two apart)."""
    pooled = replay_run(
        sd.open_run(_record(tmp_path / "a", micro=False)),
        ["grpo"],
        config=ReplayConfig(device="cpu"),
    )
    split = replay_run(
        sd.open_run(_record(tmp_path / "b", micro=True)),
        ["grpo"],
        config=ReplayConfig(device="cpu"),
    )
    a = [r["trl_clip_ratio_region_mean"] for r in pooled.policies[0].steps]
    b = [r["trl_clip_ratio_region_mean"] for r in split.policies[0].steps]
    assert a != pytest.approx(b)


def test_counts_json_summary_hdf5_and_table(tmp_path):
    path = _record(tmp_path / "run", micro=True)
    args = ["replay", str(path), "-p", "grpo", "-p", "cispo", "--device", "cpu"]
    data = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    grpo, cispo = data["policies"]
    rows = grpo["steps"]
    assert grpo["summary"]["scored_tokens"] == sum(r["scored_tokens"] for r in rows)
    assert grpo["summary"]["trl_clip_ratio_region_mean"] == pytest.approx(
        np.mean([r["trl_clip_ratio_region_mean"] for r in rows])
    )
    assert (
        grpo["summary"]["trl_cispo_clip_ratio"] is None and rows[0]["trl_cispo_clip_ratio"] is None
    )
    assert cispo["summary"]["trl_clip_ratio_low_mean"] is None
    for r in cispo["steps"]:
        assert r["clipped_pos"] + r["clipped_neg"] == r["clipped"]  # A = 0 never clipped by a cap
    assert cispo["summary"]["clipped_pos"] == sum(r["clipped_pos"] for r in cispo["steps"])
    result = sd.replay(path, ["grpo"], device="cpu")
    report = read_hdf5(write_hdf5(result, tmp_path / "r.h5"))
    assert np.allclose(
        report["policies"][0]["trl_clip_ratio_high_mean"],
        [r["trl_clip_ratio_high_mean"] for r in rows],
    )
    plain = runner.invoke(app, args).stdout
    assert "trl region" not in plain and "verl clipfrac" not in plain
    wide = runner.invoke(app, [*args, "--metrics", "trl", "--metrics", "verl", "--detail"]).stdout
    assert "trl region" in wide and "verl clipfrac" in wide and "clip +A" not in wide
    bad = runner.invoke(app, [*args, "--metrics", "nope"])
    assert bad.exit_code == 2 and "--metrics 'nope'" in bad.output


@pytest.mark.parametrize("spec", ["grpo", "dapo", "dual-clip", "cispo:eps_low=0.2,eps_high=0.2"])
def test_verl_fractions_with_ratios_past_the_clamp_equal_verls_clamped_ratio(spec):
    """The shared hits use the step's own ratio where verl's clamp at e^+-20 moves no ratio
    across a bound: ratios far past the clamp must count as verl's clamped ones do."""
    from stabledrl_cli.policies import PolicyBatch, prepare
    from stabledrl_cli.replay.framework import framework_metrics, micro_batches

    log_ratio = torch.tensor([-30.0, -21.0, -0.5, 0.0, 0.1, 0.5, 1.2, 21.0, 30.0, 90.0])
    adv = torch.tensor([1.0, -1.0, -2.0, 1.0, 0.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    prep = prepare(PolicyBatch(logp=log_ratio, logp_old=torch.zeros(10), advantages=adv, mask=mask))
    policy = get_policy(spec)
    micro = micro_batches(prep, None, torch.arange(10), seq_is_raw=False, where="test")
    got = framework_metrics(prep, [policy], [policy.weights(prep)], micro)
    config = policy.config
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    scored = mask.bool()
    if spec == "cispo:eps_low=0.2,eps_high=0.2":
        hit = (ratio < 0.8) | (ratio > 1.2)
    else:
        hit = ((ratio < 1 - config.eps_low) & (adv < 0)) | ((ratio > 1 + config.high) & (adv > 0))
    den = scored.sum().item() + 1e-8
    expected = (hit & scored).sum().item() / den
    assert got[VERL_METRICS[0]].item() == pytest.approx(expected, rel=1e-12)
    if spec == "dual-clip":
        lower = ((adv < 0) & (ratio > config.c) & scored).sum().item() / den
        assert got[VERL_METRICS[1]].item() == pytest.approx(lower, rel=1e-12)


@pytest.mark.parametrize(
    ("spec", "form"),
    [
        ("dual-clip", "clamped"),  # compute_policy_loss_vanilla
        ("cispo:eps_low=0.2", "clamped"),
        ("sapo", "clamped"),
        ("dppo", "clamped"),
        ("gspo", "raw"),
        ("gmpo", "raw"),  # compute_policy_loss_geo_mean
        ("clip-cov", "raw"),
        ("kl-cov", "abs"),
        ("is", "none"),
        ("cispo:cap=1.1", "none"),  # TRL's form
    ],
)
def test_verl_ppo_kl_takes_each_loss_modes_form(spec, form):
    """verl's ppo_kl: masked_mean(-log r) with log r clamped to [-20, 20] (vanilla, cispo, sapo,
    dppo) or not (gspo, clip_cov, geo_mean); kl_cov logs masked_mean(|log r|); null where
    verl has no such loss."""
    from stabledrl_cli.policies import PolicyBatch, prepare
    from stabledrl_cli.replay.framework import framework_metrics, micro_batches

    log_ratio = torch.tensor([-30.0, -21.0, -0.5, 0.0, 0.1, 0.5, 1.2, 21.0, 30.0, 90.0])
    adv = torch.tensor([1.0, -1.0, -2.0, 1.0, 0.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    batch = PolicyBatch(logp=log_ratio, logp_old=torch.zeros(10), advantages=adv, mask=mask)
    prep = prepare(batch)
    policy = get_policy(spec)
    micro = micro_batches(prep, None, torch.arange(10), seq_is_raw=False, where="test")
    got = framework_metrics(prep, [policy], [policy.weights(prep)], micro)["verl_ppo_kl"].item()
    x = log_ratio.double()
    values = {"clamped": -x.clamp(-20.0, 20.0), "raw": -x, "abs": x.abs()}
    if form == "none":
        assert math.isnan(got)
        return
    expected = float((values[form] * mask).sum()) / (mask.sum().item() + 1e-8)
    assert got == pytest.approx(expected, rel=1e-12)


def test_verl_pg_clipfrac_of_clip_cov_is_the_share_its_draw_zeroes(tmp_path):
    """verl's clip_cov logs pg_clipfrac = masked_mean(corr == 0): the tokens its covariance
    draw chose, max(1, int(ratio x scored)) of them when enough are candidates (here every
    unclipped scored token is, lb < cov < ub holding for all), and no pg_clipfrac_lower. Before,
    replay logged the vanilla clip-hit fraction."""
    path = _record(tmp_path / "run", micro=False)
    spec = "clip-cov:ratio=0.2,lb=-1e9,ub=1e9"
    result = replay_run(sd.open_run(path), [spec], config=ReplayConfig(device="cpu"))
    for number, row in enumerate(result.policies[0].steps):
        scored = int(sd.open_run(path).step(number)["mask"].sum())
        chosen = max(1, int(0.2 * scored))
        assert row["verl_pg_clipfrac"] == pytest.approx(chosen / scored, abs=1e-6)
        assert math.isnan(row["verl_pg_clipfrac_lower"])
