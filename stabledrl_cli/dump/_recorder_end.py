"""How a `Recorder`'s recording ends: `RecorderEnd`, the part of the Recorder that reports
failed writes, notes a stop or a training cut short, closes, and writes what is queued at
exit or on SIGTERM.

`close()` (or leaving the `with` block) drains the queue (`async_writes`); at
exit, the queue of a Recorder that was never closed is drained too (even when the Recorder
was dropped; in a child process of `multiprocessing`, as its target returns: `_child_end`),
unless its caller closes it at exit itself (`closed_by_caller_at_exit`); a write that fails
then is a warning line. A Recorder dropped unclosed keeps its rank's lock (`_writer_lock`)
until its queue is written. Once its writes are done, `close()` marks a world_size 1 run
`recording_closed` in its manifest (best effort): a reader following the run knows no step
will come. A rank of a larger run adds itself to the manifest's `recording_closed_ranks`
instead, and the rank that completes them marks the run `recording_closed`
(`_manifest_edits.close_rank`). An open Recorder's run has no mark, so a killed recording never
leaves one; `resume=True` and `overwrite=True` remove it.

A failed write (a full disk, a read-only directory) raises WriteError (exit 4) naming the
file, from `log_step` (async: once the steps queued before it are made durable; one that is
not leads that one error, `_step_failed`); an fsync that fails in the writer thread (async:
"not made durable", also for a file gone from under its name) once from the next
`log_step`, `flush` or `close` (with the later steps whose fsyncs failed before it, their
files removed; a `log_step` that raises it has written its own step; a close as a `with`
block ends on an exception warns instead: the block's exception goes on); its temporary file
is removed and the steps written before it stay intact. The Recorder goes on: each later
step is written, or fails, on its own. A failed `rewrite_step` also removes the step's
earlier file (its first half, which would otherwise read as a whole step), as far as the
directory lets it: that step is not recorded. With
`on_write_error="warn"` (what `record -- CMD` and the integrations pass: recording must never
stop training) the first failure instead prints one warning on stderr (async: the steps
queued behind it stay under their names, not made durable), stops recording (later
`log_step` calls return at once) and records in the manifest's `recording_stopped`
({step, rank, reason}) that and why recording stopped (best effort: a full disk may refuse
that too); a rank of a world_size > 1 run first writes the same note into a file of its own,
`steps/stopped.rank-NNNN.json`, which no other rank writes (the manifest holds one note, the
last rank's to stop, and a node's own directory may have none).

A Recorder writes from the process that made it: in a forked child `log_step` and `flush`
raise UsageError (the child would write under the parent's file names, and its copy of the
queue has no writer thread), and `close` leaves the parent's writer alone.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import weakref
from contextlib import suppress
from pathlib import Path
from typing import Any

from stabledrl_cli._child_end import at_child_end
from stabledrl_cli._sigterm import steps_written_on_sigterm
from stabledrl_cli.dump._manifest import RECORDING_CLOSED
from stabledrl_cli.dump._manifest_edits import amend_manifest, close_rank
from stabledrl_cli.dump._step_writes import (
    Failure,
    StepWrite,
    StopNote,
    WriteThread,
    discard_failed,
    raise_failures,
    writer_failure,
)
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.dump._training_end import (
    cut_short,
    normal_end,
    uncaught_at_exit,
    warned_at_the_end,
)
from stabledrl_cli.dump._writer_lock import WriterLock
from stabledrl_cli.errors import InputError, UsageError, WriteError, warn
from stabledrl_cli.vocab import OnWriteError


class RecorderEnd:
    """The end of a Recorder's recording (module docstring); the `Recorder` sets `path`,
    `rank`, `world_size`, `_writer_lock` and `_last_step` before this part is made."""

    path: Path
    rank: int
    world_size: int
    _writer_lock: WriterLock
    _last_step: int | None

    def __init__(
        self,
        on_write_error: OnWriteError,
        *,
        async_writes: bool,
        queue_size: int,
        dropped: weakref.finalize[[], Any],
    ) -> None:
        """The Recorder's state as it starts recording; with `async_writes`, its writer thread
        started (a queue of `queue_size` steps) and its exit handlers registered. `dropped`:
        the finalizer that frees the rank's lock as a Recorder dropped unclosed goes."""
        self.on_write_error: OnWriteError = on_write_error
        self.stopped: str | None = None
        """Why recording stopped (on_write_error="warn" after a failed write, or `note_stop`),
        else None."""
        self.stopped_step: int | None = None
        """The step whose write failed when recording stopped (an async write's failure is
        noticed at a later step's `log_step`), else None."""
        self._interrupted: str | None = None
        """How the training was cut short (`note_interrupted`), noted as it closes; None: it
        was not."""
        self._unapplied = False
        """The exception came in the optimizer step of the last step the run holds: its
        update never applied (`note_interrupted`)."""
        self._unnoted_stop: dict[str, Any] | None = None
        """The `recording_stopped` note the manifest refused (a full disk), else None: the
        run is marked closed only once it holds it, or it would read as a whole recording."""
        self._stop_note = StopNote(self.path, self.rank, self.world_size)
        self._closed = False
        self._closed_marked = False
        """Whether close marked the run `recording_closed` (or, with several ranks, this rank
        closed: `close_rank`)."""
        self._pid = os.getpid()
        """The process that made this Recorder, the only one it writes from."""
        self._lock = threading.RLock()
        """Held by each log_step (rewrite_step, flush's check, close): one step at a time."""
        self._step_thread: int | None = None
        """The thread whose log_step (or rewrite_step) is under way, else None."""
        self._close_deferred = False
        """Whether a close came from that thread itself (a signal handler) during the step."""
        self._writer: WriteThread | None = None
        if async_writes:
            self._writer = WriteThread(queue_size, halt_on_error=on_write_error == "warn")
            self._writer.start()
            # one dropped unclosed notes a failure found at the end as it would have
            noted = self._stop_note if on_write_error == "warn" else None
            self._at_exit = functools.partial(
                _close_at_exit, weakref.ref(self), self._writer, self.path, noted
            )
            self._cancel_on_sigterm = steps_written_on_sigterm(
                functools.partial(
                    _written_on_sigterm, weakref.ref(self), self._writer, self.path, noted
                )
            )
            # after it, which the exit handler cancels: a Recorder cut short between the two
            # (Ctrl-C) is not one whose handler fails at exit
            atexit.register(self._at_exit)
            self._cancel_at_child_end = at_child_end(self._at_exit)
            # one dropped unclosed frees its rank once its queued steps are written; not at
            # exit, where the thread still writes what a late exit handler logs (`_at_exit`)
            dropped.detach()
            weakref.finalize(
                self, self._writer.release_when_written, self._writer_lock
            ).atexit = False

    def _check_process(self, call: str) -> None:
        """UsageError in a child forked from the process that made this Recorder: the child
        would write its steps under the parent's file names, and its copy of the writer queue
        has no thread to empty it."""
        if os.getpid() != self._pid:
            raise UsageError(
                f"{call} in a forked child process (pid {os.getpid()}) of the process that made "
                f"the Recorder (pid {self._pid}): a process records with its own Recorder"
            )

    def flush(self) -> None:
        """Waits until every queued step is durable (a no-op for synchronous writes)."""
        self._check_process("flush")
        if self._writer is not None:
            self._writer.queue.join()
        with self._lock:
            self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        """Reports the writer thread's failed writes since the last report, once."""
        failures = self._writer_failures(drained=False)
        if failures:
            first = failures[0]
            error = writer_failure(self.path, failures)
            self._write_failed(error, first.step, cause=first.error)

    def _writer_failures(self, *, drained: bool) -> list[Failure]:
        """The writer thread's failed writes not yet reported, oldest first; `drained`: once
        every queued step is made durable or has failed."""
        writer = self._writer
        if writer is None or self.stopped is not None:
            return []
        failures = writer.take_failures()
        if drained and writer.is_alive():
            writer.queue.join()
            failures += writer.take_failures()
        return failures

    def _step_failed(self, error: WriteError, item: StepWrite) -> None:
        """Reports that `item`'s own write failed (`error`), after removing what the write left
        under the step's name (`discard_failed`). With async writes the steps
        queued before it are made durable first (that first half too): when one of them is
        not, the one report names the first such step (and the stop note's step is that
        one), then the later ones and `item`'s."""
        failures = self._writer_failures(drained=True)
        discard_failed(item)
        step = item.step
        if not failures:
            self._write_failed(error, step)
            return
        first = failures[0]
        message = writer_failure(self.path, failures)
        own = WriteError(f"{message}; step {step} not written either: {error}")
        self._write_failed(own, first.step, cause=first.error)

    def _write_failed(
        self, error: WriteError, step: int | None, cause: BaseException | None = None
    ) -> None:
        """Raises `error`, or (on_write_error="warn") warns once, stops recording and notes it
        in the manifest."""
        if self.on_write_error == "raise":
            raise error from cause
        warn(f"stabledrl: warning: recording stopped, training goes on: {error}\n")
        self._note_stop(str(error), step)

    def note_stop(self, reason: str, step: int | None) -> None:
        """Stops recording for `reason`, which the caller has reported (an integration that
        cannot record `step`, training going on): later steps are not written, and the stop
        is noted as a failed write's is under on_write_error="warn". A no-op once stopped."""
        with self._lock:
            if self.stopped is None and not self._closed:
                self._note_stop(reason, step)

    def note_interrupted(
        self, cause: BaseException | None = None, *, unapplied: bool = False
    ) -> None:
        """The training was cut short, by Ctrl-C or by `cause` (the exception that ended it;
        None: a KeyboardInterrupt): as the Recorder closes, once its steps are written, the
        run notes it after the last step it holds (the manifest's `recording_stopped`: how,
        `cut_short`; the Recorder is not stopped by it, so no failure is reported), unless a
        failed write stopped recording already: closed on the way out, the run would read as
        a finished one of fewer steps. `unapplied`: the exception came in the optimizer step
        of the last step the run holds (CUDA out of memory in Adam's first step), whose batch
        is recorded but whose update never applied: the note says so. The first note holds
        (a with-block's after an integration's own)."""
        if self._interrupted is None:
            self._interrupted = cut_short(cause or KeyboardInterrupt())
            self._unapplied = unapplied

    def _note_stop(self, reason: str, step: int | None) -> None:
        """Marks the Recorder stopped and notes it (`_write_stop_note`)."""
        self.stopped, self.stopped_step = reason, step
        self._write_stop_note(reason, step)

    def _write_stop_note(self, reason: str, step: int | None) -> None:
        """Notes the stop (`StopNote`); one the manifest refused is tried again before the run
        is marked closed."""
        refused = self._stop_note.write(reason, step)
        if refused is not None:
            self._unnoted_stop = refused

    def close(self) -> None:
        """Drains the queue (async mode), stops the writer and marks the run `recording_closed`
        (with several ranks, this rank closed; the last rank to close marks the run).
        Idempotent; a close interrupted while it drains (a second Ctrl-C) is finished by the
        next call, at the latest by the one at exit. In a forked child it only closes the
        child's copy: the writer is the parent's. Once nothing is left to write, the rank is
        free for another Recorder. Made by a signal handler in the thread of a step under way,
        it writes the queued steps and leaves the rest to the step's end. As the interpreter
        ends (a generator holding a with-Recorder block, finalized after the exit handlers), it
        is too late to write (imports fail): the run reads unclosed, as a Recorder left open."""
        if sys.is_finalizing():
            return
        if self._step_thread == threading.get_ident():  # a signal handler's, during a step
            self._close_deferred = True
            if self._writer is not None and self._writer.is_alive():
                self._writer.queue.join()  # the steps before it, for a handler that os._exits
            return
        own = os.getpid() == self._pid
        writer = self._writer if own else None
        try:
            if writer is not None and writer.is_alive():
                with self._lock:  # a log_step under way in another thread is queued first
                    self._closed = True
                    writer.stop()
                    self._cancel_on_sigterm()
                    self._drop_exit_handlers()  # (held the writer until the process ended)
                    self._raise_writer_error()
            if own:
                self._note_cut_short()
                self._mark_run_closed(closing=True)
            self._closed = True
        finally:
            if writer is None or not writer.is_alive():
                self._writer_lock.release()

    def _note_cut_short(self) -> None:
        """Notes how the training was cut short (`note_interrupted`), after the run's last
        step, before the run is marked closed; nothing once a failed write stopped it."""
        if self._interrupted and self.stopped is None and not self._closed_marked:
            last = self._last_step
            after = "before its first step" if last is None else f"after step {last}"
            if last is not None and self._unapplied:
                after = f"in step {last}, its update not applied"
            step = None if last is None else last + 1
            self._write_stop_note(f"training {self._interrupted} {after}", step)

    def end_at_exit(self) -> None:
        """At exit (the Recorder's own exit handler, async_writes): its queued steps are
        written and the run marked closed, as by `close`, but the Recorder stays open, writing
        at once: an exit handler of the script registered before the Recorder was made runs
        after this one (Python runs them last-registered first), and a step it logs is
        recorded rather than refused (which would skip the rest of that handler)."""
        if self._closed or os.getpid() != self._pid:
            self.close()  # finishes a close interrupted while it drained; a forked child's copy
            return
        writer = self._writer
        if writer is not None and writer.is_alive():
            with self._lock:
                writer.stop()
                self._cancel_on_sigterm()
                try:
                    self._raise_writer_error()
                finally:
                    self._writer = None  # later steps are written by log_step itself
        self._note_cut_short()
        self._mark_run_closed(closing=False)
        self._writer_lock.release()  # the process ends: the run reads as closed, not died

    def _mark_run_closed(self, *, closing: bool) -> None:
        """Marks the run `recording_closed` (with several ranks, this rank closed: module
        docstring), once, best effort, under the lock: a log_step under way in another thread
        lands first. `closing`: the Recorder closes with it (`close`); else it goes on writing
        at once (`end_at_exit`)."""
        if self._closed_marked:
            return
        with self._lock:
            self._closed = self._closed or closing
            self._closed_marked = True
            with suppress(ValueError, InputError, WriteError):  # best effort
                if self._unnoted_stop is not None:  # never closed as if whole: unmarked then
                    amend_manifest(self.path, RECORDING_STOPPED, self._unnoted_stop)
                    self._unnoted_stop = None
                if self.world_size == 1:
                    amend_manifest(self.path, RECORDING_CLOSED, True)
                else:
                    close_rank(self.path, self.rank, self.world_size)

    def closed_by_caller_at_exit(self) -> None:
        """Leaves closing this Recorder at exit to the caller (`close`), which does it later
        than the Recorder's own exit handler (async_writes) would run: that handler is
        removed. `record -- CMD` closes its run after every exit handler of the command, so
        that one registered before the run opened may still log a step."""
        if self._writer is not None:
            self._drop_exit_handlers()

    def _drop_exit_handlers(self) -> None:
        """Removes this Recorder's exit handlers (async_writes), which hold its writer."""
        atexit.unregister(self._at_exit)
        self._cancel_at_child_end()

    def __exit__(self, exc_type: object, exc: BaseException | None, traceback: object) -> None:
        """Closes the Recorder. When the block raised, its exception goes on: a failed write
        that the close reports (async writes) is then a warning, not an error in its place;
        the run first notes how its training was cut short (`note_interrupted`), but by a
        `sys.exit(0)` or a generator's close, a normal end (`normal_end`)."""
        if exc is None or normal_end(exc):
            self.close()
            return
        self.note_interrupted(exc)
        try:
            self.close()
        except WriteError as error:
            warn(f"stabledrl: warning: {error}\n")


