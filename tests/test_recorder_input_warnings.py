"""What the Recorder warns of as it records, once a run: inputs it records as given that a
training should hear of while it trains, not after (a refusal would break the training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app


def _inspected(run: Path) -> dict[str, object]:
    """`inspect RUN --format json`'s object."""
    shown = CliRunner().invoke(app, ["inspect", str(run), "-f", "json"])
    assert shown.exit_code == 0, shown.output
    loaded: dict[str, object] = json.loads(shown.stdout)
    return loaded


def _batch(reward: list[float]) -> dict[str, np.ndarray]:
    """A unit 'sequence' policy batch of one group, its rewards `reward`."""
    n = len(reward)
    logp = np.full(n, -1.0, dtype=np.float32)
    return {
        "logp": logp,
        "logp_old": logp,
        "advantages": np.ones(n, dtype=np.float32),
        "reward": np.array(reward, dtype=np.float32),
        "group_id": np.zeros(n, dtype=np.int32),
    }


def test_rewards_outside_the_declared_range_are_warned_of_once_as_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """+-1 rewards recorded with reward_range=(0, 1): nothing was said until inspect or replay,
    after the training. The first step holding one warns, once; every step is recorded, and
    inspect's line on it is as before."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo", unit="sequence", reward_range=(0, 1)) as rec:
        rec.log_step(0, **_batch([1.0, 0.0]))
        for step in range(1, 4):
            rec.log_step(step, **_batch([1.0, -1.0 * step]))
    assert capsys.readouterr().err == (
        f"stabledrl: warning: {run}: step 1: a reward of -1 lies outside the run's "
        "reward_range [0.0, 1.0], which the collapse rule reads: declare the range the "
        "rewards span (said once)\n"
    )
    assert sd.open_run(run).step_numbers == [0, 1, 2, 3]
    assert _inspected(run)["reward_range"] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"reward_mean": 3.5}, "a reward_mean of 3.5"),
        ({"reward_mean": float("inf")}, "a reward_mean of inf"),
        ({"reward_mean": 0.5}, None),
        ({"reward_mean": float("nan")}, None),
    ],
)
def test_a_scalar_steps_reward_mean_outside_the_range_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kwargs: dict[str, float], said: str | None
) -> None:
    """A scalar step's reward_mean (an import's, the hooks') is a reward the rule reads too;
    NaN is no reward (nothing scored)."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None, reward_range=(0, 1), world_size=2, rank=1) as rec:
        rec.log_step(0, **kwargs)
    err = capsys.readouterr().err
    if said is None:
        assert err == ""
    else:
        assert err.startswith(f"stabledrl: warning: {run} (rank 1): step 0: {said} lies outside")


def test_rewards_at_a_range_end_that_float32_rounds_up_are_inside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """reward_range=(0, 0.3) and rewards of 0.3, stored as float32 (0.3000000119): 'a reward
    of 0.3 lies outside the run's reward_range [0.0, 0.3]', and so did the step's reward_mean
    of them. A reward is compared as it is stored, and the mean of rewards in range is in it."""
    with sd.Recorder(tmp_path / "a", policy="grpo", unit="sequence", reward_range=(0, 0.3)) as rec:
        rec.log_step(0, **_batch([0.3, 0.3]))
    assert capsys.readouterr().err == ""


def test_rewards_inside_the_range_or_with_no_range_are_not_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rewards at the range's ends, NaN ones (a completion not scored), and any reward of a
    run that declares no range: nothing said."""
    with sd.Recorder(tmp_path / "a", policy="grpo", unit="sequence", reward_range=(0, 1)) as rec:
        rec.log_step(0, **_batch([0.0, 1.0, float("nan")]))
    with sd.Recorder(tmp_path / "b", policy="grpo", unit="sequence") as rec:
        rec.log_step(0, **_batch([-5.0, 7.0]))
    assert capsys.readouterr().err == ""


def _tokens(logp: list[float], **more: object) -> dict[str, object]:
    """A unit 'token' policy batch of one sequence, its log-probs `logp` (logp_old alike)."""
    values = np.array(logp, dtype=np.float32)
    return {
        "logp": values,
        "logp_old": more.pop("logp_old", values),
        "advantages": np.ones(len(logp), dtype=np.float32),
        "seq_id": np.zeros(len(logp), dtype=np.int32),
        **more,
    }


def test_positive_log_probabilities_are_warned_of_once_and_marked_in_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Logits passed as logp (values > 0, which no log-probability nor ELBO estimate of one
    takes) were recorded silently, and replayed as ratios of nonsense. log_step warns at the
    first such step, once, and records it as given (recording never breaks the training);
    inspect lists every such step, its table and its JSON."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        rec.log_step(0, **_tokens([-1.0, -0.5]))
        rec.log_step(1, **_tokens([-1.0, 2.5, 0.5]))
        rec.log_step(2, **_tokens([-1.0, -2.0], logp_ref=np.array([-1.0, 0.25], "float32")))
        rec.log_step(3, **_tokens([-1.0, -2.0]))
    assert capsys.readouterr().err == (
        f"stabledrl: warning: {run}: step 1: logp holds a positive value (2.5) among its "
        "scored entries, where a log-probability, and an ELBO estimate of one, is <= 0: "
        "logits, or a sign flipped? (recorded as given; inspect lists such steps; said once)\n"
    )
    assert sd.open_run(run).step_numbers == [0, 1, 2, 3]
    assert _inspected(run)["positive_logp"] == {
        "steps": [1, 2],
        "first_field": "logp",
        "first_largest": 2.5,
    }
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "250"})
    row = next(line for line in table.stdout.splitlines() if "log-probabilities" in line)
    assert (
        "positive in 2 steps (1, 2; logp up to 2.5 at step 1): a log-probability is <= 0: "
        "logits, or a sign flipped?" in row
    )


def test_log_probabilities_at_most_0_or_not_scored_are_not_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0 (a certain token), a positive value under mask 0 (padding), and NaN or inf (counted
    as the step's `nonfinite`, said there): nothing said, and inspect shows no row."""
    run = tmp_path / "run"
    mask = np.array([[1, 1, 0]], dtype=np.uint8)
    with sd.Recorder(run, policy="grpo") as rec:
        logp = np.array([[0.0, -1.0, 7.0]], dtype=np.float32)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(1, "float32"), mask=mask)
        rec.log_step(1, **_tokens([float("nan"), float("inf"), -1.0]))
    assert capsys.readouterr().err == ""
    assert _inspected(run)["positive_logp"] is None
    table = CliRunner().invoke(app, ["inspect", str(run)], env={"COLUMNS": "250"})
    assert "log-probabilities" not in table.stdout


