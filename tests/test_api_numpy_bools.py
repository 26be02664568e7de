"""A notebook's switches read from numpy (`np.bool_`, a 0-d bool array) are the bools they hold,
as a numpy number is the number it holds: `replay(detail=np.bool_(True))` raised 'detail must
be True or False, not numpy.bool', and `Recorder(overwrite=np.True_)` alike. A value that is no
bool (a string, a number) is still refused."""

from __future__ import annotations

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.errors import UsageError


@pytest.mark.parametrize("switch", [np.bool_(True), np.array(True)])
def test_replay_takes_a_numpy_bool_for_detail(switch) -> None:
    result = sd.replay("fixtures/grpo", ["grpo"], device="cpu", detail=switch)
    assert 29 in result.policy("grpo").detail  # the flagged steps' top sequences


def test_a_recorder_takes_numpy_bools_for_its_switches(tmp_path) -> None:
    flat = np.zeros(4, np.float32)
    for _ in range(2):  # the second replaces the first
        with sd.Recorder(tmp_path / "run", overwrite=np.True_, async_writes=np.False_) as rec:
            rec.log_step(0, logp=flat, logp_old=flat, advantages=flat, seq_id=[0, 0, 1, 1])
    assert sd.open_run(tmp_path / "run").step_numbers == [0]
    with pytest.raises(UsageError, match=r"^overwrite must be True or False, not int$"):
        sd.Recorder(tmp_path / "other", overwrite=np.int64(1))
