"""A prompt group split across optimizer steps or ranks is never silently two groups: the
recorded `group_split` makes advantage re-normalisation refuse, and adv=recorded still works."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli import PolicyBatch, get_policy
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError


def _batch(group_split: list[int] | None) -> PolicyBatch:
    logp = torch.tensor([-1.0, -1.1, -0.9, -1.2])
    return PolicyBatch(
        logp=logp,
        logp_old=logp - 0.05,
        advantages=torch.tensor([0.5, -0.5, 1.0, -1.0]),
        mask=torch.ones(4, dtype=torch.uint8),
        group_id=torch.tensor([0, 0, 1, 1]),
        reward=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        group_split=None if group_split is None else torch.tensor(group_split),
        unit="sequence",
    )


@pytest.mark.parametrize("mode", ["center", "zscore", "rloo"])
def test_recomputing_advantages_of_a_split_group_is_refused(mode: str) -> None:
    policy = get_policy(f"grpo:adv={mode}")
    with pytest.raises(UsageError, match="2 sequences of this step belong to groups split"):
        policy.weights(_batch([0, 0, 1, 1]))
    assert torch.isfinite(policy.weights(_batch([0, 0, 0, 0])).coef).all()


def test_recorded_advantages_of_a_split_group_replay_as_recorded() -> None:
    split = get_policy("grpo").weights(_batch([1, 1, 1, 1])).coef
    whole = get_policy("grpo").weights(_batch(None)).coef
    assert torch.equal(split, whole)


def test_a_replay_refused_for_a_split_group_names_the_step(tmp_path: Path) -> None:
    """`replay -p grpo:adv=zscore` of a run whose step 1 holds part of a group said 'error:
    adv=zscore recomputes ... 2 sequences of this step belong to groups split ...', naming no
    step of the run: it now names the run and the step, exit 2 as before."""
    with sd.Recorder(tmp_path / "run", policy="grpo", unit="sequence") as recorder:
        for step, split in ((0, [0, 0, 0, 0]), (1, [0, 0, 1, 1])):
            batch = _batch(split)
            recorder.log_step(
                step,
                logp=batch.logp,
                logp_old=batch.logp_old,
                advantages=batch.advantages,
                group_id=batch.group_id,
                reward=batch.reward,
                group_split=np.array(split, dtype=np.uint8),
            )
    result = CliRunner().invoke(app, ["replay", str(tmp_path / "run"), "-p", "grpo:adv=zscore"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'run'}: step 1: adv=zscore recomputes" in " ".join(result.stderr.split())
