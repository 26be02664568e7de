"""A closed `Recorder(async_writes=True)` kept its writer thread object, queue and all, for the
rest of the process: its exit handlers (atexit, and a multiprocessing child's end) held it.
Measured: 300 Recorders opened and closed in one process (a sweep recording its trials) left
300 atexit callbacks and 2.5 MB traced. `close()` now removes them once the writer stopped."""

from __future__ import annotations

import gc
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd

STEP = {
    "logp": np.array([-1.0, -2.0], dtype=np.float32),
    "logp_old": np.array([-1.25, -2.0], dtype=np.float32),
    "advantages": np.array([1.0, -1.0], dtype=np.float32),
}


def test_a_closed_recorder_leaves_nothing_behind(tmp_path: Path) -> None:
    writers = []
    for trial in range(3):
        with sd.Recorder(tmp_path / f"run{trial}", unit="sequence", async_writes=True) as rec:
            rec.log_step(0, **STEP)
            writers.append(weakref.ref(rec._writer))
        del rec
    gc.collect()
    assert [writer() for writer in writers] == [None, None, None]
    for trial in range(3):
        assert sd.open_run(tmp_path / f"run{trial}").step_numbers == [0]


def test_a_recorder_left_open_is_still_closed_at_exit(tmp_path: Path) -> None:
    """The exit handler stays while the Recorder is open (its queued steps are written)."""
    rec = sd.Recorder(tmp_path / "run", unit="sequence", async_writes=True)
    rec.log_step(0, **STEP)
    rec._at_exit()  # what atexit runs
    assert sd.open_run(tmp_path / "run").manifest.get("recording_closed") is True
    rec.close()


def test_a_recorder_left_open_by_a_training_that_crashed_notes_it_at_exit(
    tmp_path: Path, monkeypatch
) -> None:
    """An async Recorder left open when an uncaught exception ended the script was closed by
    its exit handler as a finished recording: `recording_closed`, no note, so that `inspect`
    said "its Recorder finished" of a training that died of CUDA out of memory at step 1. The
    handler now notes the exception as a with block does (Python keeps it as sys.last_value
    as it prints it, before the exit handlers run)."""
    monkeypatch.delattr(sys, "ps1", raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    rec = sd.Recorder(tmp_path / "run", unit="sequence", async_writes=True)
    rec.log_step(0, **STEP)
    uncaught(monkeypatch, RuntimeError("CUDA out of memory"))
    rec._at_exit()  # what atexit runs
    manifest = sd.open_run(tmp_path / "run").manifest
    assert manifest["recording_stopped"] == {
        "step": 1,
        "rank": 0,
        "reason": "training stopped by RuntimeError: CUDA out of memory after step 0",
    }
    assert manifest["recording_closed"] is True
    rec.close()


def uncaught(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """`error` kept as Python keeps the uncaught one that ends a script: sys.last_value, and a
    sys.last_traceback whose first frame, the script's top level, has no caller."""
    top = (n for n in ()).gi_frame  # a frame with no caller
    trace = types.TracebackType(None, top, 0, 1)
    monkeypatch.setattr(sys, "last_value", error, raising=False)
    monkeypatch.setattr(sys, "last_traceback", trace, raising=False)


def test_an_error_shown_earlier_that_ended_nothing_is_not_noted_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytest keeps a failed test's error as sys.last_value (as does code.InteractiveInterpreter
    a command's): a Recorder left open by a test that passed, the next test failing, its run
    was noted 'training stopped by AssertionError: assert 1 == 2 after step 1' at exit. An
    error that did not come up through the script's top level ended nothing: not noted."""
    monkeypatch.delattr(sys, "ps1", raising=False)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    rec = sd.Recorder(tmp_path / "run", unit="sequence", async_writes=True)
    rec.log_step(0, **STEP)
    try:
        raise AssertionError("assert 1 == 2")
    except AssertionError as error:  # as pytest keeps it
        monkeypatch.setattr(sys, "last_value", error, raising=False)
        monkeypatch.setattr(sys, "last_traceback", error.__traceback__, raising=False)
    rec._at_exit()  # what atexit runs
    manifest = sd.open_run(tmp_path / "run").manifest
    assert "recording_stopped" not in manifest
    assert manifest["recording_closed"] is True
    rec.close()
