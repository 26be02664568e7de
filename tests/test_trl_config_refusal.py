"""A TRL configuration the catalogue cannot express is refused by the recording trainer from
its arguments, before TRL's own `__init__` loads the model (a reference model, a vLLM engine)
or creates its output directory; one it came to express is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _trl import logged_steps, tiny, train

import stabledrl_cli as sd
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


@pytest.mark.parametrize(
    "epsilon_high, warned",
    [
        (None, "epsilon_high unset caps each token's ratio at epsilon, 0.2,"),
        (0.28, "=0.28"),
        (5.0, None),
    ],
)
def test_a_cispo_cap_under_1_is_warned_of_and_recorded_as_trl_trains(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], epsilon_high: Any, warned: Any
) -> None:
    """TRL 1.16's cispo caps each ratio at epsilon_high, which unset is epsilon (0.2): measured
    on the tiny run, every gradient was 0.2 times epsilon_high=5.0's (grad_norm 0.238 vs 1.190
    at step 1) and cispo_clip_ratio 0.29 (each A > 0 token) vs 0, with nothing said. One line
    on stderr now names the setting; the spec stays TRL's cap."""
    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    trainer = RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(
            str(tmp_path / "trl_out"), loss_type="cispo", epsilon_high=epsilon_high
        ),
        stabledrl_out=tmp_path / "run",
    )
    cap = 0.2 if epsilon_high is None else epsilon_high
    assert trainer.stabledrl_policy.params["cap"] == cap
    lines = [line for line in capsys.readouterr().err.splitlines() if "stabledrl" in line]
    if warned is None:
        assert lines == []
    else:
        (line,) = lines
        assert line.startswith("stabledrl: warning: loss_type='cispo' with ") and warned in line
        assert "epsilon_high=5.0" in line


def test_the_cispo_warning_is_one_line_a_run_not_one_a_rank(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun every rank printed the same cispo warning (one line per rank); only the
    main process prints it now."""
    from accelerate import Accelerator

    from stabledrl_cli.integrations.trl import RecordingGRPOTrainer

    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    RecordingGRPOTrainer(
        **tiny.tiny_parts(),
        args=tiny.tiny_config(str(tmp_path / "trl_out"), loss_type="cispo"),
        stabledrl_out=tmp_path / "run",
    )
    assert "cispo" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "spec"),
    [
        ({"loss_type": "grpo"}, "gspo:beta=0.04,eps_high=0.2,eps_low=0.2,kl_is=sequence"),
        (
            {"loss_type": "dapo"},
            "gspo:agg=recorded,beta=0.04,eps_high=0.2,eps_low=0.2,kl_is=sequence",
        ),
        ({"loss_type": "vespo"}, "vespo:agg=recorded,beta=0.04,kl_is=sequence"),
        (
            {"loss_type": "grpo", "use_bias_correction_kl": False},
            "gspo:beta=0.04,eps_high=0.2,eps_low=0.2",
        ),
    ],
)
def test_trls_kl_correction_at_the_sequence_level_maps_to_kl_is_sequence(
    tiny: Any, config: dict[str, Any], spec: str
) -> None:
    """Sequence-level sampling with beta and use_bias_correction_kl (TRL's default) was refused
    ("set use_bias_correction_kl=False"); TRL multiplies the KL by its sequence ratio coef_1,
    vespo's too, which kl_is=sequence is."""
    from stabledrl_cli.integrations.trl import policy_for_config

    args = tiny.tiny_config("unused", importance_sampling_level="sequence", beta=0.04, **config)
    assert policy_for_config(args).spec == spec


def test_a_gspo_run_with_trls_kl_correction_replays_trls_loss(tiny: Any, tmp_path: Path) -> None:
    """The tiny run, GSPO with beta 0.1 and TRL's default KL correction, 2 steps: its own
    policy replays TRL's logged loss (measured: equal, 0.2484 at step 2, where kl_is=token
    gives 0.2492 and no correction 0.2482)."""
    out = tmp_path / "run"
    trainer = train(
        tiny, out, loss_type="grpo", importance_sampling_level="sequence", beta=0.1, max_steps=2
    )
    spec = trainer.stabledrl_policy.spec
    assert spec == "gspo:beta=0.1,eps_high=0.2,eps_low=0.2,kl_is=sequence"
    logged = logged_steps(trainer.state.log_history)
    own = sd.replay(out, [spec], device="cpu").own
    assert own is not None and own.series["step"].tolist() == [1, 2]
    for number, objective in zip(own.series["step"], own.series["objective"], strict=True):
        assert -objective == pytest.approx(logged[int(number)]["loss"], rel=1e-5, abs=1e-7)
    assert own.summary.loss_parity is not None and own.summary.loss_parity < 1e-6
