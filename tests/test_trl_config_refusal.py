"""A TRL configuration the catalogue cannot express is refused by the recording trainer from
its arguments, before TRL's own `__init__` loads the model (a reference model, a vLLM engine)
or creates its output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _trl import tiny

from stabledrl_cli.errors import UsageError

__all__ = ["tiny"]

REFUSAL = (
    "cannot record this TRL run: sequence-level sampling with loss_type 'cispo'; only 'grpo', "
    "'bnpo', 'dr_grpo', 'dapo', 'luspo', 'vespo' map"
)


@pytest.mark.parametrize("positional", [False, True])
def test_a_refused_config_is_refused_before_trl_loads_the_model(
    tiny: Any, tmp_path: Path, positional: bool
) -> None:
    """Before: TRL's __init__ ran first, so the model path was loaded (here it names no model:
    TRL's OSError came instead of the refusal) and TRL's output_dir created."""
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    model = str(tmp_path / "no-model")
    config = tiny.tiny_config(
        str(tmp_path / "trl_out"), loss_type="cispo", importance_sampling_level="sequence"
    )
    given: dict[str, Any] = {"stabledrl_out": tmp_path / "run"}
    with pytest.raises(UsageError) as refused:
        if positional:  # GRPOTrainer(model, reward_funcs, args, train_dataset)
            RecordingGRPOTrainer(model, tiny.count_b, config, tiny.tiny_dataset(), **given)
        else:
            RecordingGRPOTrainer(
                model=model,
                reward_funcs=tiny.count_b,
                args=config,
                train_dataset=tiny.tiny_dataset(),
                **given,
            )
    assert str(refused.value) == REFUSAL
    assert list(tmp_path.iterdir()) == []


def test_a_rollout_func_is_seen_before_trl_builds_the_trainer(tiny: Any, tmp_path: Path) -> None:
    """The early check maps a config as the built trainer does: a rollout_func (rows=all) is
    no refusal, and the trainer records the spec it maps to."""
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    trainer = RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="grpo"),
        rollout_func=tiny.env_masked_rollout(),
        stabledrl_out=tmp_path / "run",
    )
    assert trainer.stabledrl_policy.spec == "grpo:rows=all"


def test_arguments_that_are_no_grpo_config_are_left_to_trl(tiny: Any, tmp_path: Path) -> None:
    """A TrainingArguments given as args is TRL's to refuse, in its own words: the early check
    reads a GRPOConfig only."""
    from transformers import TrainingArguments

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    with pytest.raises(AttributeError, match="'TrainingArguments' object has no attribute") as info:
        RecordingGRPOTrainer(
            **tiny.tiny_parts(),
            args=TrainingArguments(str(tmp_path / "trl_out"), use_cpu=True, report_to="none"),
            stabledrl_out=tmp_path / "run",
        )
    assert "loss_type" not in str(info.value)  # (the catalogue mapping's first read)


ROUTER_REFUSAL = (
    "cannot record this TRL run: the MoE router loss (router_aux_loss_coef 0.001, the model "
    "config's unless the TRL config sets it) is not in the catalogue; router_aux_loss_coef=0.0 "
    "in the TRL config trains without it"
)


@pytest.mark.parametrize("trainer", ["RecordingGRPOTrainer", "RecordingRLOOTrainer"])
def test_an_moe_model_with_its_default_router_loss_is_refused_saying_where_it_comes_from(
    tiny: Any, tmp_path: Path, trainer: str
) -> None:
    """A Mixture-of-Experts model whose TRL config never sets router_aux_loss_coef: TRL adds
    the router loss with the model config's coefficient. Before, the refusal named
    router_aux_loss_coef alone, a setting the script never gave, and said nothing of how to
    train without it; with router_aux_loss_coef=0.0 the run records."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from stabledrl_cli.integrations import trl as integration

    def moe() -> Any:
        torch.manual_seed(0)
        config = Qwen3MoeConfig(
            vocab_size=12, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            num_experts=2, num_experts_per_tok=1, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        assert config.router_aux_loss_coef == 0.001
        return Qwen3MoeForCausalLM(config)

    make_config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config

    def recording(**config: Any) -> Any:
        return getattr(integration, trainer)(
            model=moe(),
            reward_funcs=tiny.count_b,
            args=make_config(str(tmp_path / "trl_out"), **config),
            train_dataset=tiny.tiny_dataset(),
            processing_class=tiny.tiny_tokenizer(),
            stabledrl_out=tmp_path / "run",
        )

    with pytest.raises(UsageError) as refused:
        recording()
    assert str(refused.value) == ROUTER_REFUSAL
    assert recording(router_aux_loss_coef=0.0).stabledrl_policy is not None
