"""`diff` compares reward_mean one value a rollout, as the observed-collapse rule reads it
(`rollouts.reward_draws`): a recording whose rollouts are trained over several steps (TRL's
steps_per_generation above gradient_accumulation_steps, num_iterations > 1) holds each step's
own reward, where the framework's log holds one a rollout, its mean. The same training read
from both parted at the rollout's first step on reward_mean (0.375 vs TRL's 0.3125)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import Recorder

STEPS = range(1, 9)
INNER = [0, 1, 2, 3, 0, 1, 2, 3]
"""Two rollouts of 4 steps each, from step 1 and step 5 (TRL's spg 4, GA 2, 2 iterations)."""
REWARDS = [0.375, 0.25, 0.375, 0.25, 1.0, 0.75, 1.0, 0.75]
"""Each step's own batch reward: the rollouts' means are 0.3125 and 0.875."""


def _recording(path: Path, rewards: list[float], steps: int = 8) -> Path:
    """A recording of policy batches, one rollout over 4 steps, each step's own reward."""
    logp = np.zeros(4, np.float32)
    with Recorder(path, policy="grpo", unit="sequence") as rec:
        for step, inner, reward in list(zip(STEPS, INNER, rewards, strict=True))[:steps]:
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32),
                loss=0.1 * step, reward_mean=reward, inner_step=inner,
            )  # fmt: skip
    return path


def _log(path: Path, rollout_rewards: dict[int, float]) -> Path:
    """The framework's log of the same training: a loss a step, a reward a rollout."""
    with Recorder(path, policy=None) as rec:
        for step in STEPS:
            rewards = {"reward_mean": rollout_rewards[step]} if step in rollout_rewards else {}
            rec.log_step(step, loss=0.1 * step, **rewards)  # type: ignore[arg-type]
    return path


def _diff(a: Path, b: Path) -> tuple[int, dict]:
    done = CliRunner().invoke(app, ["diff", str(a), str(b), "--device", "cpu", "-f", "json"])
    assert done.exit_code in (0, 1), done.output
    return done.exit_code, json.loads(done.stdout)


def test_a_recording_and_its_log_of_one_rollout_a_reward_do_not_part(tmp_path: Path) -> None:
    """The same training: the recording's rollout means are the log's rewards. It parted at
    step 1 (reward_mean 0.375 vs 0.3125), exit 1, and listed reward_mean as recorded by the
    recording alone (steps 2-4, 6-8)."""
    recording = _recording(tmp_path / "recorded", REWARDS)
    exit_code, data = _diff(recording, _log(tmp_path / "log", {1: 0.3125, 5: 0.875}))
    assert (exit_code, data["parted_at"], data["first"]["scalars"]) == (0, None, None)
    assert data["first"]["arrays"] is None
    assert data["unshared"] == {"a": ["inner_step"], "b": []}
    # a log with a reward inside the recording's rollout: compared with the step's own there
    exit_code, data = _diff(recording, _log(tmp_path / "more", {1: 0.3125, 2: 0.25, 5: 0.875}))
    assert (exit_code, data["parted_at"], data["unshared"]) == (
        0,
        None,
        {"a": ["inner_step"], "b": []},
    )


@pytest.mark.parametrize(("changed", "parted_at"), [(1, 1), (2, 1), (6, 5), (8, 5)])
def test_runs_whose_rollout_rewards_differ_part_at_the_rollouts_first_step(
    tmp_path: Path, changed: int, parted_at: int
) -> None:
    """A step's reward that changes its rollout's mean parts the runs at the rollout's first
    step (its draw's), where the rule reads it, whichever of its steps it is."""
    rewards = [r + (0.5 if s == changed else 0.0) for s, r in zip(STEPS, REWARDS, strict=True)]
    recording = _recording(tmp_path / "recorded", rewards)
    exit_code, data = _diff(recording, _log(tmp_path / "log", {1: 0.3125, 5: 0.875}))
    assert (exit_code, data["parted_at"]) == (1, parted_at)
    fields = data["first"]["scalars"]["fields"]
    what = {1: "0.4375 vs 0.3125", 5: "1 vs 0.875"}[parted_at]
    assert fields == [{"field": "reward_mean", "what": what}]
    # side by side: the rollout's reward as compared, at its first step; each step's own too
    rows = {row["step"]: row for row in data["around"]}
    assert rows[parted_at]["a"]["reward_draw"] == float(what.split(" vs ")[0])
    assert rows[parted_at]["b"]["reward_draw"] == rows[parted_at]["b"]["reward_mean"]
    assert rows[parted_at + 1]["a"]["reward_mean"] == rewards[parted_at]
    assert rows[parted_at + 1]["a"]["reward_draw"] is None
    table = CliRunner().invoke(app, ["diff", str(recording), str(tmp_path / "log")]).stdout
    assert f"parted at step {parted_at}" in table
    # against a recording of the same rollouts, with the rewards before the change
    other = _recording(tmp_path / "other", REWARDS)
    exit_code, data = _diff(recording, other)
    assert (exit_code, data["first"]["scalars"]["step"]) == (1, parted_at)


