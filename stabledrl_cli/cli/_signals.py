"""Signal handlers for the length of a command's work (`watch` stops on SIGTERM as on Ctrl-C,
`record` passes SIGTERM and SIGHUP on to its command)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import FrameType
from typing import Any

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
