"""Signal handlers for the length of a command's work (`watch`, `import` and `pack` stop on
SIGTERM as on Ctrl-C, `record` passes SIGTERM and SIGHUP on to its command)."""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import FrameType
from typing import Any

import typer

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli.cli._output import err, writing_again

Handler = Callable[[int, FrameType | None], Any]


@contextmanager
def signals_handled(handler: Handler, *signals: signal.Signals) -> Iterator[None]:
    """Inside: each of `signals` runs `handler`, and the handlers it replaced are back after.
    In the main thread only, the one thread Python lets set a handler: called from another (a
    command invoked from a thread), the signals stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with ExitStack() as restore:
        for signum in signals:
            restore.callback(signal.signal, signum, signal.signal(signum, handler))
        yield


def sigterm_handled(handler: Handler) -> AbstractContextManager[None]:
    """Inside: SIGTERM runs `handler` (`signals_handled`)."""
    return signals_handled(handler, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM during a command's work (a BaseException, as KeyboardInterrupt: no handler of
    an error on the way catches it, every cleanup runs)."""


def terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM's handler during the work: stops it as Ctrl-C does, once (a second SIGTERM while
    it stops is ignored, so it cannot cut the cleanup short)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextmanager
def lost_stops_delivered_again() -> Iterator[None]:
    """Inside: a `Terminated` or a Ctrl-C's KeyboardInterrupt that Python swallowed is raised
    again. A handler raises where the main thread happens to be, and there it can be a weakref
    callback or a `__del__` (h5py runs them as it closes objects) or an import's lock
    callback: Python prints "Exception ignored in ..." and goes on, and the work would finish
    and exit 0, deaf to the signal. `sys.unraisablehook` sees each such exception: for a
    `Terminated` it puts `terminate` back, and a thread sends the signal (SIGTERM, or SIGINT for
    a KeyboardInterrupt) to the main thread again once the hook has returned (sent from the
    hook itself, it would be raised, and lost, there), so it is raised within a few
    milliseconds, in the work. Work that ends before that ends as it would have without the
    signal. Other exceptions go to the hook there was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = sys.unraisablehook
    inside = threading.Event()

    def deliver_again(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Terminated):
            signal.signal(signal.SIGTERM, terminate)
            signum = signal.SIGTERM
        elif isinstance(unraisable.exc_value, KeyboardInterrupt):
            signum = signal.SIGINT
        else:
            previous(unraisable)
            return
        hook_returned = threading.Event()
        resend = threading.Thread(target=_resend, args=(signum, hook_returned, inside), daemon=True)
        resend.start()
        hook_returned.set()

    inside.set()
    sys.unraisablehook = deliver_again
    try:
        yield
    finally:
        inside.clear()
        sys.unraisablehook = previous


def _resend(
    signum: signal.Signals, hook_returned: threading.Event, inside: threading.Event
) -> None:
    hook_returned.wait()
    if inside.is_set():
        _thread.interrupt_main(signum)


@contextmanager
def stopped_by_sigterm(*, as_interrupt: bool = False) -> Iterator[None]:
    """Inside: SIGTERM stops the work as Ctrl-C does, its half-written output removed on the
    way out, then ends the command with 143 and the line `stopped by SIGTERM` (a stop or a
    Ctrl-C raised inside a finalizer, where Python swallows it, is raised again:
    `lost_stops_delivered_again`).
    Outside, SIGTERM ends the process at once, as before. `as_interrupt`: the stop is raised
    as a KeyboardInterrupt, for work that waits in Ray, whose wait turns any other exception
    raised in it into a SystemError."""
    received = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        received.set()
        if not as_interrupt:
            terminate(signum, frame)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        with lost_stops_delivered_again(), sigterm_handled(stop):
            yield
    except (Terminated, KeyboardInterrupt) as stopped:
        if isinstance(stopped, KeyboardInterrupt) and not received.is_set():
            raise  # a Ctrl-C, not a SIGTERM (a Terminated is one however it was raised)
        writing_again()
        err.print("stopped by SIGTERM", highlight=False)
        raise typer.Exit(SIGNALLED + signal.SIGTERM) from None
