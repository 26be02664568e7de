"""A failed write of a run (a full disk, a refused permission) is WriteError (exit 4) naming the
file; its temporary file is removed and the steps written before it stay intact."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.errors import WriteError


def _flat(step: int) -> dict:
    return {
        "logp": np.full(4, -1.0 - step, np.float32),
        "logp_old": np.zeros(4, np.float32),
        "advantages": np.ones(4, np.float32),
        "seq_id": np.array([0, 0, 1, 1]),
    }


def _fail_after(monkeypatch, calls: int, error: int) -> None:
    """os.writev in the atomic writer: the first `calls` calls write, then each fails."""
    real_write, count = os.write, [0]

    def writev(fd: int, buffers: list[memoryview]) -> int:
        count[0] += 1
        if count[0] > calls:
            raise OSError(error, os.strerror(error))
        data = b"".join(buffers)
        return real_write(fd, data[: max(1, len(data) // 2)])  # short writes, too

    monkeypatch.setattr(_atomic.os, "writev", writev)


def _fsync_fails(monkeypatch) -> None:
    """os.fsync in the atomic writer fails (EIO): a step async_writes put under its name does
    not reach the disk."""

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_atomic.os, "fsync", failing)


@pytest.mark.parametrize("async_writes", [False, True])
def test_no_space_mid_step_is_a_write_error_and_leaves_no_temporary_file(
    tmp_path, monkeypatch, async_writes
):
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=async_writes)
    for step in range(3):
        rec.log_step(step, **_flat(step))
    rec.flush()
    _fail_after(monkeypatch, calls=2, error=errno.ENOSPC)  # part of step 3's bytes, then full
    with pytest.raises(WriteError, match=r"step-00000003\.safetensors.*no space left on device"):
        rec.log_step(3, **_flat(3))
        rec.flush()
    monkeypatch.undo()
    rec.close()  # the failure was reported once, as a synchronous write's is
    assert sorted(os.listdir(path / "steps")) == [f"step-{n:08d}.safetensors" for n in range(3)]
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1, 2] and run.integrity.ok
    assert [s["logp"][0].item() for s in run] == [-1.0, -2.0, -3.0]


def test_a_refused_permission_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "run"
    rec = sd.Recorder(path)
    rec.log_step(0, **_flat(0))
    real_open = os.open

    def refuse(file, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(_atomic.os, "open", refuse)
    with pytest.raises(
        WriteError, match=r"step-00000001\.safetensors: .*Permission denied"
    ) as info:
        rec.log_step(1, **_flat(1))
    assert info.value.exit_code == 4
    monkeypatch.undo()
    rec.log_step(2, **_flat(2))  # the recorder is still usable once the disk is
    rec.close()
    assert sd.open_run(path).step_numbers == [0, 2]
    assert sorted(os.listdir(path / "steps")) == [
        "step-00000000.safetensors",
        "step-00000002.safetensors",
    ]


def test_an_unwritable_run_directory_is_a_write_error(tmp_path, monkeypatch):
    def refuse(file, flags, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(file))

    monkeypatch.setattr(_atomic.os, "open", refuse)
    with pytest.raises(WriteError, match=r"manifest\.json: cannot write it \(Read-only file"):
        sd.Recorder(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # no steps/ without a manifest: not a run


def test_the_warning_of_a_run_whose_path_holds_a_line_break_is_one_line(
    tmp_path, monkeypatch, capsys
):
    """The Recorder warns straight to stderr (no console): a run path holding a newline split
    its warning across lines, the second one starting with the path's tail."""
    rec = sd.Recorder(tmp_path / "r\nzz", on_write_error="warn")

    def full(fd: int, buffers: list[memoryview]) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r\nzz"))

    monkeypatch.setattr(_atomic.os, "writev", full)
    rec.log_step(0, **_flat(0))  # no exception: training goes on
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "r\\nzz" in err, err
    assert err.startswith("stabledrl: warning: recording stopped")


