"""Reading ahead of the computation: an iterator's next items made on a thread of their own.

A replay reads a chunk of steps (file reads, CRCs, decompression, copies: outside Python's
lock) and then computes on it (torch kernels: outside it too). `read_ahead` overlaps the two:
while the caller computes on one item, a reader thread makes the next, so a replay takes about
the longer of reading and computing instead of their sum. At most `depth` items exist beyond
the one the caller holds (made and waiting, or being made): the reader starts an item only
once the caller has taken the one before. Items come out in order; an exception raised while
making an item is raised to the caller at that item, after every item before it. Closing the
iterator early (an error in the caller, a break) stops the reader before its next item.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

_T = TypeVar("_T")

DEPTH = 1
"""Items made ahead of the caller's, at most."""
_POLL_S = 0.1
"""How often a reader waiting for room looks whether the caller has gone."""


class _End:
    """The reader's last message: the items are exhausted, or `error` stopped them."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def read_ahead(items: Iterator[_T], depth: int = DEPTH) -> Iterator[_T]:
    """`items`, each made on a reader thread at most `depth` items ahead of the caller."""
    made: queue.SimpleQueue[_T | _End] = queue.SimpleQueue()
    room = threading.Semaphore(depth)
    gone = threading.Event()

    def wait_for_room() -> bool:
        """True once the reader may make its next item; False once the caller has gone."""
        while not gone.is_set():
            if room.acquire(timeout=_POLL_S):
                return True
        return False

    def read() -> None:
        try:
            while wait_for_room():
                try:
                    item = next(items)
                except StopIteration:
                    made.put(_End())
                    return
                made.put(item)
        except BaseException as exc:  # raised to the caller, in order, at this item
            made.put(_End(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's own cleanup, on the thread that runs it

    reader = threading.Thread(target=read, name="stabledrl-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            message = made.get()
            room.release()
            if isinstance(message, _End):
                if message.error is not None:
                    raise message.error
                return
            yield message
    finally:
        gone.set()
        reader.join()
