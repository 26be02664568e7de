"""A training stopped by Ctrl-C says so in its run, where its Recorder closed it on the way out:
a script's own `with Recorder(...)` block, and `record -- CMD` whose command a KeyboardInterrupt
ended. Before: the run read as a closed, finished recording of fewer steps (`inspect`:
'closed: its Recorder finished, the run gains no step'), nothing saying it was cut short."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _cli import TIMEOUT, cli_command, cli_environment, torch_training

from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED

TRAIN = torch_training(10, "if step == 3: raise KeyboardInterrupt  # as Ctrl-C raises it")


@pytest.mark.parametrize("async_writes", [False, True])
def test_a_recorder_left_by_ctrl_c_notes_it(tmp_path, async_writes):
    with (
        pytest.raises(KeyboardInterrupt),
        Recorder(tmp_path / "run", unit="sequence", async_writes=async_writes) as recorder,
    ):
        for step in range(10):
            recorder.log_step(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])
            if step == 2:
                raise KeyboardInterrupt
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    assert run.manifest[RECORDING_STOPPED] == {
        "step": 3, "rank": 0, "reason": "training interrupted (Ctrl-C) after step 2"
    }  # fmt: skip
    assert run.manifest[RECORDING_CLOSED] is True


def test_a_finished_recorder_notes_nothing(tmp_path):
    with Recorder(tmp_path / "run", unit="sequence") as recorder:
        recorder.log_step(0, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])
    assert RECORDING_STOPPED not in open_run(tmp_path / "run").manifest


def test_record_of_a_command_ended_by_ctrl_c_notes_it(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    done = subprocess.run(
        [*cli_command("record", "--out", "run", "--"), sys.executable, "train.py"],
        cwd=tmp_path, env=cli_environment(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert "recording failed" not in done.stderr  # the run is whole up to the interrupt
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2, 3]
    assert run.manifest[RECORDING_STOPPED]["reason"] == "training interrupted (Ctrl-C) after step 3"
    assert run.manifest[RECORDING_CLOSED] is True