def test_the_note_of_a_run_whose_path_is_not_utf8_leaves_its_manifest_readable(
    tmp_path, monkeypatch, capsys
):
    """The note's reason names the step file, here under a directory named with a byte that
    is not UTF-8: the manifest held it as a lone surrogate, which every reader refuses (the
    run became unreadable, exit 3). The byte is now spelled \\xff."""
    path = tmp_path / os.fsdecode(b"run-\xff")
    rec = sd.Recorder(path, on_write_error="warn")
    real_writev, failed = os.writev, []

    def full_once(fd: int, buffers: list[memoryview]) -> int:  # the step fails, the note not
        if not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(_atomic.os, "writev", full_once)
    rec.log_step(0, **_flat(0))
    monkeypatch.undo()
    rec.close()
    capsys.readouterr()
    stopped = sd.open_run(path).manifest["recording_stopped"]
    assert "run-\\xff" in stopped["reason"] and "no space left" in stopped["reason"]


@pytest.mark.parametrize("async_writes", [False, True])
def test_warn_mode_stops_recording_once_and_notes_it_in_the_manifest(
    tmp_path, monkeypatch, capsys, async_writes
):
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=async_writes, on_write_error="warn")
    rec.log_step(0, **_flat(0))
    rec.flush()
    real_writev, failed = os.writev, []

    def full_once(fd: int, buffers: list[memoryview]) -> int:  # step 1 fails, the manifest not
        if not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(_atomic.os, "writev", full_once)
    rec.log_step(1, **_flat(1))  # no exception: training goes on
    rec.flush()
    for step in range(2, 5):
        rec.log_step(step, **_flat(step))  # recording stopped: ignored
    rec.close()
    err = capsys.readouterr().err
    assert err.count("recording stopped") == 1 and "no space left on device" in err
    manifest = json.loads((path / "manifest.json").read_text())
    stopped = manifest["recording_stopped"]
    assert stopped["rank"] == 0 and "no space left" in stopped["reason"]
    assert stopped["step"] == 1  # the step whose write failed, from the writer thread too
    run = sd.open_run(path)
    assert run.step_numbers == [0] and run.integrity.ok


def test_an_async_write_failure_is_raised_at_once_as_a_synchronous_one(tmp_path, monkeypatch):
    """async_writes puts the step's whole file under its name before log_step returns (so a
    process killed next keeps it): a write that fails there (a full disk) is raised by that
    log_step, naming its step, as without async_writes; the later steps are written."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=True)
    rec.log_step(0, **_flat(0))
    _fail_after(monkeypatch, calls=0, error=errno.ENOSPC)
    with pytest.raises(WriteError, match=r"step-00000001\.safetensors.*no space left on device"):
        rec.log_step(1, **_flat(1))
    monkeypatch.undo()
    rec.log_step(2, **_flat(2))
    rec.close()
    run = sd.open_run(path)
    assert run.step_numbers == [0, 2]
    assert [s["logp"][0].item() for s in run] == [-1.0, -3.0]


def test_an_async_fsync_failure_is_raised_once_and_no_later_step_is_lost(tmp_path, monkeypatch):
    """The writer thread fsyncs each step: one that fails (step 1, EIO) was raised by every
    later log_step, flush and close, and no later step was made durable. It is raised once, by
    the next call, naming its step, whose file is removed (its data may not be on the disk); a
    step queued behind it is written, and the log_step that raises it has its own step in."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=True)
    rec.log_step(0, **_flat(0))
    rec.flush()
    real_fsync = os.fsync
    logged_2, syncing_step_2, go_on = threading.Event(), threading.Event(), threading.Event()

    def fails_once(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("step-00000001.safetensors"):
            logged_2.wait(timeout=60)  # step 2 is logged before step 1's failure is in
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if name.endswith("step-00000002.safetensors"):  # step 1's failure is in by now
            syncing_step_2.set()
            go_on.wait(timeout=60)
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fails_once)
    rec.log_step(1, **_flat(1))
    rec.log_step(2, **_flat(2))
    logged_2.set()
    assert syncing_step_2.wait(timeout=60)
    with pytest.raises(WriteError, match=r"step-00000001\.safetensors.*Input/output error"):
        rec.log_step(3, **_flat(3))
    go_on.set()
    rec.flush()
    rec.log_step(4, **_flat(4))
    rec.close()
    run = sd.open_run(path)
    assert run.step_numbers == [0, 2, 3, 4]
    assert [s["logp"][0].item() for s in run] == [-1.0, -3.0, -4.0, -5.0]


