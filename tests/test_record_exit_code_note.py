"""`record -- CMD` whose script ends with an error code of its own (`sys.exit(3)` after
step 2) notes it in the run, as an uncaught exception is noted: the optimizer hooks' Recorder
closed the run at exit with no note (a SystemExit raises nothing the recording process can
note), and `inspect` read it as a whole training of 3 steps ('closed: its Recorder
finished'), where the command had stopped mid-run with exit code 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
for step in range(6):
    optimizer.zero_grad()
    (model(torch.randn(8, 4)) ** 2).mean().backward()
    optimizer.step()
    if step == 2:
        sys.exit(int(sys.argv[1]))
"""


def _record(tmp_path: Path, code: int) -> tuple[subprocess.CompletedProcess[str], dict]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "stabledrl_cli", "record", "--out", str(run), "--"]
    done = subprocess.run(
        [*command, sys.executable, str(script), str(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    return done, manifest


def test_a_script_that_exits_with_its_own_error_code_is_noted(tmp_path: Path) -> None:
    done, manifest = _record(tmp_path, 3)
    assert done.returncode == 3, done.stderr
    assert manifest["recording_stopped"] == {
        "step": 3,
        "rank": 0,
        "reason": "training command exited with code 3 after step 2",
    }
    inspected = subprocess.run(
        [sys.executable, "-m", "stabledrl_cli", "inspect", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert "stopped at step 3 (rank 0): training command exited with code 3" in inspected.stdout


def test_a_script_that_ends_well_is_not_noted(tmp_path: Path) -> None:
    """sys.exit(0) ends the training as it meant to: the run stays a whole recording."""
    done, manifest = _record(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert "recording_stopped" not in manifest and manifest["recording_closed"] is True
