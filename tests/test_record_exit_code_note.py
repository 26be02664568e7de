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

from typer.testing import CliRunner

from stabledrl_cli.cli.app import app

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
    inspected = CliRunner().invoke(app, ["inspect", str(tmp_path / "run")], env={"COLUMNS": "400"})
    assert "stopped at step 3 (rank 0): training command exited with code 3" in inspected.stdout


def test_a_script_that_ends_well_is_not_noted(tmp_path: Path) -> None:
    """sys.exit(0) ends the training as it meant to: the run stays a whole recording."""
    done, manifest = _record(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert "recording_stopped" not in manifest and manifest["recording_closed"] is True


SPAWNED = """
import glob, os, sys, time
import numpy as np
import torch.multiprocessing as mp
import stabledrl_cli as sd

def rank_0_done():
    # rank 1 breaks once rank 0 wrote its last step: torch's spawn then ends rank 0, which a
    # loaded machine may not have started yet
    steps = os.path.join(os.environ["STABLEDRL_RUN_DIR"], "steps", "step-00000003.rank-0000*")
    deadline = time.monotonic() + 60
    while not glob.glob(steps) and time.monotonic() < deadline:
        time.sleep(0.05)

def work(rank, fail):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    for step in range(4):
        if rank == 1 and step == fail:
            rank_0_done()
            raise RuntimeError("rank 1 broke")
        sd.log_policy_batch(
            step, logp=np.zeros((6, 4), "float32"), logp_old=np.zeros((6, 4), "float32"),
            advantages=np.zeros(6, "float32"), group_id=np.array([0, 0, 1, 1, 2, 2]),
        )

if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]),), nprocs=2)
    sys.exit(int(sys.argv[2]))
"""


def _record_spawned(
    tmp_path: Path, fail: int, code: int
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`record -- python spawned.py`: 2 ranks under torch.multiprocessing.spawn, each logging
    its shard of steps 0-3 (rank 1 raises at step `fail`; -1: never), then `sys.exit(code)`."""
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED, encoding="utf-8")
    run = tmp_path / "run"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    for name in ("STABLEDRL_RUN_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "stabledrl_cli", "record", "--policy", "grpo", "--out", str(run),
         "--", sys.executable, str(script), str(fail), str(code)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert (run / "manifest.json").is_file(), done.stderr
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["world_size"] == 2
    return done, manifest


def test_a_spawned_rank_that_raises_is_noted(tmp_path: Path) -> None:
    """torch's spawn wrapper catches rank 1's error and calls sys.exit(1): no uncaught
    exception to note, and a run of several ranks is never marked closed. Before, the run held
    no note at all; `record` now notes the command's exit code, as for one process."""
    done, manifest = _record_spawned(tmp_path, 2, 0)
    assert done.returncode == 1 and "rank 1 broke" in done.stderr, done.stderr
    assert manifest["recording_stopped"] == {
        "step": 4,
        "rank": 0,
        "reason": "training command exited with code 1 after step 3",
    }


def test_spawned_ranks_then_an_error_code_of_the_launcher_are_noted(tmp_path: Path) -> None:
    done, manifest = _record_spawned(tmp_path, -1, 3)
    assert done.returncode == 3, done.stderr
    assert manifest["recording_stopped"]["reason"] == (
        "training command exited with code 3 after step 3"
    )


def test_spawned_ranks_that_end_well_are_not_noted(tmp_path: Path) -> None:
    done, manifest = _record_spawned(tmp_path, -1, 0)
    assert done.returncode == 0, done.stderr
    assert "recording_stopped" not in manifest
    assert not list((tmp_path / "run" / "steps").glob("stopped.*"))
