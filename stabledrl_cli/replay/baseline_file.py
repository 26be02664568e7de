"""A baseline file's bytes (`baseline_read.load_baseline`): a regular file of bounded size, or
a pipe read to its end in bounded time."""

from __future__ import annotations

import os

from stabledrl_cli._regular import NotRegularFile, open_regular, read_pipe
from stabledrl_cli.errors import InputError

BASELINE_LIMIT = 16 * 1024 * 1024
"""Bytes a baseline file may have (a real one is a few KB): a larger file is refused unread."""
PIPE_SECONDS = 60.0
"""How long a baseline given as a pipe (`-b <(git show main:b.json)`) may take to arrive."""


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The baseline file's bytes: a regular file (a symlink to one too) of at most
    `BASELINE_LIMIT` bytes, read in one bounded read, or a pipe (a FIFO, a shell's `<(...)`)
    read to its end within `PIPE_SECONDS`. A device or socket is refused, never read (it
    could never end: /dev/zero); InputError naming the file."""
    where = str(path)
    try:
        handle, info = open_regular(path)
    except FileNotFoundError:
        raise InputError(f"no such baseline: {where}") from None
    except NotRegularFile:
        return _read_pipe(path)
    except OSError as exc:
        raise InputError(f"{where}: cannot read the baseline ({exc})") from None
    raw = b""
    with handle:
        size = info.st_size
        if size <= BASELINE_LIMIT:  # else refused unread
            try:
                raw = handle.read(BASELINE_LIMIT + 1)  # bounded: the file may have grown
            except OSError as exc:
                raise InputError(f"{where}: cannot read the baseline ({exc})") from None
            size = max(size, len(raw))
    if size > BASELINE_LIMIT:
        raise InputError(f"{where}: baseline of {size} bytes is larger than {BASELINE_LIMIT}")
    return raw


def _read_pipe(path: str | os.PathLike[str]) -> bytes:
    """The baseline given as a pipe (`read_bytes`); InputError when it is no pipe, gives no
    end in `PIPE_SECONDS` or more than `BASELINE_LIMIT` bytes."""
    where = str(path)
    try:
        raw = read_pipe(path, BASELINE_LIMIT, PIPE_SECONDS)
    except NotRegularFile:
        raise InputError(f"{where}: the baseline is not a file or a pipe") from None
    except (OSError, TimeoutError) as exc:
        raise InputError(f"{where}: cannot read the baseline ({exc})") from None
    if not raw:
        raise InputError(f"{where}: the baseline pipe gave nothing (no process wrote to it)")
    if len(raw) > BASELINE_LIMIT:
        raise InputError(f"{where}: baseline of more than {BASELINE_LIMIT} bytes")
    return raw
