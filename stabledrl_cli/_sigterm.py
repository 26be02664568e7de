"""SIGTERM's default action, with the recorded steps written first.

A scheduler or `timeout` stops a job with SIGTERM, and a script that leaves SIGTERM at its
default action dies on the spot: no exit handler runs, so the steps the optimizer hooks hold
(the first one, waiting for the next event) or that a Recorder has queued for its thread
(`async_writes`) would die with it. Where SIGTERM has its default action when the hooks are
installed under `record`, or when such a Recorder is made, SIGTERM gets a handler that writes
them (at most `WRITE_SECONDS` for all), then ends the process by SIGTERM's default action, its
exit handlers unrun, as it would have ended. A second SIGTERM meanwhile is
ignored (a scheduler that signals every process of the job reaches the command twice, directly
and through `record`).

Python runs a handler in the main thread, between two of its instructions: a main thread held
in a C call (a collective waiting for a rank that died) would run it only once the call
returns. So the signal also wakes a thread of ours (`signal.set_wakeup_fd`, when no one else
uses it), which does the same at once; whichever comes first does it. A handler that comes
while the main thread is in the middle of recording a step, holding the lock that the writing
takes, does not wait for it there (the thread would never give it back): that thread finishes
the step and stops as it gives the lock back, while the steps are written (`after_the_step`).

The handler is hidden: `signal.getsignal` and `signal.signal` show the default action in its
place. A framework that chains to the handler it replaces (PyTorch Lightning calls a previous
handler, never the default action) or restores the default one itself then does what it does
without `record`; a handler the script sets replaces this one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

WRITE_SECONDS = 10.0
"""How long a SIGTERM waits at most for the steps to be written (a disk that hangs, or the
training thread held in a C call inside the recording code while it holds its lock).
Schedulers wait longer before they kill (SLURM's KillWait and Kubernetes' grace period default
to 30 s)."""

_set_handler = signal.signal
_get_handler = signal.getsignal


def _found_setsig() -> Any:
    """The C API's own call that sets a signal's action from any thread (`PyOS_setsig`), or
    None in a Python without it (then no handler is installed). Looked up as the handler is
    installed: a process with no optimizer hooks and no `async_writes` Recorder never imports
    ctypes."""
    try:
        import ctypes

        set_action = ctypes.pythonapi.PyOS_setsig
    except (ImportError, AttributeError):
        return None
    set_action.argtypes, set_action.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    return set_action


_setsig: Any = None
"""`_found_setsig()`, once the handler is installed (every call of it comes after)."""

AfterTheStep = Callable[[Callable[[], object]], bool]
"""Given what ends the process, whether the calling thread is recording a step, holding the
lock that writing the steps takes; if so, it runs it once the step is recorded."""

_installed: tuple[int, list[tuple[Callable[[], None], AfterTheStep | None]]] | None = None
"""The process that installed the handler (a process forked from it has none of its steps),
and what writes them, in the order they were given, each with its `AfterTheStep`."""

_wakeup: tuple[int, int] | None = None
"""The pipe the signal wakes the watching thread through (read end, write end)."""

_paused: int | None = None
"""SIGTERM's C-level action while a thread forks (`_before_fork`), put back after it."""

_ending = threading.RLock()
"""Taken by the first of the handler and the watching thread to end the process; never given
back, so the other waits for the end. Reentrant: a second SIGTERM that comes while the main
thread runs the handler (before SIGTERM is ignored) runs it again in that thread, which then
ends the process itself rather than wait for its own lock."""


def steps_written_on_sigterm(
    write_steps: Callable[[], None], after_the_step: AfterTheStep | None = None
) -> Callable[[], None]:
    """Has `write_steps` write the held and queued steps on a SIGTERM that would end this
    process at once: adds it to the handler this process installed, or installs the handler
    when SIGTERM has its default action and this is the main thread (only it may set a
    handler). `after_the_step`: for writing that takes a lock the main thread holds while it
    records a step. Returns what takes `write_steps` back (a Recorder that closed has none
    left; nothing to take back where no handler was installed)."""
    global _installed, _wakeup, _setsig
    if _get_handler(signal.SIGTERM) is not _handled:
        if threading.current_thread() is not threading.main_thread():
            return _nothing
        if _get_handler(signal.SIGTERM) is not signal.SIG_DFL:
            return _nothing
        _setsig = _found_setsig()
        if _setsig is None:
            return _nothing
        _install()
    if _installed is None or _installed[0] != os.getpid():
        _installed = os.getpid(), []
    writers, writer = _installed[1], (write_steps, after_the_step)
    writers.append(writer)

    def take_back() -> None:
        with contextlib.suppress(ValueError):
            writers.remove(writer)

    return take_back


