"""A training that an error or a non-zero `sys.exit` ended says so in its run, as one that
Ctrl-C ended does (tests/test_record_interrupted_command.py): a script's own `with
Recorder(...)` block left by the exception, and `record -- CMD` whose command it ended. Before,
the run read as a closed, finished recording of fewer steps (a CUDA out-of-memory error at
step 3 of 10 left a run of 4 steps that nothing told from a finished one)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _cli import TIMEOUT, cli_command, cli_environment, torch_training

from stabledrl_cli.dump import Recorder, open_run
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.dump._training_end import cut_short


def _train_until(tmp_path, error: BaseException, async_writes: bool = False) -> None:
    with Recorder(tmp_path / "run", unit="sequence", async_writes=async_writes) as recorder:
        for step in range(10):
            recorder.log_step(step, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])
            if step == 2:
                raise error


@pytest.mark.parametrize("async_writes", [False, True])
def test_a_recorder_left_by_an_error_notes_it(tmp_path, async_writes):
    with pytest.raises(RuntimeError):
        _train_until(tmp_path, RuntimeError("CUDA out of memory.\nTried to allocate"), async_writes)
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    assert run.manifest[RECORDING_STOPPED] == {
        "step": 3, "rank": 0,
        "reason": "training stopped by RuntimeError: CUDA out of memory. after step 2",
    }  # fmt: skip
    assert run.manifest[RECORDING_CLOSED] is True


def test_sys_exit_notes_its_code_but_zero(tmp_path):
    with pytest.raises(SystemExit):
        _train_until(tmp_path, SystemExit(3))
    assert open_run(tmp_path / "run").manifest[RECORDING_STOPPED]["reason"] == (
        "training ended by sys.exit(3) after step 2"
    )
    with pytest.raises(SystemExit):
        _train_until(tmp_path / "clean", SystemExit(0))
    assert RECORDING_STOPPED not in open_run(tmp_path / "clean" / "run").manifest


def test_a_long_message_is_cut_to_one_short_line():
    assert cut_short(ValueError("x" * 500)) == f"stopped by ValueError: {'x' * 197}..."
    assert cut_short(ValueError()) == "stopped by ValueError"
    assert cut_short(KeyboardInterrupt()) == "interrupted (Ctrl-C)"


def test_record_of_a_command_an_error_ended_notes_it(tmp_path):
    (tmp_path / "train.py").write_text(
        torch_training(10, "if step == 3: raise RuntimeError('CUDA out of memory')")
    )
    done = subprocess.run(
        [*cli_command("record", "--out", "run", "--"), sys.executable, "train.py"],
        cwd=tmp_path, env=cli_environment(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: CUDA out of memory" in done.stderr  # the command's own traceback
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2, 3]
    assert run.manifest[RECORDING_STOPPED]["reason"] == (
        "training stopped by RuntimeError: CUDA out of memory after step 3"
    )
    assert run.manifest[RECORDING_CLOSED] is True
