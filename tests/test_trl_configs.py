"""GRPOConfig settings users run that the parity runs (tests/trl_scripts/tiny_configs.py) do
not: TRL's own defaults (dapo, on-policy), two reward functions summed after normalising,
sequence-level sampling with beta and an entropy mask, a reference model synced during
training, a rollout begun inside a step, SAPO's temperatures, and chat prompts of several
lengths. Each is trained once, as a user would, with the recording trainer; then, through the
command line as a user reads it, `replay --format json` gives the run's own policy TRL's
logged loss and clip ratios on every step, and `inspect` and the collapse warning raise no
alarm about these short, healthy runs. And the recorder leaves the training as TRL trains it:
the same loss, grad norm and reward, step by step, as an unrecorded `trl.GRPOTrainer`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from _trl import TRL_METRICS, logged_steps, tiny
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.integrations import trl as integration

__all__ = ["tiny"]

TRL_DEFAULTS = {"loss_type": "dapo", "num_iterations": 1, "steps_per_generation": None}
"""TRL's default loss and schedule: one pass over each rollout, a rollout a step."""
CONFIGS: dict[str, dict[str, Any]] = {
    "trl-defaults": TRL_DEFAULTS,
    "normalize-then-sum": {
        "loss_type": "grpo",
        "reward_weights": [1.0, 0.5],
        "multi_objective_aggregation": "normalize_then_sum",
    },
    "gspo-beta-entropy-mask": {
        "loss_type": "grpo",
        "importance_sampling_level": "sequence",
        "beta": 0.1,
        "top_entropy_quantile": 0.5,
    },
    "sync-ref-model": {
        "loss_type": "grpo",
        "beta": 0.1,
        "sync_ref_model": True,
        "ref_model_sync_steps": 2,
        "ref_model_mixup_alpha": 0.5,
    },
    # 3 micro-batches a step, 2 a rollout: dapo's normaliser spans two rollouts in a step
    "rollout-inside-a-step": {
        "loss_type": "dapo",
        "gradient_accumulation_steps": 3,
        "steps_per_generation": 2,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
    },
    "sapo-temperatures": {
        "loss_type": "sapo",
        "sapo_temperature_pos": 2.0,
        "sapo_temperature_neg": 3.0,
    },
    "chat-prompts": {"loss_type": "bnpo", "temperature": 0.7, "top_k": 5},
}
"""GRPOConfig overrides of the tiny run (`tiny_grpo.tiny_config`), by name."""
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}go"
    "{% endif %}"
)
"""A chat template the tiny word-level tokenizer can read: each message's words, then "go"."""


def _length(completions: list[Any], **_: Any) -> list[float]:
    """A second reward: the completion's length in words."""
    return [float(len(text.split())) for text in completions]


def _chat_count_b(completions: list[list[dict[str, str]]], **_: Any) -> list[float]:
    """`count_b` of a conversational completion (one assistant message)."""
    return [float(c[0]["content"].split().count("b")) for c in completions]


def _parts(tiny: Any, name: str, directory: Path) -> dict[str, Any]:
    """The trainer's arguments of config `name` but `args`: a model from a directory when beta
    > 0 (TRL builds the reference model from its path), two rewards with reward weights, chat
    prompts of 2 to 5 words for "chat-prompts"."""
    config = CONFIGS[name]
    tokenizer = tiny.tiny_tokenizer()
    parts: dict[str, Any] = {
        "model": tiny.tiny_model_dir(str(directory / "model"))
        if config.get("beta")
        else tiny.tiny_model(),
        "reward_funcs": [tiny.count_b, _length] if "reward_weights" in config else tiny.count_b,
        "train_dataset": tiny.tiny_dataset(),
        "processing_class": tokenizer,
    }
    if name == "chat-prompts":
        tokenizer.chat_template = CHAT_TEMPLATE
        letters = tiny.WORDS[2:10]
        prompts = [[{"role": "user", "content": " ".join(["say", *letters[: 1 + i % 4]])}]
                   for i in range(8)]  # fmt: skip
        parts["train_dataset"] = tiny.Dataset.from_dict({"prompt": prompts})
        parts["reward_funcs"] = _chat_count_b
    return parts


def _train(tiny: Any, name: str, directory: Path, recorded: bool) -> dict[int, dict[str, Any]]:
    """Trains config `name` in `directory`, recorded into directory/run or by TRL's own
    trainer; returns TRL's logged optimizer steps."""
    parts = _parts(tiny, name, directory)
    args = tiny.tiny_config(str(directory / "trl_out"), **CONFIGS[name])
    if recorded:
        trainer = integration.RecordingGRPOTrainer(
            **parts, args=args, stabledrl_out=directory / "run"
        )
    else:
        trainer = importlib.import_module("trl").GRPOTrainer(**parts, args=args)
    trainer.train()
    return logged_steps(trainer.state.log_history)


@pytest.fixture(scope="module", params=list(CONFIGS))
def recorded(
    request: pytest.FixtureRequest, tiny: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[int, dict[str, Any]]]:
    """(run directory, TRL's logged steps) of one config, trained once for its tests."""
    directory = tmp_path_factory.mktemp(request.param)
    return directory / "run", _train(tiny, request.param, directory, recorded=True)


def test_the_cli_replay_of_the_own_policy_gives_trls_loss_and_clip_ratios(
    recorded: tuple[Path, dict[int, dict[str, Any]]],
) -> None:
    run, logged = recorded
    done = CliRunner().invoke(app, ["replay", str(run), "--format", "json"])
    assert done.exit_code == 0, done.stderr
    own = [p for p in json.loads(done.stdout)["policies"] if p["own"]]
    assert len(own) == 1
    rows = own[0]["steps"]
    assert [row["step"] for row in rows] == sorted(logged)
    for row in rows:
        entry = logged[row["step"]]
        assert -row["objective"] == pytest.approx(entry["loss"], rel=1e-5, abs=1e-7)
        for column, name in TRL_METRICS.items():
            if name in entry:  # sapo logs no clip ratio
                assert row[column] == pytest.approx(entry[name], abs=1e-6), column
    assert own[0]["summary"]["loss_parity"] < 1e-5


def test_inspect_and_the_collapse_warning_raise_no_alarm(
    recorded: tuple[Path, dict[int, dict[str, Any]]],
) -> None:
    run, _ = recorded
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert shown.exit_code == 0, shown.stderr
    assert "warning" not in shown.stderr
    done = runner.invoke(app, ["replay", str(run), "--format", "json"])
    assert "warning" not in done.stderr
    document = json.loads(done.stdout)
    assert document["collapse_warning"]["steps"] == []
    assert document["skipped_steps"] == document["missing_steps"] == 0
    assert all(p["summary"]["collapsed_steps"] == [] for p in document["policies"])


def test_the_recorder_leaves_the_training_as_trl_trains_it(tiny: Any, tmp_path: Path) -> None:
    """The same seed, recorded and not: TRL logs the same loss, grad norm and reward."""
    recorded = _train(tiny, "trl-defaults", tmp_path / "recorded", recorded=True)
    unrecorded = _train(tiny, "trl-defaults", tmp_path / "unrecorded", recorded=False)
    assert sorted(recorded) == sorted(unrecorded) == [1, 2, 3, 4]
    for step, entry in recorded.items():
        for name in ("loss", "grad_norm", "reward", *TRL_METRICS.values()):
            assert entry[name] == unrecorded[step][name], (step, name)
