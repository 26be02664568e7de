"""SIGTERM's handler for the length of a command's work (`watch` stops as on Ctrl-C, `record`
passes it on to its command)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]


@contextmanager
def sigterm_handled(handler: Handler) -> Iterator[None]:
    """Inside: SIGTERM runs `handler`, and the handler it replaced is back after. In the main
    thread only, the one thread Python lets set a handler: called from another (a command
    invoked from a thread), SIGTERM stays as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
