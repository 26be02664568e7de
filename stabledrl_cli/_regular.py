"""Opening a file named as data (a run's manifest and step files, a baseline, an imported
log): only a regular file is read. It is opened without waiting (a FIFO that no process writes
would block a plain open for ever) and checked on the open descriptor, so a FIFO, a device
(`/dev/zero` never ends), a socket or a directory is closed unread, whatever the name pointed
at when it was looked up."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


class NotRegularFile(Exception):
    """The name opened is not a regular file: it was closed unread."""


def open_regular(
    path: str | os.PathLike[str], *, follow_links: bool = True
) -> tuple[BinaryIO, os.stat_result]:
    """`path` opened for reading, with its `fstat`. With `follow_links` False a symlink is
    never followed (the open fails with ELOOP). Raises NotRegularFile, or the OSError of the
    open."""
    fd, info = open_regular_fd(path, os.O_RDONLY | (0 if follow_links else os.O_NOFOLLOW))
    return os.fdopen(fd, "rb"), info


def open_regular_fd(
    path: str | os.PathLike[str], flags: int, mode: int = 0o644
) -> tuple[int, os.stat_result]:
    """`path` opened with `flags` (and O_NONBLOCK; `mode` for a file O_CREAT makes): its
    descriptor and `fstat`. Raises NotRegularFile (the descriptor closed), or the OSError of
    the open."""
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile(os.fspath(path))
    return fd, info
