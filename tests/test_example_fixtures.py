"""The committed fixtures: a grpo run that collapses and a stabledrl run (same seed) that holds.

They come from `fixtures/make.sh`; these tests check what they show and that the example
still produces them (the first steps, regenerated in-process, match the recorded arrays).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stabledrl_cli.dump import open_run
from stabledrl_cli.example.trainer import ExampleConfig, train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RUNS = ("grpo", "stabledrl")


def _rewards(name: str) -> np.ndarray:
    _, values = open_run(FIXTURES / name).scalar_series("reward_mean")
    return np.asarray(values, dtype=np.float64)


def _window_means(rewards: np.ndarray) -> tuple[float, float]:
    window = max(10, len(rewards) // 10)
    return float(rewards[:window].mean()), float(rewards[-window:].mean())


def test_fixtures_are_small_and_share_everything_but_the_policy():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024
    configs = {}
    for name in RUNS:
        manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
        assert manifest["policy"]["name"] == name
        config = dict(manifest["meta"]["example_config"])
        assert config.pop("policy") == name
        configs[name] = config
        assert manifest["unit"] == "sequence" and manifest["reward_range"] == [0.0, 1.0]
    assert configs["grpo"] == configs["stabledrl"]
    assert len(open_run(FIXTURES / "grpo")) == len(open_run(FIXTURES / "stabledrl"))


def test_grpo_fixture_collapses_and_stabledrl_holds():
    grpo_start, grpo_end = _window_means(_rewards("grpo"))
    sdrl_start, sdrl_end = _window_means(_rewards("stabledrl"))
    # Observed-collapse rule of docs/collapse.md: below half of the best rolling mean (floor 0).
    assert grpo_end < 0.5 * grpo_start, (grpo_start, grpo_end)
    assert sdrl_end > sdrl_start, (sdrl_start, sdrl_end)
    grpo_norms = open_run(FIXTURES / "grpo").scalar_series("grad_norm")[1]
    sdrl_norms = open_run(FIXTURES / "stabledrl").scalar_series("grad_norm")[1]
    assert np.nanmax(np.where(np.isfinite(grpo_norms), grpo_norms, np.nan)) > 10 * np.nanmax(
        sdrl_norms
    )


@pytest.mark.parametrize("name", RUNS)
def test_the_example_still_produces_the_fixtures_first_steps(name):
    manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
    config = ExampleConfig(**{**manifest["meta"]["example_config"], "steps": 4})
    fresh = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixtures/make.sh runs single-threaded
    try:
        train(config, on_step=fresh.append)
    finally:
        torch.set_num_threads(threads)
    run = open_run(FIXTURES / name)
    for info in fresh:
        recorded = run.step(info.step)
        assert int(recorded.scalars["inner_step"]) == info.inner_step
        for key in ("seq_id", "group_id", "reward", "mask"):
            assert torch.equal(recorded[key].to(info.arrays[key].dtype), info.arrays[key]), key
        for key in ("logp", "logp_old", "advantages"):
            # Other CPUs may reorder float sums: close, not necessarily bit-identical.
            torch.testing.assert_close(recorded[key], info.arrays[key], rtol=1e-4, atol=1e-4)