def test_a_recording_cut_inside_a_rollout_does_not_part_from_the_whole_one(
    tmp_path: Path,
) -> None:
    """Rollout means are taken over the steps both runs hold: a run stopped at step 6, inside
    its second rollout, agrees with the run that went on to step 8 on the steps it holds."""
    whole = _recording(tmp_path / "whole", REWARDS)
    cut = _recording(tmp_path / "cut", REWARDS, steps=6)
    exit_code, data = _diff(whole, cut)
    assert (exit_code, data["parted_at"], data["only_a"]) == (0, None, [[7, 8]])
    assert data["first"] == dict.fromkeys(("arrays", "inputs", "logprobs", "scalars"))


def test_a_reward_inside_a_rollout_that_differs_still_parts_there(tmp_path: Path) -> None:
    """Each step's own reward is compared where both runs record it: two logs whose first
    rollout's mean is 0.3125 (a NaN is left out of a mean), step 2's reward NaN in one and
    0.25 in the other, part at step 2; they are never called identical."""
    runs = []
    for name, first in (("a", [0.375, float("nan"), 0.3125, 0.25]), ("b", REWARDS[:4])):
        with Recorder(tmp_path / name, policy=None) as rec:
            for step, inner, reward in zip(STEPS, INNER, [*first, *REWARDS[4:]], strict=True):
                rec.log_step(step, loss=0.5, reward_mean=reward, inner_step=inner)
        runs.append(tmp_path / name)
    exit_code, data = _diff(*runs)
    assert (exit_code, data["parted_at"], data["identical"]) == (1, 2, False)
    assert data["first"]["scalars"]["fields"] == [{"field": "reward_mean", "what": "nan vs 0.25"}]


def test_a_rollout_begun_inside_a_step_is_compared_at_that_step(tmp_path: Path) -> None:
    """TRL's gradient_accumulation_steps 4, steps_per_generation 2, num_iterations 3: rollouts
    begin at steps 1 and 4 and inside steps 2 and 5 (whose first micro-batches train the one
    before: inner_step 1), and TRL logs `reward` at 1, 2, 4, 5. The draws merged steps 2-3
    into step 1's rollout (0.3125 against TRL's 0.375): the recording parted from its log at
    step 1. A step's `rollout_reward` (the capture's mark of the rollouts begun in it, TRL's
    number) starts a draw there, its value; a run without it reads as before."""
    logged = {1: 0.375, 2: 0.25, 4: 1.375, 5: 0.75}
    own = [0.375, 0.3125, 0.25, 1.375, 1.0625, 0.75]

    def recording(path: Path, begun: dict[int, float]) -> Path:
        logp = np.zeros(4, np.float32)
        with Recorder(path, policy="grpo", unit="sequence") as rec:
            for step, inner, reward in zip(range(1, 7), [0, 1, 1, 0, 1, 1], own, strict=True):
                mark = {"rollout_reward": begun[step]} if step in begun else {}
                rec.log_step(
                    step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32),
                    loss=0.1 * step, reward_mean=reward, inner_step=inner, scalars=mark,
                )  # fmt: skip
        return path

    log = tmp_path / "log"
    with Recorder(log, policy=None) as rec:
        for step in range(1, 7):
            rewards = {"reward_mean": logged[step]} if step in logged else {}
            rec.log_step(step, loss=0.1 * step, **rewards)  # type: ignore[arg-type]
    exit_code, data = _diff(recording(tmp_path / "marked", logged), log)
    assert (exit_code, data["parted_at"], data["unshared"]) == (
        0,
        None,
        {"a": ["inner_step"], "b": []},
    )
    exit_code, data = _diff(recording(tmp_path / "older", {}), log)
    assert (exit_code, data["parted_at"]) == (1, 1)
    assert data["first"]["scalars"]["fields"] == [
        {"field": "reward_mean", "what": "0.3125 vs 0.375"}
    ]
    exit_code, data = _diff(recording(tmp_path / "other", {**logged, 2: 0.5}), tmp_path / "marked")
    assert (exit_code, data["parted_at"]) == (1, 2)
    assert data["first"]["scalars"]["fields"] == [{"field": "reward_mean", "what": "0.5 vs 0.25"}]


def test_the_table_shows_the_reward_compared_where_a_rollouts_first_step_is_not_shared(
    tmp_path: Path,
) -> None:
    """A log of every second step (TRL's TensorBoard log, logging_steps 2, which does not
    say so) against the recording: no rollout's first step is shared, so each shared step's
    own reward is compared, and the parting names it (0.25 vs 0.3125). The side-by-side
    table showed `-` for the recording there, the value the parting line compared unseen."""
    recording = _recording(tmp_path / "recorded", REWARDS)
    with Recorder(tmp_path / "log", policy=None) as rec:
        for step, reward in ((2, 0.3125), (4, None), (6, 0.875), (8, None)):
            rewards = {} if reward is None else {"reward_mean": reward}
            rec.log_step(step, loss=0.1 * step, **rewards)  # type: ignore[arg-type]
    exit_code, data = _diff(recording, tmp_path / "log")
    assert (exit_code, data["parted_at"]) == (1, 2)
    parting = {f["field"]: f["what"] for f in data["first"]["scalars"]["fields"]}
    assert parting == {"reward_mean": "0.25 vs 0.3125"}
    shown = {
        row["step"]: (row["a"]["reward_draw"], row["b"]["reward_draw"]) for row in data["around"]
    }
    assert shown == {2: (0.25, 0.3125), 4: (0.25, None), 6: (0.75, 0.875), 8: (0.75, None)}
