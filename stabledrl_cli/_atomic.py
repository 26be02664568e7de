"""The one way the tool writes a file: a temporary name beside the target, every byte written
and fsynced, `os.replace` onto the final name, then the directory fsynced. A reader sees the
old file or the new one, never half of one, and a crash after the call returns cannot lose it.

Every writer (step files, manifests, archives, reports, baselines, JUnit, plots) goes through
`write_atomic` (bytes in hand) or `atomic_path` (a library such as h5py or matplotlib writes
the temporary file itself). A failed write removes the temporary file and raises `WriteError`
naming the target; "no space left on device" is named as such.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stabledrl_cli.errors import WriteError


def temp_name(target: Path) -> Path:
    """The temporary name of `target` while it is written: `.NAME.tmp-PID` beside it."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Makes a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flushes a closed file's data to disk (for files a library wrote itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(target: Path, exc: OSError) -> WriteError:
    """The one-line error of a failed write of `target`."""
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return WriteError(f"{target}: cannot write it ({reason})")


_GATHERED = 1 << 16
"""Parts shorter than this are gathered into one write (a step file of small arrays is one
system call, not one a tensor); longer ones are written from where they lie."""


def _write_all(fd: int, parts: Iterable[bytes | memoryview]) -> None:
    """Every byte of `parts`, in order (the short ones gathered, `_GATHERED`)."""
    gathered = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        if view.nbytes < _GATHERED:
            gathered += view
            continue
        _write_view(fd, gathered)
        gathered = bytearray()
        _write_view(fd, view)
    _write_view(fd, gathered)


def _write_view(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(
    target: str | os.PathLike[str],
    parts: bytes | Iterable[bytes | memoryview],
    *,
    temp: Path | None = None,
) -> Path:
    """Writes `parts` to `target` atomically and durably (module docstring); -> the target.

    temp: the temporary name to use (default `temp_name(target)`); step files use their own
    pattern so that readers of a live run recognise them as in flight.
    """
    final = Path(target)
    chunks = [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts
    tmp = temp if temp is not None else temp_name(final)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, chunks)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(final, exc) from None
    return final


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """`with atomic_path(target) as temp:` the body writes the file at `temp` and closes it;
    on leaving, the file is fsynced and renamed onto `target` (and the directory fsynced). On
    any exception the temporary file is removed; an OSError becomes `WriteError`."""
    final = Path(target)
    tmp = temp_name(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(final, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