def test_a_log_softmax_rounded_above_0_is_not_warned_of_and_a_clear_positive_value_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A float32 log_softmax of a dominant logit, here x - log(sum(exp(x))), can round a
    log-probability a unit in the last place above 0 (1.2e-7): 0 rounded, not logits, so
    nothing is said of it, at record time or in inspect, up to `LOGP_ROUNDING`; a value
    clearly above it (2e-4) is warned of."""
    logits = np.array([1.8299149, -18.170085, -23.170085], dtype=np.float32)
    rounded = logits - np.log(np.exp(logits).sum())
    assert 0 < rounded[0] < 1e-6  # the rounding the bound is for
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as rec:
        rec.log_step(0, **_tokens([float(rounded[0]), -1.0]))
        rec.log_step(1, **_tokens([-1.0, -0.5], logp_ref=np.array([-1.0, 1e-4], "float32")))
    assert capsys.readouterr().err == ""
    assert _inspected(run)["positive_logp"] is None
    with sd.Recorder(run, policy="grpo", resume=True) as rec:
        rec.log_step(2, **_tokens([-1.0, 2e-4]))
    assert "step 2: logp holds a positive value (0.0002)" in capsys.readouterr().err
    assert _inspected(run)["positive_logp"] == {
        "steps": [2],
        "first_field": "logp",
        "first_largest": pytest.approx(2e-4),
    }


_ROUNDED_SUM = np.float32(1000 * 1.2e-7)
"""The sum of 1000 near-certain tokens' log-probabilities, each rounded 1.2e-7 above 0."""


def _counted_sequences(run: Path) -> None:
    """A unit 'sequence' run of 2 steps recording token_count: step 0 holds a sum of 1000
    rounded tokens (`_ROUNDED_SUM`); step 1 the same sum, and 2e-4 for a one-token sequence
    (given first, as id 1: a count is its sequence's, by seq_id)."""
    with sd.Recorder(run, policy="grpo", unit="sequence") as rec:
        logp = np.array([_ROUNDED_SUM, -1.0], dtype=np.float32)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(2, "float32"),
                     token_count=np.array([1000, 3]))  # fmt: skip
        logp = np.array([2e-4, _ROUNDED_SUM], dtype=np.float32)
        rec.log_step(1, logp=logp, logp_old=logp, advantages=np.ones(2, "float32"),
                     seq_id=np.array([1, 0]), token_count=np.array([1000, 1]))  # fmt: skip


def test_a_sequence_entry_is_bounded_by_its_token_count_as_it_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under unit 'sequence' an entry sums its sequence's token log-probabilities: 1000
    near-certain tokens sum to 1.2e-4, past the one-token bound `LOGP_ROUNDING`, and were
    warned of as logits. With `token_count` recorded an entry's bound is LOGP_ROUNDING times
    its count: nothing is said of that sum, and a one-token sequence at 2e-4 is warned of."""
    _counted_sequences(tmp_path / "run")
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1
    assert "step 1: logp holds a positive value (0.0002)" in said[0]


def test_inspect_bounds_a_sequence_entry_by_its_token_count(tmp_path: Path) -> None:
    """inspect's list of steps holding a positive log-probability agrees with the Recorder:
    the step whose only positive entry is a sum of 1000 rounded tokens is not in it."""
    _counted_sequences(tmp_path / "run")
    assert _inspected(tmp_path / "run")["positive_logp"] == {
        "steps": [1],
        "first_field": "logp",
        "first_largest": pytest.approx(2e-4),
    }


def test_a_sequence_entry_without_token_count_is_bounded_as_one_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A unit 'sequence' step that records no token_count says nothing of its sequences'
    lengths: each entry is bounded as one token's (docs/recording.md), so that a flipped sign
    of a short sequence is still heard of; the same sum of 1000 rounded tokens is warned of."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo", unit="sequence") as rec:
        logp = np.array([_ROUNDED_SUM, -1.0], dtype=np.float32)
        rec.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(2, "float32"))
    assert "step 0: logp holds a positive value (0.00012)" in capsys.readouterr().err
    assert _inspected(run)["positive_logp"] == {
        "steps": [0],
        "first_field": "logp",
        "first_largest": pytest.approx(1.2e-4),
    }
