"""A run that stops learning from its rewards: on a tiny TRL run (dapo, seed 4, 40 steps,
`mask_truncated_completions=True`, a reward favouring long answers) every completion ran to the
length limit from some rollout on and was masked whole, so no token was scored, the update was
zero, and the reward fell from 2.3 to 0.0; the observed-collapse rule (10 rollouts are one
window) did not flag it, and nothing said the run stopped learning. `inspect` and `replay` now
name such a streak of policy-batch steps, keeping its two causes apart: no token scored (an
all-zero mask) and no scored unit with a nonzero advantage (every group scored alike)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli.cli.app import app
from stabledrl_cli.replay.hdf5 import read_hdf5

STEPS = 40


def _run(path: Path, *, masked: set[int] = frozenset(), alike: set[int] = frozenset()) -> Path:
    """A token run of 8 completions of 5 tokens in groups of 4, one step a rollout: the steps in
    `masked` score no token (an all-zero mask), those in `alike` give every completion of a
    group the same reward (advantage 0)."""
    rng = np.random.default_rng(0)
    with sd.Recorder(path, policy="grpo") as rec:
        for step in range(1, STEPS + 1):
            logp = -rng.random((8, 5)).astype(np.float32)
            reward = rng.random(8).astype(np.float32) + 2.0
            if step in alike:
                reward = np.repeat(np.array([2.0, 1.0], dtype=np.float32), 4)
            groups = reward.reshape(2, 4)
            advantages = (groups - groups.mean(axis=1, keepdims=True)).reshape(8)
            mask = np.zeros((8, 5)) if step in masked else np.ones((8, 5))
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=advantages,
                mask=mask.astype(np.float32),
                group_id=np.repeat(np.arange(2), 4),
                reward=reward,
                grad_norm=0.0 if step in masked | alike else 1.0,
                inner_step=0,
            )
    return path


def _observed(run: Path, *command: str) -> tuple[dict[str, object], str]:
    """The JSON object holding `unscored_streak` (inspect's `observed`, replay's top level) and
    the table output of `inspect` or `replay -p grpo`, its whitespace and column rules as single
    spaces."""
    extra = ["-p", "grpo"] if command[0] == "replay" else []
    shown = CliRunner().invoke(app, [*command, str(run), *extra, "--format", "json"])
    assert shown.exit_code == 0, shown.stderr
    table = CliRunner().invoke(app, [*command, str(run), *extra])
    assert table.exit_code == 0, table.stderr
    # a table row wraps its value over lines whose first cell is empty: read without the rules
    data = json.loads(shown.stdout)
    streak = data["observed"] if command[0] == "inspect" else data  # replay: an extension key
    return streak, " ".join(table.stdout.replace("│", " ").split())


def _streak(
    first: int, last: int, steps: int, unscored: int, alike: int, to_end: bool
) -> dict[str, object]:
    """The JSON entry `unscored_streak` of a streak of `steps` steps from `first` to `last`."""
    return {
        "first_step": first,
        "last_step": last,
        "steps": steps,
        "no_token_scored": unscored,
        "no_nonzero_advantage": alike,
        "to_end": to_end,
    }


MASKED = "no token was scored: every completion was masked (a policy batch with an all-zero mask)"
ALIKE = "no scored unit had a nonzero advantage: every group's completions were rewarded alike"
MIXED = (
    "no step made a policy-gradient update: 6 scored no token (an all-zero mask), 15 no unit "
    "with a nonzero advantage"
)
LEARNS = "; the policy learns nothing from its rewards there"


@pytest.mark.parametrize("command", ["inspect", "replay"])
@pytest.mark.parametrize(
    ("masked", "alike", "streak", "said"),
    [
        (
            range(12, 41),
            (),
            _streak(12, 40, 29, 29, 0, True),
            f"from step 12 on (29 steps), {MASKED}",
        ),
        ((), range(5, 20), _streak(5, 19, 15, 0, 15, False), f"steps 5-19 (15 steps), {ALIKE}"),
        (
            range(20, 26),
            range(26, 41),
            _streak(20, 40, 21, 6, 15, True),
            f"from step 20 on (21 steps), {MIXED}",
        ),
    ],
    ids=["no token scored", "no nonzero advantage", "both"],
)
def test_a_streak_is_named_with_its_cause(
    tmp_path: Path,
    command: str,
    masked: range,
    alike: range,
    streak: dict[str, object],
    said: str,
) -> None:
    run = _run(tmp_path / "run", masked=set(masked), alike=set(alike))
    observed, table = _observed(run, command)
    assert observed["unscored_streak"] == streak
    assert said + LEARNS in table
    assert (MASKED in table, ALIKE in table) == (MASKED in said, ALIKE in said)


def test_the_longest_streak_is_named(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", masked={*range(3, 14), *range(20, 35)})
    observed, _ = _observed(run, "inspect")
    assert observed["unscored_streak"]["first_step"] == 20
    assert observed["unscored_streak"]["steps"] == 15


@pytest.mark.parametrize("command", ["inspect", "replay"])
def test_a_short_streak_is_not_named(tmp_path: Path, command: str) -> None:
    """A few steps without an update (a sparse-reward batch where no sample succeeded) are no
    streak: under 10 steps in a row, nothing is said."""
    run = _run(tmp_path / "run", masked=set(range(10, 19)), alike={30})
    observed, table = _observed(run, command)
    assert observed["unscored_streak"] is None
    assert "learns nothing" not in table


def test_watch_alerts_on_the_streak_once(tmp_path: Path) -> None:
    """`watch` says it as it happens: one alert at the streak's first step, naming its cause."""
    run = _run(tmp_path / "run", masked=set(range(12, STEPS + 1)))
    result = CliRunner().invoke(app, ["watch", str(run), "--once", "-f", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    alerts = [a for a in json.loads(result.stdout)["alerts"] if a["kind"] == "unscored_streak"]
    assert alerts == [
        {
            "kind": "unscored_streak",
            "step": 12,
            "message": f"29 policy-batch steps in a row without an update: {MASKED}",
        }
    ]
    assert "alert: step 12: unscored_streak: 29 policy-batch steps" in result.stderr


def test_the_hdf5_report_keeps_the_streak(tmp_path: Path) -> None:
    """`replay --out report.h5` kept every other top-level entry of the JSON but this one."""
    run = _run(tmp_path / "run", masked=set(range(12, STEPS + 1)))
    out = tmp_path / "report.h5"
    result = CliRunner().invoke(app, ["replay", str(run), "-p", "grpo", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    streak = json.loads(read_hdf5(out)["attrs"]["unscored_streak"])
    assert streak == _streak(12, STEPS, STEPS - 11, STEPS - 11, 0, True)
    calm = _run(tmp_path / "calm")
    result = CliRunner().invoke(app, ["replay", str(calm), "-p", "grpo", "--out", str(out)])
    assert result.exit_code == 0 and json.loads(read_hdf5(out)["attrs"]["unscored_streak"]) is None
