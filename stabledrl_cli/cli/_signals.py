"""Signal handlers for the length of a command's work (`watch`, `import` and `pack` stop on
SIGTERM as on Ctrl-C, `record` passes SIGTERM and SIGHUP on to its command)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import FrameType
from typing import Any

import typer

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli.cli._output import err

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
def stopped_by_sigterm() -> Iterator[None]:
    """Inside: SIGTERM stops the work as Ctrl-C does, its half-written output removed on the
    way out, then ends the command with 143 and the line `stopped by SIGTERM`. Outside, SIGTERM
    ends the process at once, as before."""
    try:
        with sigterm_handled(terminate):
            yield
    except Terminated:
        err.print("stopped by SIGTERM", highlight=False)
        raise typer.Exit(SIGNALLED + signal.SIGTERM) from None
