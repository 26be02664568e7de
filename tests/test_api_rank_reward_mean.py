"""A step joined from ranks has the reward_mean the same step recorded from one process has:
each rank weighted by its scored (not NaN) rewards, `_scored_rewards` in its header. A rank
with every reward NaN poisoned the run's reward series (NaN); one with some NaN was weighted by
all its sequences. A run recorded before the count joins by sequences, as it did."""

from __future__ import annotations

import math

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.rollouts import REWARD_DRAW_SCALARS, run_reward_draws


def _log(recorder: sd.Recorder, reward: list[float], given: bool) -> None:
    """One step of `reward`; with `given`, its reward_mean given too (the mean of the scored
    ones, as a caller that computes its own may give it)."""
    count = len(reward)
    logp = np.zeros((count, 2), dtype=np.float32)
    rewards = np.array(reward, dtype=np.float32)
    scored = rewards[~np.isnan(rewards)]
    recorder.log_step(
        0, logp=logp, logp_old=logp, advantages=np.zeros(count, dtype=np.float32),
        group_id=np.arange(count), reward=rewards,
        reward_mean=(float(scored.mean()) if scored.size else math.nan) if given else None,
    )  # fmt: skip


def _joined_and_alone(path, rewards: list[list[float]], given: bool = False) -> tuple[float, float]:
    with (
        sd.Recorder(path / "ranks", world_size=2, rank=0, policy=None) as first,
        sd.Recorder(path / "ranks", world_size=2, rank=1, policy=None) as second,
    ):
        _log(first, rewards[0], given)
        _log(second, rewards[1], given)
    with sd.Recorder(path / "one", policy=None) as alone:
        _log(alone, rewards[0] + rewards[1], given)
    joined = sd.open_run(path / "ranks").step(0).scalars["reward_mean"]
    return joined, sd.open_run(path / "one").step(0).scalars["reward_mean"]


def test_a_rank_whose_rewards_are_all_nan_leaves_the_others_mean(tmp_path):
    joined, alone = _joined_and_alone(tmp_path, [[1.0, 0.0, 1.0], [math.nan, math.nan]])
    assert joined == alone
    assert math.isclose(joined, 2 / 3)


@pytest.mark.parametrize("given", [False, True])
def test_a_rank_with_some_rewards_nan_is_weighted_by_its_scored_ones(tmp_path, given):
    """Rank 0 scored one of its two sequences: the join weighted it by both (2:2, 0.825),
    where one process takes the mean of the three scored rewards (0.7667)."""
    joined, alone = _joined_and_alone(tmp_path, [[1.0, math.nan], [0.5, 0.8]], given)
    assert math.isclose(alone, (1.0 + 0.5 + 0.8) / 3, rel_tol=1e-6)
    assert math.isclose(joined, alone, rel_tol=1e-12)


def test_a_run_recorded_without_the_scored_count_joins_by_sequences(tmp_path):
    """A run written before `_scored_rewards` (an older recorder) still reads: its ranks are
    weighted by their sequences, as then."""
    from safetensors.numpy import load_file

    from stabledrl_cli.dump._step_encoding import encode_step
    from stabledrl_cli.dump._stfile import read_header

    def rewrite(file, scored: str | None) -> None:
        metadata = read_header(file, deep=False).metadata
        kept = {k: v for k, v in metadata.items() if not k.startswith(("_crc32", "_scored_r"))}
        kept.update({} if scored is None else {"_scored_rewards": scored})
        file.write_bytes(b"".join(encode_step(load_file(file), kept)))

    _joined_and_alone(tmp_path, [[1.0, math.nan], [0.5, 0.8]])
    files = sorted((tmp_path / "ranks" / "steps").iterdir())
    counts = [read_header(file, deep=False).metadata["_scored_rewards"] for file in files]
    assert counts == ["1", "2"]
    for file in files:
        rewrite(file, None)
    run = sd.open_run(tmp_path / "ranks")
    assert run.integrity.ok
    assert math.isclose(run.step(0).scalars["reward_mean"], (1.0 * 2 + 0.65 * 2) / 4, rel_tol=1e-6)
    rewrite(files[1], "3")  # more scored rewards than the rank's 2 sequences
    broken = sd.open_run(tmp_path / "ranks")
    assert broken.step_numbers == []
    assert "3 scored rewards of 2 sequences" in broken.integrity.findings[0].message


