"""Healthy real TRL runs raise no alarm, and replay gives TRL's own figures on configurations
the parity runs (tests/trl_scripts/tiny_configs.py, tests/test_trl_configs.py) leave out.

`saturated`: 40 steps of grpo with beta 0.1 whose reward reaches its maximum (6 of 6) and
stays there, every group then scoring alike on most steps: `inspect` and `replay` flagged
steps 39 and 40 as recorded grad-norm spikes, where one group scored unevenly again after
steps whose gradient was the KL term's alone (tests/test_recorded_spikes_without_advantages.py
has the rule).

`accumulated`: a rollout given as `generation_batch_size` (16 completions, 8 micro-batches of
2 rows) over `gradient_accumulation_steps=4`, two passes over it, dapo with an asymmetric
`epsilon_high`, and a model whose attention dropout TRL keeps on (its default
`disable_dropout=False`): each forward pass draws its own dropout, so log r is not 0 at the
rollout's first step. The replayed objective and clip ratios are TRL's logged loss and
`clip_ratio/*` of every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _trl import TRL_METRICS, logged_steps, tiny
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.integrations import trl as integration

__all__ = ["tiny"]

SATURATED = {
    "loss_type": "grpo",
    "beta": 0.1,
    "learning_rate": 0.06,
    "max_steps": 40,
    "seed": 1,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": 1,
}
ACCUMULATED = {
    "loss_type": "dapo",
    "epsilon_high": 0.28,
    "generation_batch_size": 16,
    "steps_per_generation": None,
    "gradient_accumulation_steps": 4,
    "per_device_train_batch_size": 2,
    "max_steps": 8,
}
ATTENTION_DROPOUT = 0.2


def _train(
    tiny: Any, directory: Path, config: dict[str, Any], dropout: float = 0.0
) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Trains the tiny run with `config` (its model seeded by the config's seed, with this
    attention dropout; from a directory when beta > 0, where TRL builds the reference model
    from its path), recorded into directory/run; returns (run, TRL's logged steps)."""
    seed = config.get("seed", 0)
    model = tiny.tiny_model(seed)
    model.config.attention_dropout = dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = dropout
    if config.get("beta"):
        model.save_pretrained(directory / "model")
        model = str(directory / "model")
    trainer = integration.RecordingGRPOTrainer(
        model=model,
        reward_funcs=tiny.count_b,
        args=tiny.tiny_config(str(directory / "trl_out"), **config),
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        stabledrl_out=directory / "run",
    )
    trainer.train()
    return directory / "run", logged_steps(trainer.state.log_history)


@pytest.fixture(scope="module")
def saturated(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, _ = _train(tiny, tmp_path_factory.mktemp("saturated"), SATURATED)
    return run


@pytest.fixture(scope="module")
def accumulated(
    tiny: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[int, dict[str, Any]]]:
    return _train(tiny, tmp_path_factory.mktemp("accumulated"), ACCUMULATED, ATTENTION_DROPOUT)


def _json(command: list[str]) -> dict[str, Any]:
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 0, done.stderr
    assert "warning" not in done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_a_saturated_run_with_beta_raises_no_alarm(saturated: Path) -> None:
    steps = list(sd.open_run(saturated))
    alike = [s.step for s in steps if not (s["advantages"] != 0).any()]
    assert len(alike) > 10 and steps[-1].step not in alike  # scored unevenly again at the end
    shown = _json(["inspect", str(saturated), "--format", "json"])["observed"]
    assert shown["recorded_spike_steps"] == []
    assert shown["first_reward_collapse"] is None
    replayed = _json(["replay", str(saturated), "--format", "json"])
    assert replayed["observed"]["recorded_spike_steps"] == []
    assert replayed["observed"]["first_reward_collapse"] is None
    assert replayed["collapse_warning"]["steps"] == []
    (own,) = [p for p in replayed["policies"] if p["own"]]
    assert own["summary"]["collapsed_steps"] == own["summary"]["drift_steps"] == []


def test_generation_batch_accumulation_and_dropout_replay_trls_figures(
    accumulated: tuple[Path, dict[int, dict[str, Any]]],
) -> None:
    run, logged = accumulated
    assert sd.open_run(run).policy_spec == "dapo:agg=recorded"  # eps_high 0.28: dapo's default
    replayed = _json(["replay", str(run), "--format", "json"])
    assert replayed["observed"]["noise_floor_logratio_std"] > 0  # dropout: log r != 0
    (own,) = [p for p in replayed["policies"] if p["own"]]
    assert [row["step"] for row in own["steps"]] == sorted(logged)
    for row in own["steps"]:
        entry = logged[row["step"]]
        assert -row["objective"] == pytest.approx(entry["loss"], rel=1e-5, abs=1e-7)
        for column, name in TRL_METRICS.items():
            assert row[column] == pytest.approx(entry[name], abs=1e-6), column
    assert max(e["clip_ratio/region_mean"] for e in logged.values()) > 0  # some clipped
    assert replayed["collapse_warning"]["steps"] == []
