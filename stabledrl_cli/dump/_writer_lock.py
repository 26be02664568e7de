"""One live Recorder per rank of a run directory.

Two Recorders of one rank on one directory (two jobs given the same output, or a second
`overwrite=True` while the first still trains) would write one run together: the second
removes the first's finished steps, and the first's later steps land in the second's run
under its manifest. A Recorder therefore holds its rank's lock file in steps/
(`schema.writer_lock_name`) locked from before it changes any file until it closes, and a
second one is refused (UsageError) while it is held.

The lock is a POSIX record lock (`fcntl.lockf`): the kernel drops it when its process ends,
however it ends (kill -9 included), and a forked child does not inherit it (a DataLoader
worker forked from the training never keeps a closed Recorder's rank locked). Such locks
belong to a process, not to a file descriptor, so the Recorders of one process are told apart
by a table of the locks it holds. The file is removed while still locked, at close; a Recorder
that locked a file since removed locks the new one instead (`_locked_in_place`).

Where the file system gives no lock (no `fcntl`, or NFS without a lock service) recording goes
on unguarded: the lock never stops a training that could record.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
from contextlib import suppress
from pathlib import Path
from typing import Literal

from stabledrl_cli._regular import NotRegularFile, open_regular_fd
from stabledrl_cli.dump._file_names import WRITER_LOCK_RE, writer_lock_name
from stabledrl_cli.errors import UsageError
from stabledrl_cli.spec import spec_int

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

_HELD: dict[tuple[int, int, int], int] = {}
"""(device, inode of steps/, rank) of each lock this process holds, with the process id that
took it: a forked child's copy of the table names its parent's locks, not its own."""
_HELD_LOCK = threading.Lock()
_RELEASING: dict[tuple[int, int, int], threading.Event] = {}
"""The locks of `_HELD` whose Recorder was dropped unclosed, set once released: its writer
thread still writes the queued steps (`WriterLock.release_soon`)."""

_TRIES = 8
"""Locks taken at most, each of a file that another Recorder removed before it was locked."""

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
"""Linux's name of the running kernel, new at each boot, shared by its containers."""

_FLOCK = "hhqqi4x"
"""Linux's `struct flock` on a 64-bit machine: type, whence, start, length, pid."""


class WriterLock:
    """A rank's held lock (`hold_writer_lock`); `release` is idempotent and does nothing in a
    forked child, which never held it."""

    def __init__(
        self,
        fd: int | None = None,
        path: Path | None = None,
        key: tuple[int, int, int] | None = None,
    ) -> None:
        """Held through `fd` on the file at `path`, listed under `key`; no argument: unguarded
        (the file system gives no lock), nothing to release."""
        self._fd = fd
        self._path = path
        self._key = key
        self._pid = os.getpid()
        self._released = threading.Event()

    def release(self) -> None:
        if self._fd is None or self._path is None or os.getpid() != self._pid:
            return
        fd, self._fd = self._fd, None
        with _HELD_LOCK:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            except OSError:  # a read-only steps/: left, unsigned, so never read as died
                with suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)
            if self._key is not None:
                _HELD.pop(self._key, None)
                _RELEASING.pop(self._key, None)
        self._released.set()

    def release_soon(self) -> None:
        """Its Recorder was dropped unclosed and its writer thread releases the lock once the
        queued steps are written: a new Recorder of the rank in this process waits for that
        instead of being refused (a notebook cell run again). Takes no lock: it runs in the
        Recorder's finalizer, perhaps from a collection in the middle of `hold_writer_lock`."""
        if self._key is not None and self._fd is not None:
            _RELEASING[self._key] = self._released


