"""A resume checks that the run goes on with its policy. It compared the specs as text, so a
training resumed with the same policy spelled another way, a default written out or left out,
was refused: 'cannot resume RUN: its policy is 'dapo', this recorder's 'dapo:eps_high=0.28''
(dapo's eps_high is 0.28), and the resumed job recorded nothing. Catalogue specs are now
compared in their canonical form, as `replay` tells the run's own policy; the run keeps its
own spelling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError

STEP = {
    "logp": np.array([-1.0, -2.0, -0.5, -1.5], dtype=np.float32),
    "logp_old": np.array([-1.25, -2.0, -0.75, -1.5], dtype=np.float32),
    "advantages": np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32),
}


def _recorded(path: Path, policy: str) -> Path:
    with sd.Recorder(path, policy=policy, unit="sequence") as recorder:
        recorder.log_step(0, **STEP)
    return path


@pytest.mark.parametrize(
    ("first", "again"),
    [("dapo", "dapo:eps_high=0.28"), ("grpo:eps_low=0.2", "grpo"), ("dapo", "dapo")],
)
def test_the_same_policy_spelled_otherwise_resumes(tmp_path: Path, first: str, again: str) -> None:
    run = _recorded(tmp_path / "run", first)
    with sd.Recorder(run, policy=again, unit="sequence", resume=True) as recorder:
        recorder.log_step(1, **STEP)
    opened = sd.open_run(run)
    assert opened.step_numbers == [0, 1]
    assert opened.policy_spec == first


@pytest.mark.parametrize(
    ("first", "again"),
    [("grpo", "grpo:eps_low=0.3"), ("grpo", "dapo"), ("mine:x=1", "mine"), ("grpo", None)],
)
def test_another_policy_is_still_refused(tmp_path: Path, first: str, again: str | None) -> None:
    run = _recorded(tmp_path / "run", first)
    with pytest.raises(UsageError) as refused:
        sd.Recorder(run, policy=again, unit="sequence", resume=True)
    assert str(refused.value) == (
        f"cannot resume {run}: its policy is {first!r}, this recorder's {again!r}"
    )
    assert sd.open_run(run).step_numbers == [0]
