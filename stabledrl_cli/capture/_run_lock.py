"""The lock around the recording of a step (`bootstrap`), which knows the thread holding it."""

from __future__ import annotations

import threading
from collections.abc import Callable


class RunLock:
    """A lock that knows its holder: a signal handler runs in the main thread between two of
    its instructions, and one that ends the process while that thread holds the lock, inside
    a step being recorded, must not wait for it: os._exit writes without it (the thread never
    goes on), a SIGTERM has the thread finish the step first (`after_release`). An RLock's
    owner is set as it is taken, with no instruction between for a handler to run at; a thread
    that takes it again goes through (a step a handler of its own logs is refused before:
    `bootstrap.inside_a_step`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._then: tuple[int, Callable[[], object]] | None = None
        """What the holder runs once it gives the lock back, and that thread."""

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        then = self._then
        if then is not None and then[0] == threading.get_ident() and not self.held_here():
            self._then = None
            then[1]()

    def held_here(self) -> bool:
        """Whether the calling thread holds it (its signal handler interrupted it so)."""
        owned: bool = self._lock._is_owned()  # type: ignore[attr-defined]
        return owned

    def after_release(self, then: Callable[[], object]) -> bool:
        """Whether the calling thread holds it; if so, it runs `then` once it gives it back."""
        if not self.held_here():
            return False
        self._then = threading.get_ident(), then
        return True
