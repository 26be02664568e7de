"""Reading an archive's metadata in a forked child before the reader's process touches it.

libhdf5 itself can loop forever or crash on a crafted file (a global heap whose free-space
object has size 0 makes reading any string attribute spin with the GIL held: no signal or
thread can stop it). So `probe` first reads the archive's metadata (every link, every
attribute, the manifest and integrity texts) in a forked child under a time limit, running
`_archive_checks.check_objects` there: a child that hangs, dies, meets an h5py error or runs
out of the memory it is given (`PROBE_MEMORY` beyond the file's size) refuses the archive
(InputError), and only then does the process itself open it (its own reads take
other paths through libhdf5, and a path past an error the child met can hang). The child hands
back what the checks found, with the file's identity, and the values the reader reads before
its first step (`_archive_prefetch`), so that the reader neither walks the same file's objects
twice nor reads its index again.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from stabledrl_cli._regular import read_until_closed
from stabledrl_cli.dump import _archive_checks
from stabledrl_cli.dump._archive_checks import (
    H5_ERRORS,
    TEXT_DATASETS,
    check_attributes,
    walk_objects,
)
from stabledrl_cli.dump._archive_prefetch import Prefetch, Prefetched, decode_prefetched
from stabledrl_cli.dump._layout import decode
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.dump._versions import RUN_KIND
from stabledrl_cli.errors import InputError, described, one_line

PROBE_SECONDS = 20.0
"""How long the forked child may take to read an archive's metadata (an honest one: well
under a second)."""
PROBE_MEMORY = 1 << 30
"""Address space the forked child may add to its parent's, beyond the archive's size: an
honest archive's metadata takes a few MB, but a crafted string may claim 4 GiB, which
libhdf5 allocates before it reads it."""


@dataclass(frozen=True)
class Probed:
    """What the probe's child found: the names `check_objects` returned, or its refusal, and
    the identity of the file it read (`file_identity`). Neither names nor refusal when the
    child did not run."""

    datasets: list[str] | None = None
    refusal: str | None = None
    identity: tuple[int, ...] | None = None
    error: str | None = None
    """The refusal of an archive h5py could not read in the child (`probe` raises it)."""
    prefetched: Prefetched = field(default_factory=Prefetched)
    """The values the child read for the reader."""

    def _read(self, handle: h5py.File) -> bool:
        """Whether the child read this very file (same identity)."""
        return self.identity is not None and self.identity == file_identity(handle)

    def objects(self, handle: h5py.File, where: str, file_size: int) -> list[str]:
        """`check_objects(handle, where, file_size)`, from the child's walk when it read this
        very file, else walked here."""
        if not self._read(handle):
            return _archive_checks.check_objects(handle, where, file_size)
        if self.refusal is not None:
            raise InputError(self.refusal)
        if self.datasets is None:
            return _archive_checks.check_objects(handle, where, file_size)
        return self.datasets

    def values_for(self, handle: h5py.File) -> Prefetched:
        """The values the child read, if it read this very file; none otherwise. A copy:
        the reader takes each value out of it once."""
        if not self._read(handle):
            return Prefetched()
        found = self.prefetched
        return Prefetched(dict(found.root), dict(found.texts), dict(found.arrays))


def file_identity(handle: h5py.File) -> tuple[int, ...] | None:
    """(device, inode, size, mtime, ctime) of the file an open local archive reads; None for
    one read through a file object."""
    if handle.driver != "sec2":
        return None
    found = os.fstat(handle.id.get_vfd_handle())
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


def _child_report(source: Path | StoreFile, where: str, file_size: int) -> bytes:
    """The child's reading of everything libhdf5 parses before a reader trusts the file (links,
    attributes, texts) with `check_objects`, and of the values the reader reads first
    (`Prefetch`), as a report (`_report`). An error of h5py is reported (`error`) as the
    refusal the reader would make of it, and `probe` refuses the archive: the reader's own read
    may take another path through the same damage, one that hangs (an attribute read by name
    where iterating over the attributes failed)."""
    try:
        handle = h5py.File(source, "r")
    except (SystemError, *H5_ERRORS) as exc:
        return _report({"error": f"{where}: unreadable HDF5 file ({one_line(exc)})"})
    try:
        with handle:
            identity = file_identity(handle)
            # Values are handed over only where the reader can take them: for the very file the
            # child read, so never for one read through a file object (fsspec: no identity).
            prefetch = None if identity is None else Prefetch()
            try:
                check_attributes(handle.id, "the root", where)
            except InputError as exc:
                return _report({"error": str(exc)})
            attrs = dict(handle.attrs.items())
            if prefetch is not None:
                prefetch.root(attrs)
            datasets = None  # a file of another kind the reader refuses by its kind alone
            if names_a_run(decode(attrs.get("kind"))):
                try:
                    datasets = walk_objects(
                        handle, where, file_size, None if prefetch is None else prefetch.dataset
                    )
                except InputError as exc:
                    return _report({"refusal": str(exc), "identity": identity})
                for name in TEXT_DATASETS:
                    found = handle.get(name)
                    if isinstance(found, h5py.Dataset):  # else the reader names what is missing
                        text = found[()]
                        if prefetch is not None:
                            prefetch.text(name, text)
    except (SystemError, *H5_ERRORS) as exc:
        return _report({"error": f"{where}: corrupt run archive ({described(exc)})"})
    if prefetch is None:
        return _report({"datasets": datasets, "identity": identity})
    header, payload = prefetch.encode()
    return _report({"datasets": datasets, "identity": identity, "prefetch": header}, payload)


def names_a_run(kind: object) -> bool:
    """Whether an HDF5 file's root `kind` attribute, decoded, names a run archive (a replay
    report's does not; a crafted one may be a number or an array, never equal to it)."""
    return isinstance(kind, str) and kind == RUN_KIND


