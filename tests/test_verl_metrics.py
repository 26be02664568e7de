"""`replay --metrics verl` against verl 0.9.1's own loss functions on the same tensors: for
every loss mode the integration records, every loss_agg_mode, with rollout importance weights
and without, under moderate ratios and ratios past verl's clamps (log r beyond +-20, GSPO's
sequence log ratio beyond 10), replay's verl_pg_clipfrac, verl_pg_clipfrac_lower and
verl_ppo_kl of each step are the mean over its micro-batches of what verl's `ppo_loss` logged
(NaN where verl logs none: gpg, kl_cov's clip fractions)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

from test_integration_verl import actor_config, micro_batches, record, rollout

from stabledrl_cli.dump import open_run
from stabledrl_cli.integrations._verl_policy import AGG_MODES, LOSS_MODES
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run

METRICS = ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
ASYMMETRIC = {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3}
SETTINGS: dict[str, dict[str, Any]] = {
    "kl_cov": {"policy_loss": {"kl_cov_ratio": 0.2}},  # enough tokens to penalise
}
"""Per loss mode, actor settings beside loss_mode, loss_agg_mode and ASYMMETRIC."""
DUAL_CLIPS = [
    pytest.param("vanilla", {"clip_ratio_c": 1.5}, id="vanilla-c1.5"),
    pytest.param("vanilla", {"clip_ratio_c": 10.0, "clip_ratio_low": 0.1}, id="vanilla-c10"),
    pytest.param("dppo_tv", {"clip_ratio_c": 1.05}, id="dppo-tv-c1.05"),
    pytest.param("dppo_kl", {"clip_ratio_c": 3.0}, id="dppo-kl-c3"),
]


def replayed_against_verl(
    mode: str,
    settings: dict[str, Any],
    agg: str,
    tmp_path: Path,
    make: Callable[[float], Any] = lambda scale: rollout(scale=scale),
) -> dict[str, list[tuple[float, float]]]:
    """metric -> (verl's mean over a step's micro-batches, replay's) for every step of the
    four recordings (rollout weights or not, moderate or extreme ratios) of the rollouts
    `make(scale)` gives."""
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in METRICS}
    for n, (weights, scale) in enumerate((w, s) for w in (True, False) for s in (0.6, 12.0)):
        config = actor_config(loss_mode=mode, loss_agg_mode=agg, **settings)
        steps = micro_batches(make(scale), mini=6, micro=2, with_weights=weights)
        captured, _ = record(config, steps, tmp_path / f"run{n}")
        run = open_run(tmp_path / f"run{n}")
        (replayed,) = replay_run(
            run, [run.policy_spec or ""], config=ReplayConfig(device="cpu")
        ).policies
        for step, micro in zip(run, captured, strict=True):
            row = replayed.steps[step.step]
            for name in METRICS:
                logged = [m.metrics[f"actor/{name}"] for m in micro if f"actor/{name}" in m.metrics]
                verl = sum(logged) / len(micro) if len(logged) == len(micro) else math.nan
                ours = row[f"verl_{name}"]
                pairs[name].append((verl, math.nan if ours is None else float(ours)))
    return pairs


def assert_equal(pairs: dict[str, list[tuple[float, float]]]) -> None:
    for name, values in pairs.items():
        for verl, ours in values:
            assert (math.isnan(verl) and math.isnan(ours)) or ours == pytest.approx(
                verl, rel=1e-5, abs=1e-6
            ), (name, verl, ours)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_verl_metrics_equal_verls_own_on_the_same_tensors(
    mode: str, agg: str, tmp_path: Path
) -> None:
    pairs = replayed_against_verl(mode, {**ASYMMETRIC, **SETTINGS.get(mode, {})}, agg, tmp_path)
    assert_equal(pairs)
    if mode not in ("gpg", "kl_cov", "sapo"):  # the clip (trust region, GMPO bound) binds
        assert any(verl > 0 for verl, _ in pairs["pg_clipfrac"])
    if mode != "gpg":
        assert any(verl != 0 for verl, _ in pairs["ppo_kl"])


@pytest.mark.parametrize(("mode", "settings"), DUAL_CLIPS)
def test_verl_metrics_equal_verls_own_under_other_dual_clips(
    mode: str, settings: dict[str, Any], tmp_path: Path
) -> None:
    """verl's clip_ratio_c: the dual clip of vanilla, the truncation of dppo."""
    pairs = replayed_against_verl(mode, settings, "token-mean", tmp_path)
    assert_equal(pairs)
    assert any(verl > 0 for verl, _ in pairs["pg_clipfrac_lower"])


def test_the_legend_says_what_verl_lower_counts_for_each_policy() -> None:
    """The per-step table's legend of `--metrics verl`: verl's pg_clipfrac_lower is not the
    dual clip's for dppo (inside its trust region, r > c) nor gmpo (A < 0 and log r outside
    [-eps_low, eps_high]), and verl logs 0 for gspo, cispo and sapo; pg_clipfrac likewise."""
    from stabledrl_cli.replay import columns
    from stabledrl_cli.replay.report import detail_legend

    lines = detail_legend(columns.table_columns(("verl",)), [])
    (lower,) = [line for line in lines if line.startswith("verl lower")]
    (clip,) = [line for line in lines if line.startswith("verl clipfrac")]
    assert "dual-clip: A < 0 and r > c" in lower
    assert "dppo: inside its trust region and r > c" in lower
    assert "gmpo: A < 0 and log r outside [-eps_low, eps_high]" in lower
    assert "0 for gspo, cispo and sapo" in lower
    assert "dppo: outside its trust region" in clip
    assert "gmpo: A > 0 and log r outside [-eps_low, eps_high]" in clip


def nan_rollout(scale: float) -> Any:
    """A `rollout` whose model gives a NaN log-prob on a scored token (a step that blew up)."""
    td = rollout(scale=scale)
    td["_logp"][1, 0] = math.nan
    return td


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_verl_metrics_equal_verls_own_with_a_nan_log_prob(mode: str, tmp_path: Path) -> None:
    """verl counts cispo's clip as r != clamp(r) and geo_mean's as log r != clamp(log r), which
    a NaN ratio passes: the replay counts that token clipped as verl logs it."""
    settings = {**ASYMMETRIC, **SETTINGS.get(mode, {})}
    assert_equal(replayed_against_verl(mode, settings, "token-mean", tmp_path, nan_rollout))


def neg_inf_rollout(scale: float) -> Any:
    """A `rollout` whose model gives a sampled token probability 0 (log-prob -inf), in a row
    of A < 0 (row 4)."""
    td = rollout(scale=scale)
    td["_logp"][4, 0] = -math.inf
    return td


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_verl_metrics_equal_verls_own_with_a_log_prob_of_minus_inf(
    mode: str, tmp_path: Path
) -> None:
    """verl's gspo ratio of a token is exp(log_prob - log_prob.detach() + mean log r), NaN
    where log_prob is -inf (its sequence's other tokens have the ratio 0): verl counts that
    token unclipped, the others clipped (A < 0), and so does the replay."""
    settings = {**ASYMMETRIC, **SETTINGS.get(mode, {})}
    assert_equal(replayed_against_verl(mode, settings, "token-mean", tmp_path, neg_inf_rollout))
