"""What an archive must be before anything in it is read: data, never pointers, and bounded.

An HDF5 file can point elsewhere: a soft or external link, a dataset whose bytes live in
another file (external storage, e.g. `/etc/passwd`), a virtual dataset mapping other files. A
reader of such a file would read what it points at, and `pack` would copy it into its output.
An HDF5 file can also declare more than it holds: a dataset of 10^9 elements stored as a
fill value or as compressed zeros takes a few bytes on disk and gigabytes once read.

`check_objects` walks every link of the file once and refuses (InputError, exit 3) any link
that is not a hard link, any dataset with external or virtual storage, any dataset whose
declared size exceeds what the file can hold (`DEFLATE_RATIO` times the file's size: gzip
cannot expand more than that) and any dataset of an index or text (read whole), or not chunked
(never compressed), larger than the file itself, any chunk larger than `CHUNK_LIMIT`, any
stored chunk whose size or place in the chunk index is impossible (`_bad_stored_chunk`: libhdf5
crashes reading a chunk of 0 bytes), any array dataset of a non-numeric dtype, any dataset with
no value at all (an empty dataspace, h5py's `Empty`), and any attribute or text whose values
could unpack past the file (`unbounded_type`: variable-length data, whose elements may all
point at one object of the global heap), before its value is read.
Index and scalar datasets (the per-step CRC-32s of `checksums/` among them) carry a CRC32
(attribute `crc32`, `index_crc`) written by `pack`.

libhdf5 itself can loop forever or crash on a crafted file: `_archive_probe` runs these checks
in a forked child before the reader's process touches the file.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import h5py
import numpy as np

from stabledrl_cli.dump._layout import CHECKSUMS, RANK_SEQUENCES, UNJOINED
from stabledrl_cli.errors import InputError, key_shown, quoted

CRC_ATTR = "crc32"
"""The attribute holding an index dataset's checksum (`index_crc` of its values)."""
TEXT_DATASETS = ("manifest", "integrity")
"""The archive's JSON string datasets."""
INDEX_GROUPS = ("steps", "scalars", "scalars_recorded", "present", UNJOINED, CHECKSUMS)
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
OBJECT_LIMIT = 100_000
"""Links a run archive may hold (one with 100 user scalars holds a few hundred)."""


def held_bytes(found: os.stat_result) -> int:
    """The bytes a local archive of stat `found` is taken to hold, which the size bounds
    multiply: its size, but for a sparse file, whose holes read as zeros no disk holds (48 KB
    on disk made 2 TiB made `replay` allocate a dataset of 1 TiB), at most DEFLATE_RATIO times
    its bytes on disk: a file system that compresses (ZFS's, btrfs's) shrinks an honest archive
    far less. A file system that counts no blocks (`st_blocks` 0, or none) tells nothing: the
    size."""
    on_disk = getattr(found, "st_blocks", 0) * 512  # POSIX's 512-byte units
    return found.st_size if on_disk == 0 else min(found.st_size, DEFLATE_RATIO * on_disk)


def is_index(name: str) -> bool:
    """Whether dataset `name` is read whole: `steps/*`, `scalars*/*`, `present/*`,
    `unjoined/*`, `checksums/*`, `*/step_offsets`, `ragged/*/shape`."""
    parts = name.split("/")
    return (
        parts[0] in INDEX_GROUPS
        or parts[-1] == "step_offsets"
        or (parts[0] == "ragged" and parts[-1] == "shape")
    )


def index_type(name: str) -> tuple[str, int]:
    """The dtype (numpy's name) and number of dimensions `pack` writes index dataset `name`
    in (`is_index`; run-format.md's table): float64 `scalars/*`, uint8 flags (`present/*`,
    `unjoined/*`, `scalars_recorded/*`), uint32 per-step CRC-32s (`checksums/*`), int64
    `[S, ndim]` ragged shapes and `steps/rank_sequences` [S, R], int64 step numbers, counts
    and offsets."""
    group, last = name.split("/")[0], name.split("/")[-1]
    if group == "scalars":
        return "float64", 1
    if group == CHECKSUMS:
        return "uint32", 1
    if group in ("present", UNJOINED, "scalars_recorded"):
        return "uint8", 1
    tables = (group == "ragged" and last == "shape") or name == f"steps/{RANK_SEQUENCES}"
    return "int64", 2 if tables else 1


