"""A hand-written loop that numbers its inner updates from 1 (`for it in range(1, mu + 1)`)
records a reward_mean on every step, but no step at inner_step 0, where a rollout starts:
the observed-collapse rule reads no reward from it. inspect and replay say why, not that the
run recorded no reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _inspect import inspect_rows
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.errors import UsageError

STEPS = 12


def _record(run: Path, first_inner_step: int) -> None:
    with sd.Recorder(run, policy="grpo", reward_range=(0.0, 1.0)) as rec:
        for step in range(STEPS):
            g = torch.Generator().manual_seed(step)
            logp = -torch.rand(4, 5, generator=g)
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=torch.randn(4, generator=g),
                reward=torch.full((4,), 0.5),
                group_id=torch.tensor([0, 0, 1, 1]),
                inner_step=first_inner_step + step % 2,
            )


def test_a_loop_counting_inner_steps_from_1_is_told_why_no_reward_is_read(
    tmp_path: Path,
) -> None:
    run = tmp_path / "from1"
    _record(run, first_inner_step=1)
    reason = (
        "the run's 12 steps with a reward_mean all record inner_step above 0, later updates "
        "of a rollout that starts at inner_step 0 on no step of the run (inner_step counts a "
        "rollout's updates from 0)"
    )
    rows = inspect_rows(run)
    assert rows["reward (rolling mean)"] == f"none read: {reason}"
    assert rows["first reward collapse"] == f"not judged: {reason}"
    result = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    observed = json.loads(result.stdout)["observed"]
    assert (observed["reward_steps"], observed["reward_values"]) == (STEPS, 0)


def test_a_loop_counting_from_0_reads_one_reward_a_rollout(tmp_path: Path) -> None:
    run = tmp_path / "from0"
    _record(run, first_inner_step=0)
    rows = inspect_rows(run)
    assert rows["reward (rolling mean)"].startswith("first 0.5, best 0.5, last 0.5")
    result = CliRunner().invoke(app, ["inspect", str(run), "--format", "json"])
    observed = json.loads(result.stdout)["observed"]
    assert (observed["reward_steps"], observed["reward_values"]) == (STEPS, STEPS // 2)


def test_a_run_without_reward_still_says_so(tmp_path: Path) -> None:
    run = tmp_path / "none"
    with sd.Recorder(run, policy="grpo") as rec:
        logp = -torch.rand(4, 5)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.ones(4), inner_step=1)
    rows = inspect_rows(run)
    assert rows["reward (rolling mean)"] == "no reward recorded"
    assert rows["first reward collapse"] == "not judged: the run recorded no reward_mean"


@pytest.mark.parametrize("given", [-1, 0.5, 1.5, math.nan, math.inf, torch.tensor(-1)])
def test_an_inner_step_that_counts_no_updates_is_refused(tmp_path: Path, given: object) -> None:
    """-1 (a loop's 'unknown'), a fraction or NaN would be recorded and read as no rollout's
    first update: the noise floor and the collapse warning would measure no step."""
    with sd.Recorder(tmp_path / "run", policy="grpo") as rec:
        logp = -torch.rand(4, 5)
        with pytest.raises(UsageError, match=r"^inner_step: .* a whole number >= 0 .*, got "):
            rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.ones(4), inner_step=given)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=torch.ones(4), inner_step=2)
    assert sd.open_run(tmp_path / "run").step(0).scalars["inner_step"] == 2
