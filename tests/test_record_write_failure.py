"""A full disk under `stabledrl record -- CMD` never stops the training it records: the
child warns once and trains on, the finished steps stay readable, and `record` exits 4 with
the reason (the child itself exited 0)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from _cli import cli_command

from stabledrl_cli.dump import open_run

CHILD = textwrap.dedent(
    """
    import errno, os
    import torch
    import stabledrl_cli as sd

    real_writev = os.writev

    def full_disk(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    for step in range(8):
        if step == 3:
            os.writev = full_disk  # the disk fills up before step 3 is written
        logp = torch.full((4, 3), -1.0)
        sd.log_policy_batch(step, policy="grpo", logp=logp, logp_old=logp,
                            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                            mask=torch.ones(4, 3, dtype=torch.uint8), grad_norm=1.0, loss=0.0)
    os.writev = real_writev
    print("trained 8 steps")
    """
)


def test_a_full_disk_stops_recording_not_training(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    run = tmp_path / "run"
    env = {**os.environ}
    env.pop("STABLEDRL_DEBUG", None)
    result = subprocess.run(
        [*cli_command(), "record", "--out", str(run), "--",
         sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert "trained 8 steps" in result.stdout  # training went on to the end
    assert result.returncode == 4, result.stderr
    assert "no space left on device" in result.stderr.lower()
    assert result.stderr.count("recording stopped") >= 1
    assert open_run(run).step_numbers == [0, 1, 2]  # the finished steps are intact
    assert not [p for p in (run / "steps").iterdir() if ".tmp" in p.name]