def crc_matches(stored: object, crc: str) -> bool:
    """Whether a dataset's stored checksum attribute is `crc` (`index_crc`): it must be that
    text; a crafted file may store a number or an array there, which is a mismatch."""
    return isinstance(stored, str) and stored == crc


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


def unbounded_type(type_id: h5py.h5t.TypeID, elements: int) -> bool:
    """Whether `elements` values of `type_id` could unpack to more than the file holds once
    read: variable-length data (each element points at an object of the file's global heap,
    and any number of them may point at one: 1000 references to a 1 MiB string take 16 KB on
    disk, 1 GB read), except one variable-length string, no larger than its object (pack
    writes every attribute and text so). A string inside a compound or array type counts as
    variable (libhdf5 does not say which it is without looking deeper)."""
    if type_id.get_class() == h5py.h5t.STRING:
        return bool(type_id.is_variable_str()) and elements > 1
    return bool(type_id.detect_class(h5py.h5t.VLEN) or type_id.detect_class(h5py.h5t.STRING))


def check_attributes(
    oid: h5py.h5o.ObjectID, owner: str, where: str, only: str | None = None
) -> None:
    """Refuses (InputError naming `where`, the archive) an attribute of object `oid` (named
    `owner`) of an `unbounded_type`, from its type and shape, before any value is read: all
    of its attributes, or the one named `only`, if it has it."""
    if only is None:
        # Listed once, then opened by name: an open by index walks the attributes before it,
        # and 20,000 of them opened so took minutes.
        names: list[bytes] = []
        h5py.h5a.iterate(oid, names.append)
        opened = (h5py.h5a.open(oid, name) for name in names)
    else:
        opened = (h5py.h5a.open(oid, n) for n in [only.encode()] if h5py.h5a.exists(oid, n))
    for attribute in opened:
        if unbounded_type(attribute.get_type(), attribute.get_space().get_simple_extent_npoints()):
            name = attribute.name.decode("utf-8", "backslashreplace")
            raise InputError(
                f"{where}: refused: attribute {quoted(name)} "
                f"of {owner} holds variable-length data other than one string (its elements "
                "could all point at one heap object)"
            )


NAME_SHOWN = 300
"""Characters of an object's name that a refusal shows: whole for every name `pack` writes (a
recorded scalar's, up to 256, under its group), cut for a crafted one of megabytes."""


def named(name: str) -> str:
    """An object's name for a refusal (`key_shown`, cut past NAME_SHOWN)."""
    return key_shown(name, NAME_SHOWN)


def _check_dataset(name: str, dataset: h5py.h5d.DatasetID, where: str, file_size: int) -> None:
    def refuse(why: str) -> InputError:
        return InputError(f"{where}: refused: dataset {named(name)} {why}")

    plist = dataset.get_create_plist()
    if plist.get_external_count() > 0:
        raise refuse("stores its bytes in another file (external storage)")
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise refuse("is a virtual dataset (maps other files)")
    if dataset.get_space().get_simple_extent_type() == h5py.h5s.NULL:
        raise InputError(
            f"{where}: corrupt run archive (dataset {named(name)} is h5py.Empty: no shape, "
            "no values)"
        )
    dtype = dataset.dtype
    declared = math.prod(dataset.shape) * dtype.itemsize  # Python ints: exact
    if name in TEXT_DATASETS:
        if dataset.shape != () or (dtype.kind != "S" and h5py.check_string_dtype(dtype) is None):
            raise refuse("is not a string")
    elif dtype.kind not in "biuf":
        raise refuse(f"has dtype {dtype} (numbers expected)")
    read_whole = is_index(name) or name in TEXT_DATASETS
    # Only a chunked dataset can be compressed: any other holds its bytes as they are.
    compressible = layout == h5py.h5d.CHUNKED and not read_whole
    bound = DEFLATE_RATIO * file_size + (1 << 20) if compressible else file_size
    if declared > bound:
        raise refuse(f"declares {declared} bytes, more than a {file_size}-byte archive can hold")
    if layout == h5py.h5d.CHUNKED:
        chunk = math.prod(plist.get_chunk()) * dtype.itemsize
        if chunk > CHUNK_LIMIT:
            raise refuse(f"has {chunk}-byte chunks")
        missing = _missing_filters(plist)
        required = [code for code, optional in missing.values() if not optional]
        if required:
            raise refuse(_no_filter(required[0]))
        bad = _bad_stored_chunk(dataset, plist, chunk, file_size, missing)
        if bad is not None:
            raise refuse(bad)
        if read_whole and chunks_unwritten(dataset):
            raise refuse("is read whole but has chunks never written (pack stores it whole)")


