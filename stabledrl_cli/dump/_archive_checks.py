"""What an archive must be before anything in it is read: data, never pointers, and bounded.

An HDF5 file can point elsewhere: a soft or external link, a dataset whose bytes live in
another file (external storage, e.g. `/etc/passwd`), a virtual dataset mapping other files. A
reader of such a file would read what it points at, and `pack` would copy it into its output.
An HDF5 file can also declare more than it holds: a dataset of 10^9 elements stored as a
fill value or as compressed zeros takes a few bytes on disk and gigabytes once read.

`check_objects` walks every link of the file once and refuses (InputError, exit 3) any link
that is not a hard link, any dataset with external or virtual storage, any dataset whose
declared size exceeds what the file can hold (`DEFLATE_RATIO` times the file's size: gzip
cannot expand more than that) and any dataset of an index (read whole) larger than the file
itself, any chunk larger than `CHUNK_LIMIT`, any stored chunk whose size or place in the
chunk index is impossible (`_bad_stored_chunk`: libhdf5 crashes reading a chunk of 0 bytes),
and any array dataset of a non-numeric dtype.
Index and scalar datasets carry a CRC32 (attribute `crc32`, `index_crc`) written by `pack`.

libhdf5 itself can loop forever or crash on a crafted file (a global heap whose free-space
object has size 0 makes reading any string attribute spin with the GIL held: no signal or
thread can stop it). So `probe` first reads the archive's metadata (every link, every
attribute, the manifest and integrity texts) in a forked child under a time limit, running
`check_objects` there: a child that hangs, dies or meets an h5py error refuses the archive
(InputError), and only then does the process itself read it (its own reads take other paths
through libhdf5, and a path past an error the child met can hang). The child hands back
what `check_objects` found, with the file's identity, so that the reader does not walk the
same file's objects twice.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from stabledrl_cli.errors import InputError

CRC_ATTR = "crc32"
"""The attribute holding an index dataset's checksum (`index_crc` of its values)."""
TEXT_DATASETS = ("manifest", "integrity")
"""The archive's JSON string datasets."""
INDEX_GROUPS = ("steps", "scalars", "scalars_recorded", "present")
DEFLATE_RATIO = 1100
"""gzip's largest expansion is ~1032:1, so no honest dataset declares more than this many
times the file's bytes."""
CHUNK_LIMIT = 64 << 20
"""Bytes of one chunk (pack writes 256 KiB ones): a larger one is not an archive of ours."""
H5_ERRORS = (
    OSError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    RuntimeError,
    RecursionError,
)
"""What h5py raises for a corrupt file, depending on where libhdf5 notices (AttributeError: a
group where a dataset belongs)."""
PROBE_SECONDS = 20.0
"""How long the forked child may take to read an archive's metadata (an honest one: well
under a second)."""
OBJECT_LIMIT = 100_000
"""Links a run archive may hold (one with 100 user scalars holds a few hundred)."""


def is_index(name: str) -> bool:
    """Whether dataset `name` is read whole: `steps/*`, `scalars*/*`, `present/*`,
    `*/step_offsets`, `ragged/*/shape`."""
    parts = name.split("/")
    return (
        parts[0] in INDEX_GROUPS
        or parts[-1] == "step_offsets"
        or (parts[0] == "ragged" and parts[-1] == "shape")
    )


def index_crc(values: np.ndarray | str) -> str:
    """CRC32 (8 hex digits) of an index dataset's values as little-endian bytes, or of a
    string dataset's UTF-8 text."""
    if isinstance(values, str):
        return f"{zlib.crc32(values.encode('utf-8')):08x}"
    array = np.ascontiguousarray(values)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return f"{zlib.crc32(little.tobytes()):08x}"


class _Held:
    """A low-level object as h5py's attribute reader sees it (it reads only `.id`)."""

    def __init__(self, oid: h5py.h5o.ObjectID) -> None:
        self.id = oid


def attributes(oid: h5py.h5o.ObjectID) -> h5py.AttributeManager:
    """The attributes of a low-level object, read as `h5py.Dataset.attrs` reads them."""
    return h5py.AttributeManager(_Held(oid))


