"""A Recorder belongs to the process that made it: in a child forked from that process (a
fork-started worker, `os.fork`) log_step is a UsageError and nothing is written, so the child
neither overwrites the parent's step files nor blocks on the parent's writer queue (which has
no thread in the child); leaving the child (atexit) does not block either."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import stabledrl_cli as sd

CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import stabledrl_cli as sd
    from stabledrl_cli.errors import UsageError

    def batch(value):
        return dict(logp=np.full(4, value, np.float32), logp_old=np.zeros(4, np.float32),
                    advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]))

    async_writes = sys.argv[2] == "async"
    rec = sd.Recorder(sys.argv[1], async_writes=async_writes, queue_size=2)
    for step in range(3):
        rec.log_step(step, **batch(step))
    pid = os.fork()
    if pid == 0:
        refused = 0
        for step in range(3, 10):  # more steps than the queue holds
            try:
                rec.log_step(step, **batch(1000 + step))
            except UsageError as exc:
                refused += "forked" in str(exc)
        sys.exit(0 if refused == 7 else 1)  # atexit closes the child's copy
    _, status = os.waitpid(pid, 0)
    for step in range(3, 6):
        rec.log_step(step, **batch(step))
    rec.close()
    print(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_cannot_write_into_its_parents_run(tmp_path, mode):
    path = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode],
        capture_output=True,
        text=True,
        timeout=120,  # a guard against the hang this test is about, not a bound
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]  # the child: every log_step refused, and it exited
    run = sd.open_run(path)
    assert run.step_numbers == list(range(6)) and run.integrity.ok
    assert [float(np.asarray(step["logp"])[0]) for step in run] == [0, 1, 2, 3, 4, 5]
    assert not [n for n in os.listdir(path / "steps") if ".tmp-" in n]
