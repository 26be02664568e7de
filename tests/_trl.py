"""What the TRL integration tests share (tests/test_integration_trl.py for GRPOTrainer,
tests/test_integration_trl_rloo.py for RLOOTrainer): the tiny run's helpers, a child
process's environment, the tiny run trained under a recording trainer, TRL's logged steps,
the check that an RLOO run's own policy replays TRL's log."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from _ports import free_port

import stabledrl_cli as sd

SCRIPTS = Path(__file__).parent / "trl_scripts"
sys.path.insert(0, str(SCRIPTS))
SKIP_REASON = "the TRL integration tests need trl 1.16 (pip install -e '.[trl]')"
TRAINERS = ["RecordingGRPOTrainer", "RecordingRLOOTrainer"]
"""The recording trainers, by name (attributes of stabledrl_cli.integrations.trl)."""
TRL_METRICS = {
    "trl_clip_ratio_low_mean": "clip_ratio/low_mean",
    "trl_clip_ratio_high_mean": "clip_ratio/high_mean",
    "trl_clip_ratio_region_mean": "clip_ratio/region_mean",
    "trl_clip_ratio_low_min": "clip_ratio/low_min",
    "trl_clip_ratio_high_max": "clip_ratio/high_max",
}
"""Replay's column -> the name TRL logs it under."""


@pytest.fixture(scope="module")
def tiny() -> Any:
    """The tiny-run helpers (imports trl, transformers and datasets)."""
    pytest.importorskip("trl", reason=SKIP_REASON)
    import tiny_grpo

    return tiny_grpo


def child_env() -> dict[str, str]:
    """The environment for a child process: this checkout first, then the tiny helpers."""
    root = Path(__file__).resolve().parents[1]
    paths = [str(root), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.pop("STABLEDRL_RUN_DIR", None)
    return env


def train(
    tiny: Any,
    out: Path,
    *,
    rloo: bool = False,
    callbacks: list[Any] | None = None,
    peft_config: Any = None,
    **config: Any,
) -> Any:
    """The tiny run recorded into `out` by RecordingGRPOTrainer (RecordingRLOOTrainer when
    `rloo`) with these config overrides, the trainer's `callbacks` and `peft_config` (a LoRA
    adapter), trained; returns the trainer. beta > 0 loads the model from a directory (TRL
    builds the reference model from its path)."""
    from stabledrl_cli.integrations import trl as integration

    model = (
        tiny.tiny_model_dir(str(out.parent / "model")) if config.get("beta") else tiny.tiny_model()
    )
    trainer_class = integration.RecordingRLOOTrainer if rloo else integration.RecordingGRPOTrainer
    make_config = tiny.tiny_rloo_config if rloo else tiny.tiny_config
    trainer = trainer_class(
        model=model,
        reward_funcs=tiny.count_b,
        args=make_config(str(out.parent / "trl_out"), **config),
        train_dataset=tiny.tiny_dataset(),
        processing_class=tiny.tiny_tokenizer(),
        callbacks=callbacks,
        peft_config=peft_config,
        stabledrl_out=out,
    )
    trainer.train()
    return trainer


def logged_steps(log_history: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """TRL's log_history entries of optimizer steps, by step number."""
    return {h["step"]: h for h in log_history if "loss" in h and "grad_norm" in h}


def assert_replays_trl_rloo(out: Path, spec: str, logged: dict[int, dict[str, Any]]) -> Any:
    """The RLOO run's own policy, replayed, gives TRL's loss (1e-6 relative) and clip ratios
    (1e-6) on every step; returns the own policy's replay."""
    own = sd.replay(out, policies=[spec], device="cpu").own
    assert own is not None and own.spec == spec
    assert own.series["step"].tolist() == sorted(logged)
    for i, number in enumerate(own.series["step"].tolist()):
        entry = logged[number]
        assert -own.series["objective"][i] == pytest.approx(entry["loss"], rel=1e-6)
        for column, name in TRL_METRICS.items():
            assert own.series[column][i] == pytest.approx(entry[name], abs=1e-6), column
    assert own.summary.loss_parity is not None and own.summary.loss_parity < 1e-6
    return own


def torchrun(script: str, *args: str) -> list[str]:
    """The command running trl_scripts/`script` with `args` on 2 local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(SCRIPTS / script), *args]  # fmt: skip