def _check_dataset(name: str, dataset: h5py.h5d.DatasetID, where: str, file_size: int) -> None:
    def refuse(why: str) -> InputError:
        return InputError(f"{where}: refused: dataset {name} {why}")

    plist = dataset.get_create_plist()
    if plist.get_external_count() > 0:
        raise refuse("stores its bytes in another file (external storage)")
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise refuse("is a virtual dataset (maps other files)")
    dtype = dataset.dtype
    declared = int(np.prod(dataset.shape, dtype=object)) * dtype.itemsize
    if name in TEXT_DATASETS:
        if dataset.shape != () or dtype.kind not in "OSU":
            raise refuse("is not a string")
        return
    if dtype.kind not in "biuf":
        raise refuse(f"has dtype {dtype} (numbers expected)")
    bound = file_size if is_index(name) else DEFLATE_RATIO * file_size + (1 << 20)
    if declared > bound:
        raise refuse(f"declares {declared} bytes, more than a {file_size}-byte archive can hold")
    if layout == h5py.h5d.CHUNKED:
        chunk = int(np.prod(plist.get_chunk(), dtype=object)) * dtype.itemsize
        if chunk > CHUNK_LIMIT:
            raise refuse(f"has {chunk}-byte chunks")
        bad = _bad_stored_chunk(dataset, plist, chunk, file_size)
        if bad is not None:
            raise refuse(bad)


CHUNK_SLACK = 1 << 12
"""Bytes a stored chunk may exceed its raw size by: deflate's worst case on a 256 KiB chunk
(about 0.03%) and the 4-byte Fletcher32 checksum, with room to spare."""


def _bad_stored_chunk(
    dataset: h5py.h5d.DatasetID, plist: h5py.h5p.PropDCID, chunk: int, file_size: int
) -> str | None:
    """How one of the dataset's stored chunks is impossible, from the chunk index alone (no
    data read), or None: a chunk of fewer bytes than its checksum (libhdf5 crashes reading
    one of 0 bytes), more than its raw size allows, past the end of the file, or with its
    filters skipped (its checksum among them). A chunk index that cannot be walked is left
    to the reader, whose reads fail on it as findings."""
    fletcher = any(
        plist.get_filter(i)[0] == h5py.h5z.FILTER_FLETCHER32 for i in range(plist.get_nfilters())
    )
    smallest, largest = (4 if fletcher else 1), chunk + CHUNK_SLACK
    found: list[str] = []

    def check(info: h5py.h5d.StoreInfo) -> None:
        if found:
            return
        at = f"has a chunk at {info.chunk_offset}"
        if info.filter_mask:
            found.append(f"{at} that skips its filters (mask {info.filter_mask})")
        elif not smallest <= info.size <= largest:
            found.append(f"{at} of {info.size} bytes (expected {smallest} to {largest})")
        elif info.byte_offset + info.size > file_size:
            found.append(f"{at} past the end of the {file_size}-byte file")

    try:
        if hasattr(dataset, "chunk_iter"):
            dataset.chunk_iter(check)
        else:  # libhdf5 before 1.14: one lookup a chunk
            for index in range(dataset.get_num_chunks()):
                check(dataset.get_chunk_info(index))
    except H5_ERRORS:
        pass  # a broken chunk index: the reader meets it too, and skips the steps it holds
    return found[0] if found else None


def check_objects(handle: h5py.File, where: str, file_size: int) -> list[str]:
    """Refuses (InputError naming `where`, the archive, and the object) any pointer or
    unbounded dataset in the file (module docstring); reads every object's attributes but no
    dataset's values. Returns the datasets' names. Walks with h5py's low-level calls (a third
    of the high-level ones' time)."""
    count = 0
    datasets: list[str] = []
    problem: list[InputError] = []

    def visit(raw: bytes, link: h5py.h5l.LinkInfo) -> bool | None:
        nonlocal count
        count += 1
        if count > OBJECT_LIMIT:
            problem.append(InputError(f"{where}: refused: more than {OBJECT_LIMIT} objects"))
            return True
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            problem.append(InputError(f"{where}: corrupt run archive (a link name is not UTF-8)"))
            return True
        if link.type == h5py.h5l.TYPE_EXTERNAL:
            problem.append(InputError(f"{where}: refused: {name} is an external link"))
            return True
        if link.type != h5py.h5l.TYPE_HARD:
            problem.append(InputError(f"{where}: refused: {name} is a soft link"))
            return True
        try:
            target = h5py.h5o.open(handle.id, raw)
            dict(attributes(target).items())  # parsed here, in the probe's child first
            if isinstance(target, h5py.h5d.DatasetID):
                _check_dataset(name, target, where, file_size)
                datasets.append(name)
            elif not isinstance(target, h5py.h5g.GroupID):
                raise InputError(f"{where}: refused: {name} is neither a group nor a dataset")
        except InputError as exc:
            problem.append(exc)
            return True
        except H5_ERRORS as exc:  # a corrupt object header: raised out of the visit, it
            # would surface as a SystemError
            problem.append(InputError(f"{where}: corrupt run archive ({name}: {exc})"))
            return True
        return None

    try:
        handle.id.links.visit(visit, info=True)
    except (SystemError, *H5_ERRORS) as exc:  # libhdf5 failing to walk a corrupt group
        raise InputError(f"{where}: corrupt run archive ({type(exc).__name__})") from None
    if problem:
        raise problem[0]
    return datasets


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

    def objects(self, handle: h5py.File, where: str, file_size: int) -> list[str]:
        """`check_objects(handle, where, file_size)`, from the child's walk when it read this
        very file (same identity), else walked here."""
        if self.identity is None or self.identity != file_identity(handle):
            return check_objects(handle, where, file_size)
        if self.refusal is not None:
            raise InputError(self.refusal)
        if self.datasets is None:
            return check_objects(handle, where, file_size)
        return self.datasets


