"""The one way the tool writes a file: a temporary name beside the target, every byte written
and fsynced, `os.replace` onto the final name, then the directory fsynced. A reader sees the
old file or the new one, never half of one, and a crash after the call returns cannot lose it.

Every writer (step files, manifests, archives, reports, baselines, JUnit, plots) goes through
`write_atomic` (bytes in hand; `write_durably` is the same with the paths already spelled
out, for step files) or `atomic_path` (a library such as h5py or matplotlib writes the
temporary file itself). A failed write removes the temporary file and raises `WriteError`
naming the target; "no space left on device" is named as such. A writer killed outright
(SIGKILL, a crash) leaves its temporary file; `atomic_path` removes those of its target whose
process is gone before it writes (`clear_stale_temps`), so they never pile up.

A file the user names (an archive, a report, a baseline, JUnit, a plot) goes through
`write_output` or `output_path` instead. A symlink there is followed: the file it names is
replaced as above and the link stays. What is then neither absent, nor a regular file, nor a
directory (a device such as `/dev/null`, a FIFO) is written in place, as a shell's `>`
writes it, and so is what a link reaches through `/proc`: `/dev/stdout` is a link to the
process's descriptor 1, which is written at its own offset, after what the process printed
(replacing or truncating the file it writes would lose that). A FIFO that no process reads
is refused at once rather than waited on. The tool's own files (a run's manifest and steps)
are never written through a link.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from stabledrl_cli.errors import WriteError

try:
    import fcntl
except ImportError:  # Windows: no flock (and no stale temporary file is cleared there)
    fcntl = None  # type: ignore[assignment]

_NAME_MAX = 255
"""Bytes a file name may take (Linux's and macOS's file systems)."""


def temp_name(target: Path, pid: int | None = None) -> Path:
    """The temporary name of `target` while process `pid` (default: this one) writes it:
    `.NAME.tmp-PID` beside it, NAME cut (and the CRC-32 of the whole name added) when the
    whole would pass `_NAME_MAX` bytes: a name the file system takes must not fail for its
    temporary name."""
    tail = f".tmp-{os.getpid() if pid is None else pid}"
    name = os.fsencode(target.name)
    if 1 + len(name) + len(tail) > _NAME_MAX:
        tail = f".{zlib.crc32(name):08x}{tail}"
        name = name[: _NAME_MAX - 1 - len(tail)]
    return target.with_name(f".{os.fsdecode(name)}{tail}")


_TEMP_PID = re.compile(r".*\.tmp-([0-9]+)", re.DOTALL)
"""A temporary name's writer (`temp_name`)."""


