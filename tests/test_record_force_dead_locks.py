"""`record --force -- CMD` over a killed recording: its Recorder's lock file, held by no process,
stayed in steps/ while the command started, and a `watch` begun then stopped on the old run at
once ('the recording's process ended without closing it (killed?): stopped (1 step seen)'),
never following the new recording. record now removes such locks before the command starts
(as it removes a closed run's mark), and puts them back when the command changed no step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from _cli import cli_environment
from _record_here import record_python_here

from stabledrl_cli.dump._writer_lock import writer_states

KILLED = textwrap.dedent(
    """
    import os, signal
    import numpy as np
    import stabledrl_cli as sd

    recorder = sd.Recorder("run", policy="grpo")
    logp = np.full((2, 3), -1.0, dtype="float32")
    recorder.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(2, dtype="float32"))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)
LISTS = "import os; print(sorted(os.listdir(os.path.join('run', 'steps'))))"
RECORDS = LISTS + textwrap.dedent(
    """
    import numpy as np
    import stabledrl_cli as sd
    logp = np.full((2, 3), -1.0, dtype="float32")
    sd.log_policy_batch(0, logp=logp, logp_old=logp, advantages=np.ones(2, dtype="float32"))
    """
)
OPTIONS = ("--force", "-p", "grpo", "--no-optimizer-hooks")


def test_the_lock_of_a_killed_recording_is_gone_while_the_command_runs(
    tmp_path, monkeypatch, capfd
):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED], cwd=tmp_path, env=cli_environment(), timeout=120
    )
    assert killed.returncode == -9
    lock = Path(tmp_path, "run", "steps", ".writer.rank-0000.lock")
    text = lock.read_bytes()
    assert writer_states(lock.parent) == {0: "released"}

    unchanged, _ = record_python_here(monkeypatch, capfd, LISTS, *OPTIONS, cwd=tmp_path)
    assert unchanged.returncode == 2, unchanged.stderr  # it recorded no step
    assert unchanged.stdout.strip() == "['step-00000000.safetensors']"  # no lock in its run
    assert lock.read_bytes() == text and writer_states(lock.parent) == {0: "released"}

    recorded, errors = record_python_here(monkeypatch, capfd, RECORDS, *OPTIONS, cwd=tmp_path)
    assert recorded.returncode == 0 and errors == [], recorded.stderr
    assert recorded.stdout.startswith("['step-00000000.safetensors']\n")
    assert writer_states(lock.parent) == {}
