"""The lock around the recording of a step (`bootstrap`), which knows the thread holding it."""

from __future__ import annotations

import threading


class RunLock:
    """A lock that knows its holder: a signal handler runs in the main thread between two of
    its instructions, and one that ends the process (os._exit) while that thread holds the
    lock, inside a step being recorded, must not wait for it: it is never given back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self._holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._holder = None
        self._lock.release()

    def held_here(self) -> bool:
        """Whether the calling thread holds it (its signal handler interrupted it so)."""
        return self._holder == threading.get_ident()