def hold_writer_lock(steps: Path, rank: int, world_size: int) -> WriterLock:
    """Locks rank `rank`'s lock file in the existing directory `steps` for this Recorder (of a
    run of `world_size` ranks); UsageError when another live Recorder, in this process or
    another on this host, holds it. Unlocked (recording unguarded) when the file system gives
    no lock."""
    path = steps / writer_lock_name(rank)
    if fcntl is None:
        return WriterLock()
    try:
        st = os.stat(steps)
    except OSError:
        return WriterLock()
    key = (st.st_dev, st.st_ino, rank)
    with _HELD_LOCK:
        releasing = _RELEASING.get(key) if _HELD.get(key) == os.getpid() else None
    if releasing is not None:  # set by the dropped Recorder's writer thread, however it ends
        releasing.wait()
    with _HELD_LOCK:
        if _HELD.get(key) == os.getpid():
            raise _held_elsewhere(steps.parent, rank, "in this process", world_size)
        for _ in range(_TRIES):
            opened = _open(path)
            if opened is None:
                return WriterLock()
            fd, held = opened
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                holder = _holder(fd)
                os.close(fd)
                where = "in another process"
                if holder is not None and holder in _ancestors() and _spawned_main():
                    where = "in the process that started this one"
                raise _held_elsewhere(steps.parent, rank, where, world_size) from None
            except OSError:  # no lock service (ENOLCK) or no locks on this file
                os.close(fd)
                return WriterLock()
            if _locked_in_place(held, path):
                _HELD[key] = os.getpid()
                _RELEASING.pop(key, None)
                _sign(fd)
                return WriterLock(fd, path, key)
            os.close(fd)
    return WriterLock()


def refuse_if_held(steps: Path, rank: int, world_size: int) -> None:
    """UsageError (`_held_elsewhere`) when a live Recorder holds rank `rank`'s lock in `steps`,
    asked without taking it (`writer_states`): for a Recorder that found the run's directory
    filled by one that started with it, before it could lock (two jobs given one output at
    once), whose refusal says that rather than that the run is not empty. Nothing where it
    cannot be told."""
    states = writer_states(steps)
    if states is None or states.get(rank) != "held":
        return
    try:
        st = os.stat(steps)
    except OSError:
        return
    with _HELD_LOCK:
        mine = _HELD.get((st.st_dev, st.st_ino, rank)) == os.getpid()
    where = "in this process" if mine else "in another process"
    raise _held_elsewhere(steps.parent, rank, where, world_size)


WriterState = Literal["held", "released", "unknown"]
"""What a rank's lock file left in steps/ says of its Recorder (`writer_states`)."""


def writer_states(steps: Path) -> dict[int, WriterState] | None:
    """Each rank with a lock file in the run's steps folder `steps`, and what it says: "held"
    (a live Recorder holds it: of this process, or of any other the locks show), "released"
    (no process holds it, and it was signed under this machine's running kernel: its Recorder
    died, killed say), "unknown" (a lock taken on another machine, whose locks may not show
    here, or by an older Recorder, unsigned; one being taken; one whose Recorder closed but
    could not remove it: `WriterLock.release`). A rank whose Recorder closed (or was dropped
    unclosed) has no lock file. None where it cannot be told: no Linux locks
    to ask, a folder that cannot be listed."""
    kernel = _kernel()
    if fcntl is None or kernel is None or not sys.platform.startswith("linux"):
        return None
    if struct.calcsize("P") != 8:
        return None
    try:
        ranks = [int(m.group(1)) for m in map(WRITER_LOCK_RE.match, os.listdir(steps)) if m]
        st = os.stat(steps)
    except OSError:
        return None
    states: dict[int, WriterState] = {}
    with _HELD_LOCK:  # this process's own locks: closing a descriptor of one would drop it
        for rank in ranks:
            if _HELD.get((st.st_dev, st.st_ino, rank)) == os.getpid():
                states[rank] = "held"
            else:
                states[rank] = _state(steps / writer_lock_name(rank), kernel)
    return states


def _kernel() -> bytes | None:
    try:
        return _BOOT_ID.read_bytes().strip()[:64] or None
    except OSError:
        return None


def _sign(fd: int) -> None:
    """Names this machine's running kernel in the held lock file (`writer_states`)."""
    kernel = _kernel()
    if kernel is not None:
        with suppress(OSError):  # unsigned, the lock still guards: never judged gone
            os.ftruncate(fd, 0)
            os.pwrite(fd, kernel + b"\n", 0)


def _state(path: Path, kernel: bytes) -> WriterState:
    """What the lock file at `path` says, asked with F_GETLK (taking the lock, even for a
    moment, could refuse a Recorder starting)."""
    try:
        fd, _ = open_regular_fd(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, NotRegularFile):
        return "unknown"
    try:
        if _lock_query(fd)[0] != fcntl.F_UNLCK:
            return "held"
        return "released" if os.pread(fd, 128, 0).strip() == kernel else "unknown"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)