def test_async_write_failures_before_the_caller_is_told_are_named_in_one_error(
    tmp_path, monkeypatch
):
    """Steps 0 to 2 fail to reach the disk while the caller logs: flush raises once, naming
    step 0's file and the two later steps, whose files are removed; close then has nothing
    more to raise."""
    rec = sd.Recorder(tmp_path / "run", async_writes=True)
    go_on = threading.Event()

    def failing(fd: int) -> None:
        go_on.wait(timeout=60)  # until the three steps are queued
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(_atomic.os, "fsync", failing)
    for step in range(3):
        rec.log_step(step, **_flat(step))
    go_on.set()
    with pytest.raises(WriteError) as failed:
        rec.flush()
    message = str(failed.value)
    assert "step-00000000.safetensors: not made durable (Input/output error)" in message
    assert message.endswith("; 2 later steps not made durable either (1, 2)"), message
    monkeypatch.undo()
    rec.close()
    assert os.listdir(tmp_path / "run" / "steps") == []


@pytest.mark.parametrize("async_writes", [False, True])
def test_a_failed_rewrite_removes_the_steps_first_half(tmp_path, monkeypatch, async_writes):
    """rewrite_step writes a step again with its second half (the optimizer hooks' pairing):
    when that write fails, the file holding the first half alone is removed, not left to
    pass for a whole step."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=async_writes)
    rec.log_step(0, **_flat(0))
    rec.log_step(1, grad_norm=1.0)  # the first half: scalars
    rec.flush()
    _fail_after(monkeypatch, calls=0, error=errno.ENOSPC)
    with pytest.raises(WriteError, match=r"step-00000001\.safetensors"):
        rec.rewrite_step(1, grad_norm=1.0, **_flat(1))
        rec.flush()
    monkeypatch.undo()
    rec.close()
    assert os.listdir(path / "steps") == ["step-00000000.safetensors"]
    assert sd.open_run(path).integrity.ok


def test_on_write_error_is_checked_and_a_step_without_tokens_is_refused(tmp_path):
    from stabledrl_cli.errors import UsageError

    with pytest.raises(UsageError, match="on_write_error"):
        sd.Recorder(tmp_path / "a", on_write_error="ignore")
    rec = sd.Recorder(tmp_path / "b")
    empty = np.zeros(0, np.float32)
    with pytest.raises(UsageError, match="at least one token"):
        rec.log_step(0, logp=empty, logp_old=empty, advantages=empty, seq_id=np.zeros(0, int))
    rec.close()


@pytest.mark.parametrize("on_write_error", ["raise", "warn"])
def test_a_steps_directory_replaced_by_a_file_is_a_write_error_not_an_oserror(
    tmp_path, capsys, on_write_error
):
    # The temporary file can be neither made nor removed (ENOTDIR both times): the failed
    # cleanup must not replace the WriteError by the OSError (in "warn" mode: by a crash).
    path = tmp_path / "run"
    rec = sd.Recorder(path, on_write_error=on_write_error)
    rec.log_step(0, **_flat(0))
    for name in os.listdir(path / "steps"):
        os.unlink(path / "steps" / name)
    os.rmdir(path / "steps")
    (path / "steps").write_bytes(b"")
    if on_write_error == "raise":
        with pytest.raises(WriteError, match=r"step-00000001\.safetensors: cannot write it"):
            rec.log_step(1, **_flat(1))
    else:
        rec.log_step(1, **_flat(1))  # training goes on
        rec.log_step(2, **_flat(2))
        assert capsys.readouterr().err.count("recording stopped") == 1
    rec.close()


@pytest.mark.parametrize("async_writes", [False, True])
def test_an_interrupt_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch, async_writes):
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=async_writes)
    rec.log_step(0, **_flat(0))
    rec.flush()

    def interrupted(fd: int, buffers: list[memoryview]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_atomic.os, "writev", interrupted)
    with pytest.raises((KeyboardInterrupt, WriteError)):
        rec.log_step(1, **_flat(1))
        rec.flush()
    monkeypatch.undo()
    rec.log_step(2, **_flat(2))
    rec.close()
    assert not [n for n in os.listdir(path / "steps") if ".tmp-" in n]
    run = sd.open_run(path)
    assert 0 in run.step_numbers and not [f for f in run.integrity.findings if f.kind != "gap"]


@pytest.mark.parametrize("async_writes", [False, True])
def test_an_interrupt_once_the_steps_file_is_in_place_leaves_the_step_out(
    tmp_path, monkeypatch, async_writes
):
    """A Ctrl-C in log_step after the step's file took its name (sync: in the directory's
    fsync; async: waiting for room in a full queue) left that file in the run, unfsynced, while
    the run's note said the training was cut short after the step before: an interrupted
    log_step records nothing, as one interrupted mid-write."""
    path = tmp_path / "run"

    def interrupted(*args, **kwargs):
        monkeypatch.undo()  # once
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), sd.Recorder(path, async_writes=async_writes) as rec:
        rec.log_step(0, **_flat(0))
        if async_writes:
            monkeypatch.setattr(rec._writer.queue, "put", interrupted)
        else:
            monkeypatch.setattr(_atomic, "fsync_dir", interrupted)
        rec.log_step(1, **_flat(1))
    run = sd.open_run(path)
    assert run.step_numbers == [0]
    assert run.manifest["recording_stopped"] == {
        "step": 1,
        "rank": 0,
        "reason": "training interrupted (Ctrl-C) after step 0",
    }


def test_a_file_written_through_atomic_path_under_a_file_is_a_write_error(tmp_path) -> None:
    """pack, the plots and replay --out write through `atomic_path`: when the target's directory
    is a file, the body's OSError and the temporary file's removal both fail, and the caller
    got the removal's raw NotADirectoryError instead of a WriteError naming the target."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "out.h5"
    with pytest.raises(WriteError, match=r"out\.h5"), _atomic.atomic_path(target) as temp:
        temp.open("w")


