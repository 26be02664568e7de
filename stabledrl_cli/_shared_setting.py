"""A process-wide setting that code changes for the length of a block, shared by the blocks
that run side by side in threads of one process (`SharedSetting`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class SharedSetting:
    """A process-wide setting (torch's thread count, a warnings filter) that a pass over a run
    changes for its length, when passes run side by side in threads of one process: the first
    block in changes it, the last out restores what the first found (each block restoring what
    it found itself would leave the setting another block made, for good)."""

    def __init__(self, change: Callable[[], Callable[[], None]]) -> None:
        """`change` makes the setting and returns what restores the one it replaced."""
        self._change = change
        self._lock = threading.Lock()
        self._blocks = 0
        self._restore: Callable[[], None] | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """The setting made for the block (and every block under way beside it)."""
        with self._lock:
            if self._blocks == 0:
                self._restore = self._change()
            self._blocks += 1
        try:
            yield
        finally:
            with self._lock:
                self._blocks -= 1
                if self._blocks == 0 and self._restore is not None:
                    restore, self._restore = self._restore, None
                    restore()
