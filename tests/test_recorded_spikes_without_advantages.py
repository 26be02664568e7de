"""The recorded grad-norm spike rule on a healthy TRL run with beta > 0 whose reward saturates:
once every completion of a group scores alike, its advantages are 0 and the step's gradient is
the KL term's alone, hundreds of times smaller than a policy-gradient update. The rule took
those norms as the usual size of an update, and flagged as spikes the steps where one group
scored unevenly again (steps 37, 38, 61 and 63 of a GRPOTrainer run, grpo with beta 0.1,
reward 6 of 6 from step 21 on), in `inspect`, `replay` and `check`'s `spike_steps`. A step
whose scored units all have advantage 0 makes no policy-gradient update, as a step of norm 0
makes none: both are left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.observed import observe

GRAD_NORMS = [
    1.49, 1.28, 0.99, 1.45, 1.14, 1.11, 0.959, 0.467, 0.728, 0.172, 0.762, 0.252, 0.834, 0.17,
    0.369, 0.142, 0.591, 0.118, 0.171, 0.0779, 0.0248, 0.0191, 0.0149, 0.0121, 0.0103, 0.009,
    0.00784, 0.00711, 0.00656, 0.006, 0.00565, 0.00533, 0.00517, 0.00497, 0.00487, 0.00478,
    0.166, 0.106, 0.00442, 0.00437, 0.00447, 0.00456, 0.0046, 0.00459, 0.0047, 0.00488, 0.00508,
    0.00521, 0.00536, 0.00564, 0.00594, 0.00631, 0.00684, 0.00733, 0.00798, 0.00885, 0.00995,
    0.0114, 0.0135, 0.0165, 0.274, 0.0478, 0.216, 0.0652,
]  # fmt: skip
"""The recorded grad norms of steps 1-64 of that run (3 significant digits)."""
SCORED_UNEVENLY = {*range(1, 21), 37, 38, 61, 62, 63, 64}
"""Its steps where some group's rewards differ: a nonzero advantage."""


def _run(path: Path, grad_norms: list[float]) -> Path:
    """A token run of that run's shape: 8 completions of 5 tokens in groups of 4, each step's
    advantages 0 unless it is in SCORED_UNEVENLY, logp_ref beside them (beta 0.1)."""
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo:beta=0.1,kl_is=token") as rec:
        for step, norm in enumerate(grad_norms, start=1):
            logp = -rng.random((8, 5)).astype(np.float32)
            reward = np.full(8, 6.0, dtype=np.float32)
            if step in SCORED_UNEVENLY:
                reward[[0, 5]] = 5.0
            groups = reward.reshape(2, 4)
            advantages = (groups - groups.mean(axis=1, keepdims=True)).reshape(8)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp,
                logp_ref=logp - 0.01,
                advantages=advantages,
                mask=np.ones((8, 5), dtype=np.float32),
                group_id=np.repeat(np.arange(2), 4),
                reward=reward,
                grad_norm=norm,
                inner_step=0,
            )
    return path


def test_steps_without_an_advantage_are_no_history_of_the_spike_rule(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", GRAD_NORMS)
    assert observe(sd.open_run(run)).recorded_spike_steps == []
    shown = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["observed"]["recorded_spike_steps"] == []
    replayed = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "--format", "json"])
    assert replayed.exit_code == 0, replayed.stderr
    assert json.loads(replayed.stdout)["observed"]["recorded_spike_steps"] == []


@pytest.mark.parametrize("step", [37, 61])
def test_a_spike_among_the_policy_gradient_steps_is_still_one(tmp_path: Path, step: int) -> None:
    norms = list(GRAD_NORMS)
    norms[step - 1] = 20.0  # 10x the median of the previous 20 policy-gradient norms is ~4
    run = _run(tmp_path / "run", norms)
    assert observe(sd.open_run(run)).recorded_spike_steps == [step]
