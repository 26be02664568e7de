"""`stabledrl record -- CMD` on a disk too full to take the run's manifest: the warning and
the error name the first optimizer step that is lost, step 0 (held until the next event
opens the run), not the step that opened it. Before: 'recording optimizer step 1: ...
manifest.json: cannot write it (no space left on device)', though step 0 was lost too."""

from __future__ import annotations

import pytest
from _cli import torch_training
from _record_here import record_python_here

FULL = """
import errno, os
from stabledrl_cli._atomic import write_error
import stabledrl_cli.dump._manifest_edits as edits

def full(target, text, *, temp):  # the disk takes no manifest (ENOSPC)
    raise write_error(target, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

edits.write_atomic = full
"""


BATCH = (
    "__import__('stabledrl_cli').log_policy_batch("
    "step + 1, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])"
)


@pytest.mark.parametrize(
    "each", ["", BATCH], ids=["optimizer steps", "policy batches numbered from 1"]
)
def test_the_warning_names_step_0(tmp_path, monkeypatch, capfd, each):
    """Before, with policy batches numbered from 1 (the batch 1 opens the run, writing the
    optimizer's step 0 first): 'log_policy_batch failed at step 1: ...'."""
    script = FULL + torch_training(3, each)
    done, errors = record_python_here(monkeypatch, capfd, script, cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert "trained" in done.stdout  # recording never breaks training
    lost = f"recording optimizer step 0: {tmp_path / 'run' / 'manifest.json'}: cannot write it"
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"stabledrl: warning: {lost}") for line in lines), lines
    assert errors[-1].startswith(f"error: recording failed: {lost}"), errors
    assert "step 1" not in done.stderr