_TOO_LARGE = "reading its HDF5 metadata took more memory than the file's size can explain"


def _limit_address_space(extra: int) -> None:
    """Caps this process's address space at its current size plus `extra` bytes (Linux), so
    that an allocation past it fails (MemoryError; libhdf5's, an h5py error) instead of taking
    the machine's memory."""
    try:
        import resource  # POSIX only, as the fork this runs after

        with open("/proc/self/statm", "rb") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + extra
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):  # no /proc (macOS), a limit the system refuses
        pass


def _report(fields: dict[str, object], payload: bytes = b"") -> bytes:
    """A report: one JSON line (with the payload's length), then the payload."""
    return json.dumps({**fields, "payload": len(payload)}).encode() + b"\n" + payload


def _parse_report(data: bytes) -> Probed | None:
    """The child's complete report, or None (cut short: it died while writing it)."""
    end = data.find(b"\n")
    if end < 0:
        return None
    report = json.loads(data[:end])
    payload = data[end + 1 :]
    if len(payload) != report["payload"]:
        return None
    identity = report.get("identity")
    prefetch = report.get("prefetch")
    return Probed(
        datasets=report.get("datasets"),
        refusal=report.get("refusal"),
        identity=None if identity is None else tuple(identity),
        error=report.get("error"),
        prefetched=Prefetched() if prefetch is None else decode_prefetched(prefetch, payload),
    )


_UNREAPED: set[int] = set()
"""Probe children that had handed back their report but were still exiting: reaped by the
next probe (as `subprocess` reaps its finished children)."""


def _wait(pid: int, options: int) -> tuple[int, int]:
    """`os.waitpid`, a child reaped elsewhere (SIGCHLD ignored) counting as exited."""
    try:
        return os.waitpid(pid, options)
    except ChildProcessError:
        return pid, 0


def _reap_finished() -> None:
    for pid in list(_UNREAPED):
        if _wait(pid, os.WNOHANG)[0]:
            _UNREAPED.discard(pid)


def probe(
    path: Path,
    file_size: int,
    seconds: float | None = None,
    *,
    fileobj: StoreFile | None = None,
    where: str | None = None,
) -> Probed:
    """Reads the archive's metadata and runs the checks in a forked child (module
    docstring); InputError if the child does not finish within `seconds` (default
    `PROBE_SECONDS`), is killed by a signal, or h5py fails to read the metadata there (as the
    reader would refuse it: "unreadable HDF5 file" or "corrupt run archive"), or needs more
    memory than `PROBE_MEMORY` beyond the file's size there. Returns what the
    child found otherwise. The parent waits on a pipe the
    child closes once its report is written, not on its exit. Without fork (Windows) this
    reads nothing and returns an empty `Probed`. fileobj: the archive as a binary file object
    (read through fsspec), read instead of `path`. where: how messages name the archive (by
    default its path)."""
    if not hasattr(os, "fork"):
        return Probed()
    _reap_finished()
    limit = PROBE_SECONDS if seconds is None else seconds
    where = str(path) if where is None else where
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any exit handler
        try:
            os.close(read_end)
            _limit_address_space(PROBE_MEMORY + file_size)
            try:
                report = _child_report(path if fileobj is None else fileobj, where, file_size)
            except MemoryError:
                report = _report({"error": f"{where}: refused: {_TOO_LARGE}"})
            failure = None if fileobj is None else fileobj.take_failure()
            if failure is not None:  # h5py's error names what it parsed, not why
                report = _report({"error": f"{where}: cannot read it: {failure}"})
            view = memoryview(report)
            while view:
                view = view[os.write(write_end, view) :]
            os.close(write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data: bytes | None = read_until_closed(read_end, time.monotonic() + limit)
    except TimeoutError:
        data = None
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        _wait(pid, 0)
        raise
    finally:
        os.close(read_end)
    if data is None:
        os.kill(pid, signal.SIGKILL)
        _wait(pid, 0)
        raise InputError(
            f"{where}: refused: reading its HDF5 metadata did not finish in {limit:g} s "
            "(a corrupt or crafted archive)"
        )
    probed = _parse_report(data)
    if probed is not None:  # finished: its exit need not be waited for
        if not _wait(pid, os.WNOHANG)[0]:
            _UNREAPED.add(pid)
        if probed.error is not None:
            raise InputError(probed.error)
        return probed
    _, status = _wait(pid, 0)
    if os.WIFSIGNALED(status):
        raise InputError(
            f"{where}: refused: reading its HDF5 metadata crashed libhdf5 "
            f"(signal {os.WTERMSIG(status)}; a corrupt or crafted archive)"
        )
    return Probed()