def _spawned_main() -> bool:
    """Whether this process is a spawned child of multiprocessing (a DataLoader's or Pool's
    worker), which runs the script's top level again as `__mp_main__`."""
    return getattr(sys.modules.get("__mp_main__"), "__name__", None) == "__mp_main__"


def _ancestors(limit: int = 8) -> set[int]:
    """This process's parent, its parent's and so on (Linux's /proc, `limit` of them): a
    forkserver runs the script's top level in a process the script started through another
    (DataLoader(multiprocessing_context="forkserver"), Python 3.14's default on Linux)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and len(found) < limit:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def _holder(fd: int) -> int | None:
    """The process that holds the lock of the file open as `fd` (F_GETLK), None where it
    cannot be told (not Linux on a 64-bit machine, no lock service)."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        kind, pid = _lock_query(fd)
    except OSError:
        return None
    return pid if kind != fcntl.F_UNLCK else None


def _lock_query(fd: int) -> tuple[int, int]:
    """F_GETLK of the whole file open as `fd`: (the lock type that would block a write lock,
    F_UNLCK when none would; the process holding it). OSError where it cannot be asked."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return kind, pid


def _open(path: Path) -> tuple[int, os.stat_result] | None:
    """The lock file opened for writing (made when absent) and its `fstat`, never through a
    link nor waiting on a FIFO put in its place (`open_regular_fd`); None when it cannot be a
    lock (not a regular file, or not writable: a read-only run is refused later, by its first
    write)."""
    try:
        return open_regular_fd(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, NotRegularFile):
        return None


def _locked_in_place(held: os.stat_result, path: Path) -> bool:
    """Whether the file `held` (the locked one's `fstat`) is still the one at `path` (a
    Recorder closing removes it while it holds the lock: one opened before that and locked
    after is gone)."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


_HOLDERS: dict[str, str] = {}
"""Run directory (its real path) -> what to say of the Recorder that a caller in this process
opens on it for its own ends (`holds_in_this_process`)."""


def holds_in_this_process(run: str | os.PathLike[str], why: str) -> None:
    """Says, for any Recorder of `run` refused in this process while another one of it is
    open here, `why` (who records the run, and what to do instead): `stabledrl record`'s side
    in the training process records its --out with a Recorder the script never made."""
    _HOLDERS[os.path.realpath(run)] = why


def _launched() -> tuple[int, int] | None:
    """torchrun's RANK and WORLD_SIZE of this process; None when either is unset or no integer
    of a spec's digits (`spec_int`: one of 5,000 digits, or `²`, never reaches int())."""
    try:
        return spec_int(os.environ.get("RANK", "")), spec_int(os.environ.get("WORLD_SIZE", ""))
    except ValueError:
        return None


def _held_elsewhere(run: Path, rank: int, where: str, world_size: int) -> UsageError:
    """Why a Recorder of rank `rank` (of `world_size`) cannot have `run`: the Recorder holding
    it, and what to do. A process that its launcher made one of several ranks (torchrun's RANK
    and WORLD_SIZE) but whose Recorder says another number of ranks is told to give its own."""
    held = f"{run}: rank {rank} of this run is being recorded by another Recorder, still open"
    why = _HOLDERS.get(os.path.realpath(run)) if where == "in this process" else None
    if why is not None:
        return UsageError(f"{held} {where}: {why}")
    launched = _launched() if where == "in another process" else None
    if launched is not None and launched[1] > 1 and launched[1] != world_size:
        launched_rank, size = launched
        return UsageError(
            f"{held} {where}: this process is rank {launched_rank} of {size} (RANK and "
            "WORLD_SIZE, set by its launcher), and each rank records its own steps: "
            f"Recorder(path, world_size={size}, rank={launched_rank})"
        )
    if where == "in the process that started this one":  # a spawned worker's import
        return UsageError(
            f"{held} {where}: a spawned worker (a DataLoader's, a Pool's) runs the script's top "
            'level again, so make the Recorder under if __name__ == "__main__":'
        )
    return UsageError(
        f"{held} {where}; close it first (a run takes one Recorder a rank), or record elsewhere"
    )
