"""A process killed outright (kill -9, the out-of-memory killer) keeps every step that an
async Recorder's `log_step` returned for.

With `async_writes=True` (what `record`'s optimizer hooks use) the step files were written by
the Recorder's thread from a queue of bytes in memory: a SIGKILL lost the queue, up to 9 steps,
the last ones before the crash a flight recorder is for. `log_step` now puts each step's whole
file under its name before returning (no fsync: the page cache outlives the process), and the
thread only fsyncs it. These scripts make the fsync slow, so that every step is still queued
when the process is killed: before, none of them was left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from _cli import ROOT, cli_command

from stabledrl_cli import open_run

SLOW_DISK = """
import stabledrl_cli.dump._step_writes as writer
writer.make_durable = lambda item: __import__("time").sleep(60)  # nothing reaches the disk
"""

KILLED_RECORDER = SLOW_DISK + textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from stabledrl_cli import Recorder

    recorder = Recorder(sys.argv[1], policy="grpo", async_writes=True)
    for step in range(6):
        recorder.log_step(
            step, logp=np.full(4, -step, np.float32), logp_old=np.zeros(4, np.float32),
            advantages=np.ones(4, np.float32), mask=np.ones(4, bool), seq_id=np.arange(4),
        )
    print("logged", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_async_recorder_keeps_every_step_log_step_returned_for(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_RECORDER, str(run)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert (result.stdout, result.returncode) == ("logged\n", -signal.SIGKILL), result.stderr
    recorded = open_run(run)
    assert recorded.step_numbers == list(range(6))
    assert recorded.integrity.ok
    assert [float(step["logp"][0]) for step in recorded] == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    assert not [p.name for p in (run / "steps").iterdir() if ".tmp-" in p.name]


KILLED_TRAINING = SLOW_DISK + textwrap.dedent(
    """
    import os, signal
    import torch

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(8):  # the queue's 8 places and the step being fsynced hold them all
        optimizer.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
    print("trained", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a training
    """
)


def test_a_training_killed_under_record_keeps_every_finished_optimizer_step(
    tmp_path: Path,
) -> None:
    """`record -- CMD`'s optimizer hooks: a training killed by SIGKILL kept none of its last
    steps still queued (here all 8); each finished optimizer step is in the run now."""
    script = tmp_path / "train.py"
    script.write_text(KILLED_TRAINING)
    run = tmp_path / "run"
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(run), "--", sys.executable, str(script)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert "trained" in result.stdout
    recorded = open_run(run)
    assert recorded.integrity.ok
    assert recorded.step_numbers == list(range(8))