def _missing_filters(plist: h5py.h5p.PropDCID) -> dict[int, tuple[int, bool]]:
    """The filters of the dataset's pipeline that libhdf5 cannot apply here (a plugin's, such
    as Blosc's 32001, not installed), by their place in it: each one's id and whether it is
    flagged optional. A chunk through one of them cannot be read, but libhdf5 stores a chunk
    an optional filter failed on unfiltered, that filter's bit set in its filter mask."""
    missing = {}
    for i in range(plist.get_nfilters()):
        code, flags = (int(value) for value in plist.get_filter(i)[:2])
        if not h5py.h5z.filter_avail(code):
            missing[i] = (code, bool(flags & h5py.h5z.FLAG_OPTIONAL))
    return missing


def _no_filter(code: int) -> str:
    return (
        f"is stored through HDF5 filter {code}, which this libhdf5 does not have "
        "(a compression plugin not installed here; pack writes gzip only)"
    )


CHUNK_SLACK = 1 << 12
"""Bytes a stored chunk may exceed its raw size by: deflate's worst case on a 256 KiB chunk
(about 0.03%) and the 4-byte Fletcher32 checksum, with room to spare."""


def _bad_stored_chunk(
    dataset: h5py.h5d.DatasetID,
    plist: h5py.h5p.PropDCID,
    chunk: int,
    file_size: int,
    missing: dict[int, tuple[int, bool]],
) -> str | None:
    """How one of the dataset's stored chunks is impossible, from the chunk index alone (no
    data read), or None: a chunk of fewer bytes than its checksum (libhdf5 crashes reading
    one of 0 bytes), more than its raw size allows, past the end of the file, with its
    filters skipped (its checksum among them) other than the `missing` optional ones
    (`_missing_filters`), or stored through one of those. A chunk index that cannot be
    walked is left to the reader, whose reads fail on it as findings."""
    fletcher = any(
        plist.get_filter(i)[0] == h5py.h5z.FILTER_FLETCHER32 for i in range(plist.get_nfilters())
    )
    smallest, largest = (4 if fletcher else 1), chunk + CHUNK_SLACK
    skipped = sum(1 << i for i in missing)
    found: list[str] = []

    def check(info: h5py.h5d.StoreInfo) -> None:
        # Called once a chunk (tens of thousands in a large archive): a message is made only
        # for a bad one.
        if found:
            return
        size, mask = info.size, info.filter_mask
        if mask & skipped != skipped:
            applied = next(code for i, (code, _) in missing.items() if not mask >> i & 1)
            found.append(_no_filter(applied))
        elif mask & ~skipped:
            found.append(f"{_chunk_at(info)} that skips its filters (mask {mask})")
        elif not smallest <= size <= largest:
            found.append(f"{_chunk_at(info)} of {size} bytes (expected {smallest} to {largest})")
        elif info.byte_offset + size > file_size:
            found.append(f"{_chunk_at(info)} past the end of the {file_size}-byte file")

    with suppress(*H5_ERRORS):  # a broken chunk index: the reader meets it too, and skips
        stored_chunks(dataset, check)  # the steps it holds
    return found[0] if found else None