def test_rewrite_step_before_any_step_says_so(tmp_path):
    """rewrite_step with no step logged said 'rewrites the last step (None), not 0'."""
    from stabledrl_cli.errors import UsageError

    with sd.Recorder(tmp_path / "run", policy=None) as rec:
        with pytest.raises(UsageError, match=r"^rewrite_step\(0\) before any step was logged$"):
            rec.rewrite_step(0, grad_norm=1.0)
        rec.log_step(0, grad_norm=1.0)
        with pytest.raises(UsageError, match=r"rewrites the last step \(0\), not 1$"):
            rec.rewrite_step(1, grad_norm=1.0)
        rec.rewrite_step(0, grad_norm=2.0)
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


def test_a_failed_write_at_the_end_of_a_with_block_leaves_the_trainings_own_error(
    tmp_path, monkeypatch, capfd
):
    """The training raised inside `with Recorder(...)` while a queued step's write failed:
    the training's exception goes on, and the write's failure is one warning line. The close
    raised WriteError in its place, so the traceback ended on the recording's failure (and
    under `stabledrl record`, which prints a stabledrl error as one line, the training's
    error was not shown at all). With no exception under way, the close still raises it."""
    rec = sd.Recorder(tmp_path / "run", async_writes=True)
    _fsync_fails(monkeypatch)
    with pytest.raises(RuntimeError, match="the training's own error"), rec:
        rec.log_step(0, **_flat(0))
        raise RuntimeError("the training's own error")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and "step-00000000.safetensors" in lines[0]
    assert "Input/output error" in lines[0]
    monkeypatch.undo()
    other = sd.Recorder(tmp_path / "other", async_writes=True)
    _fsync_fails(monkeypatch)
    with pytest.raises(WriteError, match="Input/output error"), other:
        other.log_step(0, **_flat(0))


