"""SIGTERM midway through `import` or `pack` leaves neither a half run nor a temporary file."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from _cli import cli_command, cli_environment

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _terminated_once(args: list[object], started: Path, files: int) -> tuple[int, str]:
    """Runs `stabledrl ARGS`, sends SIGTERM once `started` holds more than `files` entries;
    its exit code and stderr."""
    process = subprocess.Popen(
        cli_command(*args), env=cli_environment(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if started.is_dir() and len(list(started.iterdir())) > files:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    return process.returncode, stderr


def test_sigterm_midway_through_an_import_leaves_no_run(tmp_path: Path) -> None:
    """Before, the default SIGTERM ended the import on the spot: RUN held the steps written so
    far and a manifest, which read as a run (integrity ok) of part of the log."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(3000)))
    run = tmp_path / "run"
    code, stderr = _terminated_once(["import", log, "--out", run], run / "steps", 20)
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_sigterm_midway_through_a_pack_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Before, the archive's temporary file (.OUT.tmp-PID, as large as the archive so far)
    stayed beside OUT."""
    out = tmp_path / "out" / "run.h5"
    out.parent.mkdir()
    args = ["pack", FIXTURES / "grpo", out, "--compression", "small"]
    code, stderr = _terminated_once(args, out.parent, 0)
    assert code == 143, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM"
    assert list(out.parent.iterdir()) == []