def _nothing() -> None:
    pass


def _install() -> None:
    """The handler, and the thread the signal wakes (when no one else uses the wakeup fd)."""
    global _wakeup
    _set_handler(signal.SIGTERM, _handled)
    signal.signal, signal.getsignal = _set_hiding_it, _get_hiding_it
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:  # someone else's (or our own earlier one): theirs back
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        return
    _wakeup = read_end, write_end
    threading.Thread(target=_watch, args=(read_end,), name="stabledrl-sigterm", daemon=True).start()


def _handled(signum: int, frame: FrameType | None) -> None:
    """In the main thread; one in the middle of recording a step goes on to its end, then
    stops there (`AfterTheStep`), while a thread of ours writes the steps and ends the
    process (at most WRITE_SECONDS later, as the watching thread would)."""
    writers = _installed[1] if _installed is not None and _installed[0] == os.getpid() else []
    if any(after(_written_then_ended) for _, after in writers if after is not None):
        with contextlib.suppress(Exception):  # (no thread to be had): the step's end does it
            threading.Thread(
                target=_written_then_ended, name="stabledrl-sigterm", daemon=True
            ).start()
        return
    _written_then_ended()


def _watch(read_end: int) -> None:
    """The watching thread: wakes at every signal that has a Python handler, SIGTERM among
    them when the script replaced this one (then the script's handler takes it)."""
    with contextlib.suppress(OSError):
        while data := os.read(read_end, 512):
            if signal.SIGTERM in data and _get_handler(signal.SIGTERM) is _handled:
                _written_then_ended()


def _written_then_ended() -> None:
    """The steps written, in a thread of their own (the training thread may have been stopped
    inside the recording code, holding a lock the writing takes), then SIGTERM's default
    action. In a process forked from the one that installed it: the default action at once."""
    _ending.acquire()
    _set_action(int(signal.SIG_IGN))
    with contextlib.suppress(Exception):  # (no thread to be had): the process ends all the same
        if _installed is not None and _installed[0] == os.getpid():
            writing = threading.Thread(
                target=_each_written, args=(list(_installed[1]),), name="stabledrl-steps",
                daemon=True,
            )  # fmt: skip
            writing.start()
            writing.join(WRITE_SECONDS)
    _set_action(int(signal.SIG_DFL))
    os.kill(os.getpid(), signal.SIGTERM)


def _each_written(writers: list[tuple[Callable[[], None], AfterTheStep | None]]) -> None:
    """Each writer in turn: one that fails leaves the others theirs to write."""
    for write_steps, _ in writers:
        with contextlib.suppress(Exception):
            write_steps()


def _set_action(action: int | None) -> int | None:
    """Sets SIGTERM's action (a `signal.Handlers`, or the C address `_set_action` returned) from
    any thread (Python's `signal.signal` is the main thread's alone); the action it replaced."""
    previous: int | None = _setsig(signal.SIGTERM, action)
    return previous


def _before_fork() -> None:
    """A child forked with the handler in place would lose a SIGTERM that comes before it
    runs any Python (CPython forgets a signal caught then); with the default action it ends
    at once, as without the handler. So the default action stands while a thread forks."""
    global _paused
    if _get_handler(signal.SIGTERM) is _handled:
        _paused = _set_action(int(signal.SIG_DFL))


def _after_fork_in_parent() -> None:
    global _paused
    if _paused is not None:
        _set_action(_paused)
        _paused = None


def _forked_child() -> None:
    """The child takes the default action, and lets the parent's wakeup pipe go (a signal to
    the child would wake the parent's thread, which would end the parent)."""
    global _wakeup, _ending, _paused
    _ending, _paused = threading.RLock(), None
    if _get_handler(signal.SIGTERM) is _handled:
        _set_handler(signal.SIGTERM, signal.SIG_DFL)
    if _wakeup is not None:
        with contextlib.suppress(ValueError):
            previous = signal.set_wakeup_fd(-1)
            if previous != _wakeup[1]:  # another's since: kept
                signal.set_wakeup_fd(previous)
        for end in _wakeup:
            with contextlib.suppress(OSError):
                os.close(end)
        _wakeup = None


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_forked_child
)


def _shown(handler: Any) -> Any:
    return signal.SIG_DFL if handler is _handled else handler


@functools.wraps(signal.getsignal)
def _get_hiding_it(signalnum: int) -> Any:
    return _shown(_get_handler(signalnum))


@functools.wraps(signal.signal)
def _set_hiding_it(signalnum: int, handler: Any) -> Any:
    return _shown(_set_handler(signalnum, handler))
