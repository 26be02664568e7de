"""Bounded reading of a log file: its size is checked before a byte is read, lines have a
length limit, and text must be UTF-8. Every refusal is an InputError (exit 3) naming the file."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.errors import InputError

INPUT_LIMIT = 1 << 30
"""Largest log imported (bytes; a TensorBoard directory's files together)."""
DOCUMENT_LIMIT = 128 << 20
"""Largest single JSON document (trainer_state.json) parsed at once (bytes)."""
LINE_LIMIT = 1 << 20
"""Longest line of a JSON-lines or CSV log (bytes)."""
LINE_COUNT_LIMIT = 2_000_000
"""Most lines of a JSON-lines or CSV log (each costs time, whether it adds a value or not)."""
ENTRY_LIMIT = 10_000
"""Most entries of a directory looked at for subdirectories that hold logs."""


def checked_size(path: Path, limit: int = INPUT_LIMIT) -> int:
    """The size of regular file `path`, refused past `limit` before it is read."""
    try:
        info = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if info.st_size > limit:
        raise InputError(f"{path}: {info.st_size} bytes, over the {limit >> 20} MiB import limit")
    return info.st_size


def open_log(path: Path, limit: int = INPUT_LIMIT) -> BinaryIO:
    """`path` opened for reading: a regular file (anything else is refused unread) of at most
    `limit` bytes, an InputError when it cannot be."""
    try:
        handle, info = open_regular(path)
    except NotRegularFile:
        raise InputError(f"{path}: not a regular file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if info.st_size > limit:
        handle.close()
        raise InputError(f"{path}: {info.st_size} bytes, over the {limit >> 20} MiB import limit")
    return handle


def subdirectories(path: Path, holds_log: Callable[[Path], bool]) -> list[str]:
    """The names of `path`'s subdirectories for which `holds_log` holds, sorted (among its
    first ENTRY_LIMIT entries; none when it cannot be listed)."""
    found = []
    try:
        for number, entry in enumerate(path.iterdir()):
            if number >= ENTRY_LIMIT:
                break
            if entry.is_dir() and holds_log(entry):
                found.append(entry.name)
    except OSError:
        pass  # only a hint of a message: the log itself is read, and refused, elsewhere
    return sorted(found)


def decoded(raw: bytes, where: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped), else an InputError: binary data."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text (binary data?)") from None


def text_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number from 1, text without its newline, whether a newline ended it) of a text
    log as it was when opened (its size then: lines a live writer appends later are not read,
    or the import of a log written faster than it is read would end past a bound it never
    had): at most LINE_COUNT_LIMIT lines, each at most LINE_LIMIT bytes."""
    with open_log(path) as handle:
        left = os.fstat(handle.fileno()).st_size
        number = 0
        while left > 0:
            raw = handle.readline(min(LINE_LIMIT + 1, left))
            if not raw:
                return
            left -= len(raw)
            number += 1
            if number > LINE_COUNT_LIMIT:
                raise InputError(f"{path}: more than {LINE_COUNT_LIMIT} lines")
            ended = raw.endswith(b"\n")
            if len(raw) - ended > LINE_LIMIT:
                raise InputError(f"{path}: line {number} is longer than {LINE_LIMIT >> 20} MiB")
            if b"\0" in raw:
                raise InputError(f"{path}: line {number} holds a NUL byte (binary data?)")
            yield number, decoded(raw, f"{path}: line {number}").rstrip("\r\n"), ended


SCAN_LIMIT = 64 << 20
"""How far into a file `first_line_kind` looks for a console line: a job prints its setup
(Ray's start, the config, model loading, a validation) before its first step."""
_SCAN_COLOURS = re.compile(rb"\x1b\[[0-9;]*m")


def first_line_kind(path: Path, kinds: Mapping[str, re.Pattern[bytes]]) -> str | None:
    """The first of `kinds`, in their order, whose pattern `search`es a line in the first
    SCAN_LIMIT bytes of the file at `path` (colour codes taken out; a carriage return starts
    a line, as on the terminal: a progress bar's, in a file of stdout and stderr both); None
    if none does."""
    found: set[str] = set()
    with open_log(path) as handle:
        read = 0
        while read < SCAN_LIMIT and (line := handle.readline(LINE_LIMIT)):
            read += len(line)
            parts = _SCAN_COLOURS.sub(b"", line).split(b"\r")
            found.update(
                kind
                for kind, pattern in kinds.items()
                if any(pattern.search(part) for part in parts)
            )
            if next(iter(kinds)) in found:
                break
    return next((kind for kind in kinds if kind in found), None)
