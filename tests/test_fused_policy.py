"""benchmarks/fused_policy.py's one-function grpo row is the replay's row: on a small synthetic
step and its two damaged copies, run eagerly (the benchmark checks its compiled package the
same way on the cached run's steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fused_policy import INPUTS, damaged, deviations, grpo_row
from synthetic_runs import Shape, step_arrays

from stabledrl_cli.policies import PolicyBatch, get_policy, prepare
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.framework import micro_batches
from stabledrl_cli.replay.metrics import step_metrics
from stabledrl_cli.replay.step_geometry import StepGeometry


def _step() -> dict[str, torch.Tensor]:
    """One step of 32 sequences of 64 positions, flat as a run stores it."""
    raw = step_arrays(Shape(1, 32, 64), seed=3, step=0)
    sequences, length = 32, 64

    def tensor(name: str) -> torch.Tensor:
        value = raw[name]
        assert isinstance(value, np.ndarray)
        return torch.from_numpy(value)

    return {
        "logp": tensor("logp").reshape(-1),
        "logp_old": tensor("logp_old").reshape(-1),
        "advantages": tensor("advantages").repeat_interleave(length),
        "mask": tensor("mask").to(torch.uint8).reshape(-1),
        "seq_id": torch.arange(sequences, dtype=torch.int32).repeat_interleave(length),
        "group_id": tensor("group_id"),
        "reward": tensor("reward"),
    }


def _replayed(arrays: dict[str, torch.Tensor]) -> torch.Tensor:
    names = ("logp", "logp_old", "advantages", "mask", "seq_id", "group_id", "reward")
    prep = prepare(PolicyBatch(**{name: arrays[name] for name in names}))
    micro = micro_batches(prep, None, arrays["seq_id"], seq_is_raw=True, where="step")
    policy = get_policy("grpo")
    return step_metrics(prep, [policy], [policy.weights(prep)], StepGeometry("coef"), 0, micro)


def test_the_fused_row_is_the_replays() -> None:
    step = _step()
    for arrays in [step, *damaged(step)]:
        row = grpo_row(*(arrays[name] for name in INPUTS))
        assert max(deviations(row, _replayed(arrays)).values()) <= 1e-6


def test_the_damaged_steps_take_the_guards_paths() -> None:
    """The damaged copies make non-finite coefficients (so the check above covers the guards):
    one from the overflowed ratio A < 0 keeps, three from the non-finite inputs."""
    at = columns.device_metrics().index("nonfinite_coefs")
    overflowed, broken = damaged(_step())
    assert [_replayed(arrays)[0, at].item() for arrays in (overflowed, broken)] == [1.0, 3.0]