def _close_at_exit(
    ref: weakref.ref[RecorderEnd], writer: WriteThread, path: Path, noted: StopNote | None
) -> None:
    """At exit: closes the Recorder; one dropped unclosed still has its queued steps written.
    A write that fails then, and that its caller has not been told of, is one warning line: no
    caller is left to raise it to."""
    recorder = ref()
    with warned_at_the_end():
        if recorder is not None:
            uncaught = uncaught_at_exit()
            if uncaught is not None:
                recorder.note_interrupted(uncaught)
            recorder.end_at_exit()
        else:  # (in a forked child the copy's thread is not alive: nothing to do)
            writer.stop()
            raise_failures(writer, path, noted)


def _written_on_sigterm(
    ref: weakref.ref[RecorderEnd], writer: WriteThread, path: Path, noted: StopNote | None
) -> None:
    """On a SIGTERM that ends the process at once (`_sigterm`): the queued steps are written,
    without the Recorder's lock (the training thread may have been stopped holding it), and
    the run is left unclosed, as a killed recording leaves it. A write that fails then is one
    warning line, as at exit."""
    if writer.is_alive():
        writer.queue.join()
    recorder = ref()
    with warned_at_the_end():
        if recorder is not None:
            recorder._raise_writer_error()
        else:
            raise_failures(writer, path, noted)