def _gone(pid: int) -> bool:
    """Whether no process `pid` runs here (a process of another user runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _unlocked(path: Path) -> bool:
    """Whether no process holds a `flock` of the file at `path` (where there is `flock`; HDF5
    holds one of each file it writes, and `pack` of its archive)."""
    if fcntl is None:
        return True
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def mark_writing(fd: int) -> None:
    """Takes a `flock` of the open temporary file `fd` (released when the process ends), which
    tells `clear_stale_temps` of any process, here or on another machine sharing the file
    system, that it is being written; best effort (no `flock`, or a file system without
    locks: its process alone tells)."""
    if fcntl is not None:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def clear_stale_temps(target: Path) -> None:
    """Removes the temporary files of `target` (`temp_name`) that a killed writer left: those
    whose process no longer runs and that no process holds a `flock` of. The temporary file
    of a write under way (another process's, or this one's) is left alone, and so is any
    other file. Does nothing where processes cannot be asked after (not a POSIX system), nor
    where the directory cannot be listed; a file that cannot be removed stays."""
    if os.name != "posix":
        return
    with suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            found = _TEMP_PID.fullmatch(entry.name) if entry.name.startswith(".") else None
            if found is None or len(found.group(1)) > 10:  # no process number is that long
                continue
            pid = int(found.group(1))
            if pid <= 0 or pid == os.getpid() or temp_name(target, pid).name != entry.name:
                continue
            path = Path(entry.path)
            with suppress(OSError):
                if entry.is_file(follow_symlinks=False) and _gone(pid) and _unlocked(path):
                    path.unlink()


def fsync_dir(path: str | os.PathLike[str]) -> None:
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


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.ENXIO: "a FIFO that no process reads",
}
"""What a write's error is called where the system's own words would puzzle."""


def missing_directory(target: Path) -> str | None:
    """Why `target` cannot be made where it is named: its directory does not exist, or is not
    a directory (a regular file); None when it is one. A link is written where it leads
    (`_output`), so its target's directory is the one checked (a dangling link's too)."""
    parent = _output(target).path.parent
    if parent.is_dir():
        return None
    if os.path.lexists(parent):
        return f"{parent} is not a directory"
    return f"directory {parent} does not exist"


_LIBRARY_ERRNO = re.compile(r"\berrno = (\d+)")
"""The system's error number as HDF5's messages quote it (h5py raises an OSError whose text,
its `strerror` where it sets `errno`, is HDF5's whole error stack)."""


def write_error(target: Path, exc: OSError, failed: str = "cannot write it") -> WriteError:
    """The one-line error of a failed write of `target`: what `failed` and the system's
    reason, also where a library only quotes its error number in a text of its own (HDF5's,
    which names the temporary file, with or without `errno`)."""
    code = exc.errno
    quoted = _LIBRARY_ERRNO.search(exc.strerror or str(exc))
    if quoted is not None:
        code = int(quoted.group(1))
        reason = _REASONS.get(code) or os.strerror(code)
    else:
        reason = _REASONS.get(code or 0) or exc.strerror or str(exc)
    return WriteError(f"{target}: {failed} ({reason})")


def _iov_max() -> int:
    """The most buffers one `os.writev` takes here (POSIX guarantees at least 16)."""
    try:
        return max(16, os.sysconf("SC_IOV_MAX"))
    except (ValueError, OSError):
        return 16


_IOV_MAX = _iov_max()


_BATCH = 1 << 20
"""Bytes one system call writes at most, unless a single part is longer: shorter parts are
handed over together (a step file of small arrays is one `os.writev`, not one write a tensor,
and nothing is copied); a long part is written by itself (on the project's test VM, multi-MB
writes made the fsync after them slower than per-tensor writes)."""


def _write_all(fd: int, parts: Iterable[bytes | memoryview]) -> None:
    """Every byte of `parts`, in order, in batches of `_BATCH` bytes."""
    batch: list[bytes | memoryview] = []
    size = 0
    for part in parts:
        if isinstance(part, memoryview):  # (its size without a second view made of it)
            nbytes = part.nbytes
        else:
            nbytes = len(part) if isinstance(part, (bytes, bytearray)) else memoryview(part).nbytes
        if size and size + nbytes > _BATCH:
            _write_batch(fd, batch, size)
            batch, size = [], 0
        if nbytes:
            batch.append(part)
            size += nbytes
    _write_batch(fd, batch, size)


def _write_batch(fd: int, parts: list[bytes | memoryview], size: int) -> None:
    """Every byte of `parts` (non-empty, `size` bytes in all), in order: `os.writev` of at
    most `_IOV_MAX` of them at a time, resumed where a short write stopped."""
    views: list[memoryview] | None = None
    while size:
        written = os.writev(fd, parts[:_IOV_MAX])
        size -= written
        if not size:
            return
        if views is None:  # byte views, to cut a part where a short write stopped in it
            views = [memoryview(part).cast("B") for part in parts]
        done = 0
        while done < len(views) and written >= views[done].nbytes:
            written -= views[done].nbytes
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]
        parts = list(views)


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
    final = target if isinstance(target, Path) else Path(target)
    chunks = [parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts
    tmp = temp if temp is not None else temp_name(final)
    write_durably(str(final), str(tmp), str(final.parent), chunks)
    return final


def write_durably(
    final: str,
    temp: str,
    directory: str,
    parts: Iterable[bytes | memoryview],
    *,
    durable: bool = True,
) -> None:
    """`write_atomic` of paths already spelled out as strings (no `Path` on a hot path):
    `parts` written to `temp` and fsynced, `temp` renamed onto `final`, `directory` (the
    directory of both) fsynced. WriteError naming `final` if that fails; `temp` is removed
    whatever stops the write (an interrupt too), as far as the system lets it be. With
    `durable` False nothing is fsynced: the whole file is under `final` (it survives its
    process being killed), and `make_durable` makes it survive a crash of the system."""
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, parts)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        if durable:
            fsync_dir(directory)
    except BaseException as exc:
        _discard(temp)
        if isinstance(exc, OSError):
            raise write_error(Path(final), exc) from None
        raise


def make_durable(final: str, directory: str) -> None:
    """Makes a file that `write_durably(..., durable=False)` wrote durable: its data and its
    name in `directory` fsynced. WriteError naming `final` if that fails ("not made durable":
    the file was written whole, and may be gone from under its name, say its directory moved
    away)."""
    try:
        fsync_file(Path(final))
        fsync_dir(directory)
    except OSError as exc:
        raise write_error(Path(final), exc, "not made durable") from None