AT_EXIT = """
import errno, gc, os, sys
import numpy as np
import stabledrl_cli as sd
from stabledrl_cli import _atomic

def failing(fd):
    raise OSError(errno.EIO, os.strerror(errno.EIO))

rec = sd.Recorder(sys.argv[1], async_writes=True)
_atomic.os.fsync = failing  # the writer thread's fsync of the step: a queued write fails
flat = np.zeros(4, np.float32)
rec.log_step(0, logp=flat, logp_old=flat, advantages=flat, seq_id=[0, 0, 1, 1])
if sys.argv[2] == "dropped":
    del rec
    gc.collect()
print("training done")
"""


@pytest.mark.parametrize("how", ["unclosed", "dropped"])
def test_a_write_that_fails_as_the_process_exits_is_one_warning_line(tmp_path, how):
    """An async Recorder left unclosed (or dropped) has its queue written at exit; when that
    write fails, stderr has one line naming the step file, not Python's `Exception ignored
    in atexit callback` and a traceback (unclosed), nor nothing at all (dropped)."""
    done = subprocess.run(
        [sys.executable, "-c", AT_EXIT, str(tmp_path / "run"), how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout == "training done\n"
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "step-00000000.safetensors" in lines[0] and "Input/output error" in lines[0]


@pytest.mark.parametrize("on_write_error", ["raise", "warn"])
def test_a_failed_rewrite_names_its_own_reason_while_the_first_half_is_queued(
    tmp_path, monkeypatch, on_write_error
):
    """An async Recorder's rewrite of step 1 fails (a full disk) while the first half's fsync
    is still queued: the error is the rewrite's (no space left on device), and the first half
    is removed once the writer thread is done with it. Before: it was removed first, so the
    queued fsync failed and the error led with 'step-00000001.safetensors: not made durable
    (No such file or directory)'."""
    path = tmp_path / "run"
    rec = sd.Recorder(path, async_writes=True, on_write_error=on_write_error)
    rec.log_step(0, **_flat(0))
    rec.flush()
    drained, go_on = rec._writer.queue.join, threading.Event()
    real_fsync_file = _atomic.fsync_file

    def waits(file: Path) -> None:  # the first half's fsync waits until the failure drains
        go_on.wait(timeout=60)
        real_fsync_file(file)

    def join() -> None:
        go_on.set()
        drained()

    monkeypatch.setattr(_atomic, "fsync_file", waits)
    monkeypatch.setattr(rec._writer.queue, "join", join)
    rec.log_step(1, grad_norm=1.0)  # the first half: scalars, its fsync queued
    _fail_after(monkeypatch, calls=0, error=errno.ENOSPC)
    expected = f"{path}/steps/step-00000001.safetensors: cannot write it (no space left on device)"
    if on_write_error == "raise":
        with pytest.raises(WriteError) as failed:
            rec.rewrite_step(1, grad_norm=1.0, **_flat(1))
        message = str(failed.value)
    else:
        rec.rewrite_step(1, grad_norm=1.0, **_flat(1))  # one warning line, recording stops
        message = rec.stopped
    assert message == expected
    monkeypatch.undo()
    rec.close()
    assert os.listdir(path / "steps") == ["step-00000000.safetensors"]


@pytest.mark.parametrize("on_write_error", ["raise", "warn"])
def test_a_step_whose_directory_fsync_failed_is_not_left_in_the_run(
    tmp_path, monkeypatch, on_write_error
):
    """A synchronous Recorder's step whose file was renamed into place but whose directory's
    fsync then failed (EIO) is reported unwritten and is not in the run, as an async step
    whose fsync fails is removed. Before: the run held step 1 while its stop note said
    'stopped at step 1 ... step-00000001.safetensors: cannot write it (Input/output error)'."""
    import stat

    path = tmp_path / "run"
    rec = sd.Recorder(path, policy=None, on_write_error=on_write_error)
    rec.log_step(0, loss=1.0)
    real_fsync = os.fsync

    def directory_fails(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", directory_fails)
    expected = f"{path}/steps/step-00000001.safetensors: cannot write it (Input/output error)"
    if on_write_error == "raise":
        with pytest.raises(WriteError) as failed:
            rec.log_step(1, loss=2.0)
        assert str(failed.value) == expected
    else:
        rec.log_step(1, loss=2.0)
        assert rec.stopped == expected
    monkeypatch.undo()
    rec.close()
    assert sd.open_run(path).step_numbers == [0]
