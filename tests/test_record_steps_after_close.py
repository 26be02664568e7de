"""A step logged after the process closed record's run at its exit: a daemon thread that still
trains while the main thread ends steps on through the exit handlers. Before, such a step
opened the run again, which the closing Recorder (or the run it closed) refused: `record`
exited 2 with `recording failed: ... being recorded by another Recorder, still open in this
process` after a script that exited 0 (5 of 5 runs of a daemon thread stepping every 2 ms,
1,636 to 2,054 steps recorded). Such a step is left out now, the run as it was closed."""

from __future__ import annotations

from _bootstrap_state import fresh_recording

from stabledrl_cli.capture import bootstrap, log_policy_batch
from stabledrl_cli.dump import open_run
from stabledrl_cli.dump._manifest import RECORDING_CLOSED


def test_an_optimizer_step_after_the_run_closed_is_left_out(tmp_path, monkeypatch):
    status = tmp_path / "status"
    fresh_recording(monkeypatch, tmp_path / "run", status)
    for step in range(3):
        bootstrap.log_hook_step(step, {"grad_norm": 1.0, "scalars": {}})
    bootstrap.close()
    for step in range(3, 5):  # a daemon thread's, during the interpreter's exit
        bootstrap.log_hook_step(step, {"grad_norm": 1.0, "scalars": {}})
    assert not log_policy_batch(5, policy="grpo", logp=[-1.0], advantages=[1.0])
    assert status.read_text() == ""
    run = open_run(tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    assert run.manifest[RECORDING_CLOSED] is True