def _discard(temp: str | Path) -> None:
    """Removes a temporary file as far as the system lets it: a directory gone, not a
    directory or read-only refuses this too, and the write's own error is what counts."""
    with suppress(OSError):
        os.unlink(temp)


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """`with atomic_path(target) as temp:` the body writes the file at `temp` and closes it;
    on leaving, the file is fsynced and renamed onto `target` (and the directory fsynced). On
    any exception the temporary file is removed; an OSError becomes `WriteError`. The
    temporary files of `target` that killed writers left are removed first
    (`clear_stale_temps`)."""
    final = Path(target)
    tmp = temp_name(final)
    clear_stale_temps(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            raise write_error(final, exc) from None
        raise


_LINK_HOPS = 40
"""Links followed at most in a chain (Linux's own limit): a longer chain is not resolved."""


def _proc_path(target: Path) -> str | None:
    """The path under /proc that the chain of symlinks from `target` reaches, if it does (a
    process's descriptor: /dev/stdout, /dev/fd/N)."""
    path = str(target)
    for _ in range(_LINK_HOPS):
        path = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
        if path == "/proc" or path.startswith("/proc/"):
            return path
        if not os.path.islink(path):
            return None
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return None


_DESCRIPTOR = re.compile(r"/proc/(\d+)(?:/task/\d+)?/fd/(\d+)")
"""A process's descriptor under /proc: its pid and number."""


def _own_descriptor(proc_path: str) -> int | None:
    """The number of this process's descriptor at `proc_path` (`_proc_path`), if it is one."""
    found = _DESCRIPTOR.fullmatch(proc_path)
    if found is None or int(found.group(1)) != os.getpid():
        return None
    return int(found.group(2))


class _Output(NamedTuple):
    """Where an output the user named is written (module docstring)."""

    path: Path
    """The file written: what the user named, or the file a symlink names."""
    in_place: bool
    """Written in place rather than replaced."""
    descriptor: int | None = None
    """This process's own descriptor that `path` reaches through /proc (/dev/stdout: 1)."""


def _output(target: Path) -> _Output:
    """Where the output the user named `target` is written (module docstring). WriteError
    for a symlink loop: it names no file, and replacing the link would lose it."""
    named = target
    try:
        if os.path.islink(target):
            proc = _proc_path(target)
            if proc is not None:
                return _Output(target, True, _own_descriptor(proc))
            target = Path(os.path.realpath(target))
        mode = os.stat(target).st_mode
    except OSError as exc:  # nothing there (or nothing to see): replaced, whose errors say why
        if exc.errno == errno.ELOOP:  # a shell's `>` fails there too
            raise write_error(named, exc) from None
        return _Output(target, False)
    return _Output(target, not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)))


def _write_in_place(output: _Output, parts: Iterable[bytes | memoryview]) -> None:
    """`parts` written to `output.path`, opened as a shell's `>` opens it (a link followed, a
    file truncated) but never waiting for a FIFO's reader; a regular file fsynced. This
    process's own descriptor (`/dev/stdout`) is written through a copy of it, after what
    Python holds for it, at its offset (a shell's `>` there would truncate the file it writes
    and then overwrite the command's own output). WriteError naming the path; BrokenPipeError
    when the reader of this process's own stream went away (`pack RUN /dev/stdout | head`)."""
    target, own = output.path, output.descriptor
    try:
        if own is None:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o644)
            os.set_blocking(fd, True)
        else:
            for stream in (sys.stdout, sys.stderr):
                with suppress(AttributeError, OSError, ValueError):
                    if stream.fileno() == own:
                        stream.flush()
            fd = os.dup(own)
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        _write_all(fd, parts)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fsync(fd)
    except OSError as exc:
        if own is not None and isinstance(exc, BrokenPipeError):
            raise  # the reader of this process's stdout or stderr gone: a quiet stop (141)
        raise write_error(target, exc) from None
    finally:
        os.close(fd)


def write_output(target: str | os.PathLike[str], data: bytes) -> Path:
    """`data` written to a file the user named (module docstring): replaced atomically, or
    written in place; -> the file written (a link's target)."""
    output = _output(Path(target))
    if output.in_place:
        _write_in_place(output, [data])
        return output.path
    return write_atomic(output.path, data)


@contextmanager
def output_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """`atomic_path` of a file the user named (module docstring): where it is written in
    place, the body writes a temporary file of the system's temporary directory, whose bytes
    are then copied to the target."""
    output = _output(Path(target))
    if not output.in_place:
        with atomic_path(output.path) as temp:
            yield temp
        return
    fd, name = tempfile.mkstemp(prefix=".stabledrl-", suffix=output.path.suffix)
    os.close(fd)
    try:
        yield Path(name)
        with open(name, "rb") as written:
            _write_in_place(output, iter(lambda: written.read(_BATCH), b""))
    finally:
        _discard(name)