def _log_parts(path, parts: list[list[float]]) -> float:
    """One step whose rewards are split over len(parts) ranks as `parts` (a rank's part may
    be empty); the joined step's reward_mean."""
    recorders = [
        sd.Recorder(path, world_size=len(parts), rank=rank, policy=None)
        for rank in range(len(parts))
    ]
    for recorder, rewards in zip(recorders, parts, strict=True):
        _log(recorder, rewards, False)
        recorder.close()
    return sd.open_run(path).step(0).scalars["reward_mean"]


@pytest.mark.parametrize("empty", [0, 1, 3])
def test_a_rank_with_an_empty_part_leaves_the_others_mean(tmp_path, empty):
    """A rank with no sequence at a step records no reward_mean: the join took rank 0's mean
    alone (0.5 of 4 ranks' 0.6), or none at all when rank 0's part was the empty one."""
    parts = [[1.0, 0.0], [1.0], [0.0, 1.0]]
    parts.insert(empty, [])
    assert _log_parts(tmp_path, parts) == pytest.approx(0.6)


def test_a_joined_steps_reward_count_is_its_ranks_together(tmp_path):
    """`reward_count`, the rewards a step's reward_mean is a mean of (its weight in its
    rollout's draw), is each rank's own: the joined step's is their sum, as its mean is over
    all of them."""
    logp = np.zeros((2, 2), dtype=np.float32)
    for rank, count in enumerate((2.0, 1.0)):
        with sd.Recorder(tmp_path, world_size=2, rank=rank, policy=None) as recorder:
            recorder.log_step(
                0, logp=logp, logp_old=logp, advantages=np.zeros(2, dtype=np.float32),
                reward=np.array([1.0, math.nan if count == 1 else 0.0], dtype=np.float32),
                scalars={"reward_count": count},
            )  # fmt: skip
    assert sd.open_run(tmp_path).step(0).scalars["reward_count"] == 3


@pytest.mark.parametrize("count", [-1.0, 2.5, math.nan, math.inf])
def test_a_reward_count_that_is_no_count_is_refused(tmp_path, count):
    logp = np.zeros((2, 2), dtype=np.float32)
    refused = pytest.raises(UsageError, match=r"^scalars: .reward_count. is how many .*, got ")
    with sd.Recorder(tmp_path, policy=None) as recorder, refused:
        recorder.log_step(
            0, logp=logp, logp_old=logp, advantages=np.zeros(2, dtype=np.float32),
            scalars={"reward_count": count},
        )  # fmt: skip


def test_a_rank_that_logged_no_reward_count_counts_the_rewards_its_mean_adds(tmp_path):
    """Of a rollout of two steps, 4 rewards of 1 then 4 of 0 over 2 ranks, rank 1 logging no
    reward_count at the first: the join counted rank 0's 2 there against the 4 its mean is
    over, the draw 1/3 where the rollout's mean is 0.5."""
    for rank in (0, 1):
        with sd.Recorder(tmp_path, world_size=2, rank=rank, policy=None) as recorder:
            for step, reward in enumerate((1.0, 0.0)):
                counted = rank == 0 or step == 1
                recorder.log_step(
                    step, logp=np.zeros((2, 2), dtype=np.float32),
                    logp_old=np.zeros((2, 2), dtype=np.float32),
                    advantages=np.zeros(2, dtype=np.float32),
                    reward=np.full(2, reward, dtype=np.float32), inner_step=step,
                    scalars={"reward_count": 2.0} if counted else None,
                )  # fmt: skip
    run = sd.open_run(tmp_path)
    assert run.step(0).scalars["reward_count"] == 4
    series = run.scalar_series_many(REWARD_DRAW_SCALARS)
    assert run_reward_draws(series)[1].tolist() == [0.5]
