"""Opening a file named as data (a run's manifest and step files, a baseline, an imported
log): only a regular file is read. It is opened without waiting (a FIFO that no process writes
would block a plain open for ever) and checked on the open descriptor, so a FIFO, a device
(`/dev/zero` never ends), a socket or a directory is closed unread, whatever the name pointed
at when it was looked up."""

from __future__ import annotations

import os
import select
import stat
import time
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


def read_pipe(path: str | os.PathLike[str], limit: int, seconds: float) -> bytes:
    """What the pipe `path` (a FIFO, a shell's `<(...)`) gives until its writer closes it: at
    most `limit` + 1 bytes (a longer stream is cut there, for the caller to refuse), within
    `seconds` (TimeoutError past them: a writer that never ends). A FIFO that no process
    writes gives nothing at once. Raises NotRegularFile when `path` is no pipe, or the
    OSError of the open or of a read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise NotRegularFile(os.fspath(path))
        try:
            return read_until_closed(fd, time.monotonic() + seconds, limit)
        except TimeoutError:
            raise TimeoutError(f"its writer gave no end in {seconds:g} s") from None
    finally:
        os.close(fd)


def read_until_closed(fd: int, deadline: float, limit: int | None = None) -> bytes:
    """What the pipe `fd` gives until its writer closes it (or until `limit` + 1 bytes), read
    without blocking; TimeoutError at `deadline` (`time.monotonic()`). A pipe that no process
    has open for writing gives nothing at once."""
    os.set_blocking(fd, False)
    parts: list[bytes] = []
    size = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while limit is None or size <= limit:
        try:
            part = os.read(fd, 1 << 16 if limit is None else limit + 1 - size)
        except BlockingIOError:  # a writer, nothing written yet
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, round(remaining * 1000))):
                raise TimeoutError from None
            continue
        if not part:  # the writer closed it (or none had it open)
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)
