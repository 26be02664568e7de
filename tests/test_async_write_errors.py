"""An async Recorder whose writer thread is behind when a write fails reports it once.

`log_step` puts each step's file under its name and the writer thread only fsyncs it. With
the run's `steps/` moved away after step 5 while the thread still held steps 0-5, the write of
step 6 failed and so did the fsyncs of steps 0-5: log_step(6) raised naming step 6, then the
close warned again naming step 0 ("cannot write it", although its file had been written
whole); a warn-mode Recorder dropped unclosed warned a second time at exit; and with steps 0-4
durable, step 5's failure was never reported (the stop note said step 6). The one report now
names the first step not made durable, counts the later ones and the failed step with it,
and the stop note names that first step. The fsyncs are held back by an event, not a sleep.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_recorder_write_errors import _flat

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.errors import WriteError


def _in_writer_thread() -> bool:
    return threading.current_thread().name == "stabledrl-recorder"


def _held_fsync(monkeypatch) -> threading.Event:
    """os.fsync in the Recorder's writer thread waits for the event returned (the thread falls
    behind until it is set)."""
    real_fsync, go_on = os.fsync, threading.Event()

    def held(fd: int) -> None:
        if _in_writer_thread():
            assert go_on.wait(timeout=60)
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", held)
    return go_on


def _move_steps_away(path: Path, go_on: threading.Event) -> None:
    """The run's steps/ renamed away, then the held fsyncs let go."""
    os.rename(path / "steps", path / "moved")
    go_on.set()


def _first_failed_at(path: Path, first: int, later: str) -> str:
    """The report of the run at `path` whose step `first` vanished before its fsync, steps
    `later` after it too, and whose step 6 could not be written."""
    steps = path / "steps"
    return (
        f"{steps}/step-{first:08d}.safetensors: not made durable (No such file or directory)"
        f"{later}; step 6 not written either: {steps}/step-00000006.safetensors: cannot write "
        "it (No such file or directory)"
    )


def test_a_with_block_raises_one_error_naming_the_first_step_not_made_durable(
    tmp_path, monkeypatch, capsys
):
    path = tmp_path / "run"
    go_on = _held_fsync(monkeypatch)
    with pytest.raises(WriteError) as failed, sd.Recorder(path, async_writes=True) as rec:
        for step in range(10):
            rec.log_step(step, **_flat(step))
            if step == 5:
                _move_steps_away(path, go_on)
    later = "; 5 later steps not made durable either (1, 2, 3, 4, 5)"
    assert str(failed.value) == _first_failed_at(path, 0, later)
    assert capsys.readouterr().err == ""  # the close has nothing more to say
    assert rec.stopped is None  # raise mode: the Recorder goes on


def test_a_held_fsync_of_the_last_step_is_the_one_named_and_noted(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=True, on_write_error="warn")
    for step in range(5):
        rec.log_step(step, **_flat(step))
    rec.flush()  # steps 0-4 are durable
    go_on = _held_fsync(monkeypatch)
    rec.log_step(5, **_flat(5))
    _move_steps_away(path, go_on)
    rec.log_step(6, **_flat(6))  # no exception: training goes on
    rec.log_step(7, **_flat(7))  # recording stopped: ignored
    rec.close()
    err = capsys.readouterr().err
    report = _first_failed_at(path, 5, "")
    assert err == f"stabledrl: warning: recording stopped, training goes on: {report}\n"
    assert rec.stopped_step == 5
    stopped = json.loads((path / "manifest.json").read_text())["recording_stopped"]
    assert stopped == {"step": 5, "rank": 0, "reason": report}
    moved = sorted(name for name in os.listdir(path / "moved") if name.startswith("step-"))
    assert moved == [f"step-{n:08d}.safetensors" for n in range(6)]  # step 5 went whole


def test_a_halted_writer_keeps_the_steps_behind_the_failure_and_warns_once(
    tmp_path, monkeypatch, capsys
):
    """on_write_error="warn": after step 1's fsync fails (EIO) the thread fsyncs no later
    step; steps 2 and 3, queued behind it, are whole under their names and stay (a finished
    step is never removed for another's failure); the one warning names step 1 only."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=True, on_write_error="warn")
    rec.log_step(0, **_flat(0))
    rec.flush()
    go_on = threading.Event()

    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if not _in_writer_thread():
            return real_fsync(fd)
        assert go_on.wait(timeout=60)  # until steps 1-3 are queued
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_atomic.os, "fsync", failing)
    for step in range(1, 4):
        rec.log_step(step, **_flat(step))
    go_on.set()
    rec.flush()
    monkeypatch.undo()
    rec.close()
    report = f"{path / 'steps'}/step-00000001.safetensors: not made durable (Input/output error)"
    err = capsys.readouterr().err
    assert err == f"stabledrl: warning: recording stopped, training goes on: {report}\n"
    run = sd.open_run(path)
    assert run.step_numbers == [0, 2, 3]
    assert run.manifest["recording_stopped"]["step"] == 1


DROPPED_UNCLOSED = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    import stabledrl_cli as sd
    from stabledrl_cli import _atomic

    path = sys.argv[1]
    go_on, real_fsync = threading.Event(), os.fsync

    def held(fd):
        if threading.current_thread().name == "stabledrl-recorder":
            assert go_on.wait(60), "the fsyncs were never let go"
        real_fsync(fd)

    _atomic.os.fsync = held
    rec = sd.Recorder(path, async_writes=True, on_write_error="warn")
    for step in range(int(sys.argv[2])):
        rec.log_step(
            step, logp=np.full(4, -1.0, np.float32), logp_old=np.zeros(4, np.float32),
            advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]),
        )
        if step == 5:
            os.rename(os.path.join(path, "steps"), os.path.join(path, "moved"))
            if int(sys.argv[2]) > 6:  # the training logs more: step 6 waits for these fsyncs
                go_on.set()
    go_on.set()  # else as the Recorder is dropped
    del rec
    print("training went on", flush=True)
    """
)


def _dropped_unclosed(path: Path, steps: int) -> list[str]:
    """Runs DROPPED_UNCLOSED for `steps` steps; -> its stderr's lines."""
    done = subprocess.run(
        [sys.executable, "-c", DROPPED_UNCLOSED, str(path), str(steps)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout == "training went on\n", done.stderr
    return done.stderr.splitlines()


def test_a_dropped_recorder_warns_once_not_again_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "run"
    warnings = _dropped_unclosed(path, 10)
    # halted after step 0: steps 1-5 are not fsynced (gone with the folder, whole), nor counted
    report = _first_failed_at(path, 0, "")
    assert warnings == [f"stabledrl: warning: recording stopped, training goes on: {report}"]
    stopped = json.loads((path / "manifest.json").read_text())["recording_stopped"]
    assert stopped["step"] == 0 and stopped["reason"] == report


def test_a_dropped_recorder_whose_failure_is_found_at_exit_notes_it(tmp_path: Path) -> None:
    """The Recorder dropped before its thread failed to make step 0 durable: the exit handler
    warned, but the run held no stop note, reading as a recording whose process died."""
    path = tmp_path / "run"
    warnings = _dropped_unclosed(path, 6)
    report = f"{path / 'steps'}/step-00000000.safetensors: not made durable (No such file or "
    report += "directory)"
    assert warnings == [f"stabledrl: warning: {report}"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["recording_stopped"] == {"step": 0, "rank": 0, "reason": report}
    assert "recording_closed" not in manifest  # dropped unclosed, as without a failure