def stored_chunks(dataset: h5py.h5d.DatasetID, visit: Callable[[h5py.h5d.StoreInfo], None]) -> None:
    """Calls `visit` with each stored chunk of a chunked dataset, from its chunk index (no
    data read)."""
    if hasattr(dataset, "chunk_iter"):
        dataset.chunk_iter(visit)
    else:  # libhdf5 before 1.14: one lookup a chunk
        for index in range(dataset.get_num_chunks()):
            visit(dataset.get_chunk_info(index))


WRITTEN_CHUNK_BYTES = 9
"""The fewest bytes of the file a written chunk takes: its address in the chunk index and
one byte of data."""


def chunks_unwritten(dataset: h5py.h5d.DatasetID) -> bool:
    """Whether a chunked dataset has chunks never written (False when its chunk index cannot
    be counted: the reader meets that too). Such a chunk reads as the fill value, unchecked,
    and costs libhdf5 kilobytes when a read spans it: a 52 KB archive declaring 400,000
    1-entry chunks made one read of them take 2.8 GB."""
    try:
        return counted_unwritten(dataset)
    except H5_ERRORS:
        return False


def counted_unwritten(dataset: h5py.h5d.DatasetID) -> bool:
    """`chunks_unwritten`. When the chunk index cannot be counted: False while the file is
    large enough to hold every chunk the dataset's shape declares (`WRITTEN_CHUNK_BYTES`
    each: a damaged node of an honest index, whose chunks' reads fail, findings, and the
    others read), else h5py's error (a 48 KB archive declaring 40 million chunks)."""
    shape, chunk = dataset.shape, dataset.get_create_plist().get_chunk()
    declared = math.prod(-(-size // width) for size, width in zip(shape, chunk, strict=True))
    try:
        return bool(dataset.get_num_chunks() < declared)
    except H5_ERRORS:
        if declared * WRITTEN_CHUNK_BYTES <= h5py.h5i.get_file_id(dataset).get_filesize():
            return False
        raise


def _chunk_at(info: h5py.h5d.StoreInfo) -> str:
    return f"has a chunk at {info.chunk_offset}"


OnDataset = Callable[[str, h5py.h5d.DatasetID, dict[str, Any]], None]
"""Called with each dataset that passed its checks: its name, its open id, its attributes."""


def check_objects(handle: h5py.File, where: str, file_size: int) -> list[str]:
    """Refuses (InputError naming `where`, the archive, and the object) any pointer or
    unbounded dataset in the file (module docstring); reads every object's attributes but no
    dataset's values. Returns the datasets' names."""
    return walk_objects(handle, where, file_size)


def walk_objects(
    handle: h5py.File, where: str, file_size: int, on_dataset: OnDataset | None = None
) -> list[str]:
    """`check_objects`, handing each checked dataset to `on_dataset` while it is open. Walks
    with h5py's low-level calls (a third of the high-level ones' time)."""
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
        label = named(name)
        if link.type == h5py.h5l.TYPE_EXTERNAL:
            problem.append(InputError(f"{where}: refused: {label} is an external link"))
            return True
        if link.type != h5py.h5l.TYPE_HARD:
            problem.append(InputError(f"{where}: refused: {label} is a soft link"))
            return True
        try:
            target = h5py.h5o.open(handle.id, raw)
            check_attributes(target, label, where)
            attrs = dict(attributes(target).items())  # parsed here, in the probe's child first
            if isinstance(target, h5py.h5d.DatasetID):
                _check_dataset(name, target, where, file_size)
                datasets.append(name)
                if on_dataset is not None:
                    on_dataset(name, target, attrs)
            elif not isinstance(target, h5py.h5g.GroupID):
                raise InputError(f"{where}: refused: {label} is neither a group nor a dataset")
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
