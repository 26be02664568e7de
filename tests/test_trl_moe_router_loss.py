"""A Mixture-of-Experts model, whose router loss TRL adds to the policy's (the model config's
`router_aux_loss_coef` unless the TRL config sets one), records: the step keeps TRL's loss,
as TRL logs it, and the router's part apart (`loss_aux`), so that the run's own policy
replays to the rest. Before, the trainer refused every such model unless the script trained
without the router loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _trl import logged_steps, tiny

import stabledrl_cli as sd

__all__ = ["tiny"]


def _moe() -> Any:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=12, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=2, num_experts_per_tok=1, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    assert config.router_aux_loss_coef == 0.001
    return Qwen3MoeForCausalLM(config)


@pytest.mark.parametrize("trainer", ["RecordingGRPOTrainer", "RecordingRLOOTrainer"])
def test_an_moe_models_router_loss_is_recorded_apart(
    tiny: Any, tmp_path: Path, trainer: str
) -> None:
    from stabledrl_cli.integrations import trl as integration

    make_config = tiny.tiny_rloo_config if "RLOO" in trainer else tiny.tiny_config
    out = tmp_path / "run"
    recording = getattr(integration, trainer)(
        model=_moe(),
        reward_funcs=tiny.count_b,
        args=make_config(str(tmp_path / "trl_out"), gradient_accumulation_steps=2),
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        stabledrl_out=out,
    )
    recording.train()
    logged = logged_steps(recording.state.log_history)
    run = sd.open_run(out)
    assert run.manifest["meta"]["router_aux_loss_coef"] == 0.001
    assert run.step_numbers == sorted(logged)
    for step in run:  # TRL's loss, router loss included, as its dashboard shows it
        assert step.scalars["loss"] == pytest.approx(logged[step.step]["loss"], rel=1e-5)
        assert 0 < step.scalars["loss_aux"] < 0.01
        # TRL logs the router's loss, a mean over the step's micro-batches (one per
        # accumulation step): its term in the loss is the coefficient times that mean
        logged_term = 0.001 * logged[step.step]["aux_loss"]
        assert step.scalars["loss_aux"] == pytest.approx(logged_term, rel=1e-5)
    own = sd.replay(out, [recording.stabledrl_policy.spec], device="cpu").own
    assert own is not None
    parity = own.summary.loss_parity
    assert parity is not None and parity < 1e-5, parity
    for number, value in zip(own.series["step"], own.series["objective"], strict=True):
        step = run.step(int(number))
        policy_part = step.scalars["loss"] - step.scalars["loss_aux"]
        assert -value == pytest.approx(policy_part, rel=1e-5, abs=1e-7)