def file_identity(handle: h5py.File) -> tuple[int, ...] | None:
    """(device, inode, size, mtime, ctime) of the file an open local archive reads; None for
    one read through a file object."""
    if handle.driver != "sec2":
        return None
    found = os.fstat(handle.id.get_vfd_handle())
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


def _child_report(source: Path | BinaryIO, where: str, file_size: int) -> bytes:
    """The child's reading of everything libhdf5 parses before a reader trusts the file (links,
    attributes, texts) with `check_objects`, as one JSON line. An error of h5py is reported
    (`error`) as the refusal the reader would make of it, and `probe` refuses the archive: the
    reader's own read may take another path through the same damage, one that hangs (an
    attribute read by name where iterating over the attributes failed)."""
    try:
        handle = h5py.File(source, "r")
    except (SystemError, *H5_ERRORS) as exc:
        return _line({"error": f"{where}: unreadable HDF5 file ({_one_line(exc)})"})
    try:
        with handle:
            dict(handle.attrs.items())
            identity = file_identity(handle)
            try:
                report: dict[str, object] = {"datasets": check_objects(handle, where, file_size)}
            except InputError as exc:
                report = {"refusal": str(exc)}
            else:
                for name in TEXT_DATASETS:
                    if name in handle:
                        handle[name][()]
    except (SystemError, *H5_ERRORS) as exc:
        why = f"{type(exc).__name__}: {_one_line(exc)}"
        return _line({"error": f"{where}: corrupt run archive ({why})"})
    return _line({**report, "identity": identity})


REASON_LIMIT = 300
"""Characters of an h5py error kept in a refusal."""


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most `REASON_LIMIT` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


def _line(report: dict[str, object]) -> bytes:
    return json.dumps(report).encode() + b"\n"


def _parse_report(data: bytes) -> Probed | None:
    """The child's complete report, or None (cut short: it died while writing it)."""
    if not data.endswith(b"\n"):
        return None
    report = json.loads(data)
    identity = report.get("identity")
    return Probed(
        datasets=report.get("datasets"),
        refusal=report.get("refusal"),
        identity=None if identity is None else tuple(identity),
        error=report.get("error"),
    )


def _read_until_eof(fd: int, deadline: float) -> bytes | None:
    """Everything written to pipe `fd` until its writer closes it, or None at `deadline`."""
    parts: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(max(1, round(remaining * 1000))):
            return None
        part = os.read(fd, 1 << 16)
        if not part:
            return b"".join(parts)
        parts.append(part)


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
    fileobj: BinaryIO | None = None,
    where: str | None = None,
) -> Probed:
    """Reads the archive's metadata and runs `check_objects` in a forked child (module
    docstring); InputError if the child does not finish within `seconds` (default
    `PROBE_SECONDS`), is killed by a signal, or h5py fails to read the metadata there (as the
    reader would refuse it: "unreadable HDF5 file" or "corrupt run archive"). Returns what the
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
            report = _child_report(path if fileobj is None else fileobj, where, file_size)
            view = memoryview(report)
            while view:
                view = view[os.write(write_end, view) :]
            os.close(write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = _read_until_eof(read_end, time.monotonic() + limit)
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
