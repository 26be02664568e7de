"""SIGTERM midway through `import` or `pack` leaves neither a half run nor a temporary file."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
from _cli import cli_command, cli_environment

from stabledrl_cli.cli._signals import Terminated
from stabledrl_cli.dump import open_run, pack_run

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


def test_a_stop_inside_the_archives_close_leaves_nothing_to_flush_into_a_closed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM can land while h5py closes the archive: h5py's file stays open, and when it is
    freed, after pack closed the file under it, it flushes. Before, that flush raised in a
    destructor ("Exception ignored in ... ValueError: I/O operation on closed file", after the
    line `stopped by SIGTERM`; about one pack in 30 in the test above)."""
    closing = h5py.File.close

    def stopped_while_closing(handle: h5py.File) -> None:
        monkeypatch.setattr(h5py.File, "close", closing)
        raise Terminated

    monkeypatch.setattr(h5py.File, "close", stopped_while_closing)
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    out = tmp_path / "out" / "run.h5"
    out.parent.mkdir()
    with pytest.raises(Terminated) as stopped:  # its frames keep h5py's file until deleted
        pack_run(open_run(FIXTURES / "grpo"), out)
    open_files = [o for o in gc.get_objects() if type(o) is h5py.File and o.id.valid]
    assert open_files, "the stop did not leave h5py's file open: nothing was tested"
    del open_files, stopped
    gc.collect()
    assert [u.exc_value for u in unraisable] == []
    assert list(out.parent.iterdir()) == []
