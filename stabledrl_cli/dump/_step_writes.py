"""How a `Recorder` (`_writer`) puts a step's file on disk: `write_step_file` (what a failed
write leaves under the step's name is removed by `discard_failed`) and, for an
asynchronous Recorder, the writer thread that makes the files `log_step` wrote under their
final names durable (fsync), in order, keeping the ones that failed until the Recorder takes
them; with the stop note and the error that such failures make.
"""

from __future__ import annotations

import queue
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

from stabledrl_cli._atomic import write_atomic
from stabledrl_cli._json import json_text
from stabledrl_cli.dump._file_names import STEPS_DIR, stop_note_name
from stabledrl_cli.dump._manifest_edits import amend_manifest
from stabledrl_cli.dump._step_encoding import discard_step, make_step_durable, write_step
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED, note_text
from stabledrl_cli.dump._writer_lock import WriterLock
from stabledrl_cli.errors import InputError, WriteError, counted


class StepWrite(NamedTuple):
    """A step file to write (`write_step_file`; queued for its fsync without its `parts`):
    `replaces` when it rewrites the step's file."""

    directory: str
    name: str
    parts: list[bytes | memoryview]
    step: int
    replaces: bool


def write_step_file(item: StepWrite, *, durable: bool = True) -> None:
    """Writes the step file (`durable` False: not yet fsynced, `make_durable`); WriteError
    when that fails, which leaves what is under the step's name to `discard_failed`."""
    write_step(item.directory, item.name, item.parts, durable=durable)


def discard_failed(item: StepWrite) -> None:
    """After `write_step_file` of `item` failed: what is under the step's name is removed, so
    that a step reported unwritten is not in the run: the file it was to replace (the step's
    first half, which would pass for a whole step), or its own file when only the directory's
    fsync failed after the rename (whole, its name perhaps not on the disk: an async fsync
    that fails removes it too). A new step's name holds no other file (`_setup` removes the
    steps a Recorder records again). Called once the writer thread is done with that file
    (its fsync queued: removed before, it would fail as "not made durable (No such file or
    directory)" in place of the write's own reason)."""
    discard_step(item.directory, item.name)


def make_durable(item: StepWrite) -> None:
    """Fsyncs a step file `write_step_file` wrote not durable; when that fails the file is
    removed (its data may not be on the disk): WriteError."""
    try:
        make_step_durable(item.directory, item.name)
    except WriteError:
        discard_step(item.directory, item.name)
        raise


class Failure(NamedTuple):
    """A step whose write failed in the writer thread."""

    step: int
    error: BaseException


class WriteThread(threading.Thread):
    """Makes queued steps durable in order (`make_durable`: their files are under their
    names already) and keeps the failed ones until the caller takes them. `halt_on_error`:
    after a failure, the later steps are not fsynced (recording stops: on_write_error="warn";
    their files stay); else each step is made durable as a synchronous Recorder would."""

    def __init__(self, queue_size: int, *, halt_on_error: bool) -> None:
        super().__init__(name="stabledrl-recorder", daemon=True)
        self.queue: queue.Queue[StepWrite | None] = queue.Queue(maxsize=queue_size)
        """Steps to write, in order; None stops the thread."""
        self.halt_on_error = halt_on_error
        self._failures: list[Failure] = []
        """The failed writes the caller has not taken, oldest first (at most a queue's worth
        and one between two takes: each `log_step` takes them)."""
        self._failures_lock = threading.Lock()
        self._halted = False
        self._at_end: WriterLock | None = None
        """The rank's lock of a Recorder dropped unclosed, released as the thread ends
        (`release_when_written`)."""

    def run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                try:
                    if item is None:
                        return
                    self._write(item)
                finally:
                    self.queue.task_done()
                if self._at_end is not None and self.queue.empty():
                    return
        finally:
            if self._at_end is not None:
                self._at_end.release()

    def release_when_written(self, lock: WriterLock) -> None:
        """Its Recorder was dropped unclosed: the thread writes the queued steps, then ends and
        releases the rank's `lock`, never before (a second Recorder of the rank would take the
        run while they land in it). Never waits: a full queue's last write ends the thread."""
        self._at_end = lock
        lock.release_soon()
        with suppress(queue.Full):
            self.queue.put_nowait(None)  # (a thread waiting on an empty queue)
        if not self.is_alive():
            lock.release()

    def _write(self, item: StepWrite) -> None:
        """Makes `item`'s file durable (unless halted: it stays under its name, whole in the
        page cache, as a killed process leaves it); a failure is kept for the caller."""
        if self._halted:
            return
        try:
            make_durable(item)
        except BaseException as exc:
            with self._failures_lock:
                self._failures.append(Failure(item.step, exc))
            self._halted = self.halt_on_error

    def take_failures(self) -> list[Failure]:
        """The failed writes since the last call, oldest first (each is reported once)."""
        with self._failures_lock:
            failures, self._failures = self._failures, []
        return failures

    def stop(self) -> None:
        """Writes every queued step, then ends the thread (at once when it has ended). The
        stop marker is put with a timeout in a loop that ends with the thread, so a call after
        an interrupted one never waits on a thread that is gone."""
        while self.is_alive():
            with suppress(queue.Full):
                self.queue.put(None, timeout=1.0)
                break
        self.join()


LATER_STEPS_SHOWN = 5
"""The later failed steps a writer thread's error names (the rest as '...')."""


def writer_failure(path: Path, failures: list[Failure]) -> WriteError:
    """The error of the run at `path` whose writer thread failed to make `failures` durable
    (at least one): the first one's error, and the later steps not made durable either."""
    exc = failures[0].error
    message = str(exc) if isinstance(exc, WriteError) else f"{path}: {exc!r}"
    later = [str(failure.step) for failure in failures[1:]]
    if later:
        shown = later[:LATER_STEPS_SHOWN] + (["..."] if len(later) > LATER_STEPS_SHOWN else [])
        message += (
            f"; {counted(len(later), 'later step')} not made durable either ({', '.join(shown)})"
        )
    return WriteError(message)


class StopNote(NamedTuple):
    """Where a rank's stop note goes: the manifest's `recording_stopped` and, with several
    ranks, the rank's own note file (best effort both). Kept apart from the Recorder so that
    the exit handler of one dropped unclosed still notes a failure it finds."""

    path: Path
    rank: int
    world_size: int

    def write(self, reason: str, step: int | None) -> dict[str, Any] | None:
        """Writes the note of a stop at `step` for `reason`; -> the note when the manifest
        refused it (the disk that refused the step may refuse it too), else None."""
        note = {"step": step, "rank": self.rank, "reason": json_text(reason)}
        if self.world_size > 1:  # the rank's own file: the manifest's one note is shared
            with suppress(WriteError):
                write_atomic(self.path / STEPS_DIR / stop_note_name(self.rank), note_text(note))
        try:
            amend_manifest(self.path, RECORDING_STOPPED, note)
        except (ValueError, InputError, WriteError):
            return note
        return None


def raise_failures(writer: WriteThread, path: Path, noted: StopNote | None) -> None:
    """The writer's failed writes that no Recorder took, as its WriteError, noted first as the
    Recorder would have (`noted`: on_write_error="warn"; None: not noted)."""
    failures = writer.take_failures()
    if failures:
        error = writer_failure(path, failures)
        if noted is not None:
            noted.write(str(error), failures[0].step)
        raise error
