"""`pack_run`: a whole run into one HDF5 file (layout in `_layout`), written atomically."""

from __future__ import annotations

import errno
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stabledrl_cli._atomic import mark_writing, missing_directory, output_path, write_error
from stabledrl_cli._json import unicode_text
from stabledrl_cli._version import __version__
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._integrity import (
    Finding,
    IntegrityReport,
    integrity_warnings_ignored,
)
from stabledrl_cli.dump._layout import (
    CHECKSUMS_VERSION,
    CHUNK_ELEMENTS,
    FILTERS,
    RAGGED_FIELDS,
    RANK_SEQUENCES,
    SEQUENCE_FIELDS,
    STEP_COUNTS,
    TOKEN_FIELDS,
    UNJOINED,
    checksums_dataset,
    needs_escape,
    scalar_dataset_name,
)
from stabledrl_cli.dump._live import LiveRead, live_read
from stabledrl_cli.dump._open import opened_run
from stabledrl_cli.dump._remote import inside_local_run, local_path
from stabledrl_cli.dump._run import Run, Step, size_on_disk
from stabledrl_cli.dump._schema import (
    COUNT_FIELDS,
    EXTENSION_FIELDS,
    FIELDS,
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    RECORDING_STOPS,
    RECORDING_WHEN_PACKED,
    RUN_KIND,
    STEPS_DIR,
    manifest_stops,
    path_argument,
    step_number,
    switch_argument,
    written_version,
)
from stabledrl_cli.dump._setup import os_file
from stabledrl_cli.errors import InputError, UsageError, counted, quoted, type_name
from stabledrl_cli.vocab import OMEGA_KINDS, PACK_COMPRESSIONS, PackCompression, UnjoinedGeometry


class _GuardedFile(io.RawIOBase):
    """The archive's temporary file as libhdf5 sees it (h5py's file-object driver): the first
    failed write (a full disk) is kept in `error` and every later write is dropped, so libhdf5
    never sees an I/O error. It would otherwise fail to close the file and crash the process
    (a segfault) when the objects of the half-written file are freed; `pack_run` raises the
    kept error once the file is closed, and the temporary file is removed.

    Once closed, it takes every call as a write to a lost file (kept in `error`, never
    raised): a SIGTERM that stops h5py while it closes the archive leaves h5py's file open,
    and h5py flushes it through this object when it frees it, after `pack_run` closed it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        # Unbuffered: a buffered file would raise a deferred write error from seek or tell.
        self._raw = open(path, "w+b", buffering=0)  # noqa: SIM115 -- closed by close()
        mark_writing(self._raw.fileno())  # h5py's file-object driver takes no lock of its own
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _open(self) -> bool:
        """False once closed, the error kept."""
        if self._raw.closed:
            self.error = self.error or OSError(errno.EBADF, "written after it was closed")
            return False
        return True

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer) if self._open() else 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._open() and self.error is None:
            try:
                rest = view
                while rest:
                    written = self._raw.write(rest)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    rest = rest[written:]
            except OSError as exc:
                self.error = exc
        return view.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence) if self._open() else 0

    def tell(self) -> int:
        return self._raw.tell() if self._open() else 0

    def truncate(self, size: int | None = None) -> int:
        if self._open() and self.error is None:
            try:
                return self._raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None and not self._raw.closed:
            try:
                self._raw.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if not self.closed:
            self.flush()
            try:
                self._raw.close()
            except OSError as exc:
                self.error = self.error or exc
        super().close()


def _index_dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    """An index dataset (read whole by readers) with its checksum attribute."""
    dataset = group.create_dataset(name, data=values)
    dataset.attrs[CRC_ATTR] = index_crc(values)


def _text_dataset(handle: h5py.File, name: str, text: str) -> None:
    dataset = handle.create_dataset(name, data=text, dtype=h5py.string_dtype())
    dataset.attrs[CRC_ATTR] = index_crc(text)


def _filters(compression: PackCompression, first: np.ndarray) -> dict[str, Any]:
    """A data dataset's HDF5 filters (`FILTERS`), chosen from the first values it gets."""
    values = np.ascontiguousarray(first.reshape(-1)[:CHUNK_ELEMENTS])
    sample = values.view(np.uint8)
    if compression == "small":
        shuffled = sample.reshape(-1, values.itemsize).T  # HDF5's shuffle: byte k of each value
        smaller = _deflated_size(shuffled, 4) < _deflated_size(sample, 4)
        return FILTERS["small" if smaller else "small-unshuffled"]
    halved = 2 * _deflated_size(sample, 1) <= sample.nbytes
    return FILTERS["deflated" if halved else "plain"]


PLAIN_CHUNK_WIDTH = 8
"""An uncompressed data dataset's chunk holds `CHUNK_ELEMENTS` x 8 bytes (256 KiB), however
narrow its dtype: 131,072 entries of a float16 sketch, not 32,768. A step's slice of it then
takes a quarter of the chunk lookups and reads (a k=128 sketch's step: 32, not 128), and the
chunk index, which the archive's opening walks, a quarter of the entries. No read of a step
decompresses anything there, which is what keeps a compressed one's chunks at
`CHUNK_ELEMENTS`."""


def _chunk_elements(dtype: np.dtype, filters: dict[str, Any]) -> int:
    """Entries in a chunk of a data dataset of `dtype` written with `filters`."""
    if filters:  # compressed: a step's read decompresses its whole chunks
        return CHUNK_ELEMENTS
    return max(CHUNK_ELEMENTS, CHUNK_ELEMENTS * PLAIN_CHUNK_WIDTH // dtype.itemsize)


def _deflated_size(data: np.ndarray, level: int) -> int:
    """Bytes of `data` deflated raw (no header to outweigh a small sample) at `level`."""
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    return len(deflate.compress(np.ascontiguousarray(data).data) + deflate.flush())


class _Column:
    """A growing 1-D dataset: appended step by step, with fill where a step lacks the field.
    Written without Fletcher32 (`FILTERS["plain"]`), it keeps the CRC-32 of each step's slice
    (`crcs`, for `checksums/`).

    Its first chunk's entries (`_chunk_elements`) are held in memory and the dataset is made
    once they are all there, chunked at that length, or at `finish` with one chunk of exactly
    its entries: an uncompressed chunk takes its whole size on disk, and a run of a few hundred
    values a field would otherwise take a whole chunk (up to 256 KiB) a field.

    Its dtype is the first values', widened when a later step's values are of a dtype that
    holds every earlier one exactly (a sketch recorded as float16, then float32): the
    entries written so far are rewritten in it. Values of a narrower dtype are cast to it
    (exactly); a dtype neither way is refused."""

    def __init__(
        self,
        group: h5py.Group,
        name: str,
        first: np.ndarray,
        offsets: list[int],
        filters: dict[str, Any],
        field_name: str,
    ) -> None:
        """offsets: the earlier steps' offsets into the column; each lacks the field (fill).
        field_name: the step's field it holds, as messages name it."""
        self.field_name = field_name
        self.dtype = np.dtype(first.dtype)
        self.length = offsets[-1]
        self._group, self._name, self._filters = group, name, filters
        self.chunk = _chunk_elements(self.dtype, filters)
        self.dataset: h5py.Dataset | None = None
        self._held: dict[int, np.ndarray] = {}  # values not written yet, by their start
        self._steps = [(int(a), int(b - a)) for a, b in pairwise(offsets)]
        self.crcs: list[int] | None = None
        if not filters.get("fletcher32"):
            self.crcs = [self._fill_crc(count) for _, count in self._steps]

    def _fill_crc(self, count: int) -> int:
        """The CRC-32 of `count` fill entries as a reader reads them back (zeros)."""
        return crc32(bytes(count * self.dtype.itemsize))

    def _create(self, name: str, length: int) -> h5py.Dataset:
        """An empty dataset of the column's dtype and filters, of `length` entries, chunked
        at `chunk` entries or at its length when shorter."""
        return self._group.create_dataset(
            name,
            shape=(length,),
            maxshape=(None,),
            dtype=self.dtype,
            chunks=(max(1, min(length, self.chunk)),),
            **self._filters,
        )

    def _write(self) -> None:
        """Makes the dataset and writes the values held."""
        self.dataset = self._create(self._name, self.length)
        for start, values in self._held.items():
            self.dataset[start : start + len(values)] = values
        self._held.clear()

    def _widen(self, dtype: np.dtype) -> None:
        """The column's dtype made `dtype`, which holds each entry so far exactly: the
        entries written (or held) rewritten in it, and their steps' CRC-32s."""
        self.dtype = dtype
        self.chunk = _chunk_elements(dtype, self._filters)
        if self.dataset is None:
            self._held = {start: v.astype(dtype) for start, v in self._held.items()}
        else:
            narrow = self.dataset
            wide = self._create(f"{self._name}.wide", narrow.shape[0])
            for start in range(0, narrow.shape[0], self.chunk):
                wide[start : start + self.chunk] = narrow[start : start + self.chunk]
            del self._group[self._name]
            self._group.move(wide.name, self._name)
            self.dataset = self._group[self._name]
        if self.crcs is not None:
            self.crcs = [self._stored_crc(start, count) for start, count in self._steps]

    def _stored_crc(self, start: int, count: int) -> int:
        """The CRC-32 of the entries [start, start + count) as stored (or held)."""
        if self.dataset is not None:
            return crc32(np.ascontiguousarray(self.dataset[start : start + count]))
        held = self._held.get(start) if count else None  # an empty step shares its start
        return self._fill_crc(count) if held is None else crc32(held)

    def append(self, values: np.ndarray | None, count: int, where: str) -> None:
        """Writes `values` ([count], or None: leave `count` fill entries) at the end; `where`:
        the run and step, as a refusal names them."""
        if values is not None and count and values.dtype != self.dtype:
            if np.can_cast(values.dtype, self.dtype, casting="safe"):
                values = values.astype(self.dtype)
            elif np.can_cast(self.dtype, values.dtype, casting="safe"):
                self._widen(np.dtype(values.dtype))
            else:
                raise InputError(
                    f"{where}: {self.field_name} is {values.dtype}, an earlier step's "
                    f"{self.dtype}, and neither holds the other's values: cannot pack it"
                )
        start, self.length = self.length, self.length + count
        self._steps.append((start, count))
        if values is None or count == 0:
            if self.crcs is not None:
                self.crcs.append(self._fill_crc(count))
        else:
            values = np.ascontiguousarray(values)
            if self.crcs is not None:
                self.crcs.append(crc32(values))
            if self.dataset is None:
                self._held[start] = values.copy()  # the step's arrays are not kept
        if self.dataset is None:
            if self.length >= self.chunk:
                self._write()
            return
        self.dataset.resize((self.length,))
        if values is not None and count:
            self.dataset[start : self.length] = values

    def finish(self) -> None:
        """Writes the dataset of a column shorter than a chunk."""
        if self.dataset is None:
            self._write()


@dataclass
class _Packer:
    """Per-step bookkeeping of one pack, written as [S] datasets at the end."""

    handle: h5py.File
    compression: PackCompression
    numbers: list[int] = field(default_factory=list)
    counts: dict[str, list[int]] = field(default_factory=lambda: {n: [] for n in STEP_COUNTS})
    scalars: list[dict[str, float]] = field(default_factory=list)
    fields: list[set[str]] = field(default_factory=list)
    rank_sequences: list[tuple[int, ...]] = field(default_factory=list)
    unjoined: list[frozenset[str]] = field(default_factory=list)
    """Each step's `Step.unjoined`: geometry of its ranks that the join left out."""
    unjoined_why: list[UnjoinedGeometry | None] = field(default_factory=list)
    """Each step's `Step.unjoined_why`."""
    unknown_fields: set[str] = field(default_factory=set)
    """Arrays of the packed steps that no field of this format version names: not packed."""
    offsets: dict[str, list[int]] = field(default_factory=lambda: {"tokens": [0], "sequences": [0]})
    columns: dict[str, _Column] = field(default_factory=dict)
    ragged_offsets: dict[str, list[int]] = field(default_factory=dict)
    ragged_shapes: dict[str, list[tuple[int, ...] | None]] = field(default_factory=dict)

    def _column(
        self, group: str, name: str, first: np.ndarray, offsets: list[int], field_name: str
    ) -> _Column:
        """The dataset `group/name` of the step's field `field_name`, created for its `first`
        values (their dtype and filters) after the fill entries of the earlier steps (`offsets`
        into it)."""
        key = f"{group}/{name}"
        if key not in self.columns:
            self.columns[key] = _Column(
                self.handle.require_group(group),
                name,
                first,
                offsets,
                _filters(self.compression, first),
                field_name,
            )
        return self.columns[key]

    def add(self, step: Step, where: str) -> None:
        at = f"{where}: step {step.step}"
        for name in step.scalars:
            if not name or "\x00" in name:  # HDF5 ends a name at a NUL and has no empty one
                raise InputError(
                    f"{at}: scalar {quoted(name)} has no HDF5 name "
                    "(empty, or holding a NUL character); cannot pack it"
                )
        arrays = {name: step.array(name) for name in sorted(step.fields)}
        tokens, sequences = step.num_tokens, step.num_sequences
        for group, names, count in (
            ("tokens", TOKEN_FIELDS, tokens),
            ("sequences", SEQUENCE_FIELDS, sequences),
        ):
            offsets = self.offsets[group]
            for name in names:
                array = arrays.get(name)
                if array is not None and array.shape != (count,):
                    raise InputError(
                        f"{at}: {name} has shape {list(array.shape)}, "
                        f"expected [{count}]; cannot pack it"
                    )
                if array is not None:
                    self._column(group, name, array, offsets, name).append(array, count, at)
                elif f"{group}/{name}" in self.columns:  # an optional field this step lacks
                    self.columns[f"{group}/{name}"].append(None, count, at)
            offsets.append(offsets[-1] + count)
        for name in RAGGED_FIELDS:
            array = arrays.get(name)
            if array is None and name not in self.ragged_offsets:
                continue
            if array is not None and name not in self.ragged_offsets:
                # The first step with it: earlier steps lack it.
                self.ragged_offsets[name] = [0] * (len(self.numbers) + 1)
                self.ragged_shapes[name] = [None] * len(self.numbers)
                self._column(f"ragged/{name}", "data", array, self.ragged_offsets[name], name)
            size = 0 if array is None else array.size
            flat = None if array is None else array.reshape(-1)
            self.columns[f"ragged/{name}/data"].append(flat, size, at)
            self.ragged_offsets[name].append(self.ragged_offsets[name][-1] + size)
            self.ragged_shapes[name].append(None if array is None else array.shape)
        self.numbers.append(step.step)
        for name, value in zip(
            STEP_COUNTS,
            (tokens, sequences, step.num_scored_tokens),
            strict=True,
        ):
            self.counts[name].append(int(value))
        self.scalars.append(dict(step.scalars))
        self.fields.append(set(step.fields))
        self.rank_sequences.append(step.rank_sequences)
        self.unjoined.append(step.unjoined)
        self.unjoined_why.append(step.unjoined_why)
        self.unknown_fields |= step.unknown_fields

    def finish(self) -> None:
        handle, count = self.handle, len(self.numbers)
        for column in self.columns.values():
            column.finish()
        steps = handle.require_group("steps")
        _index_dataset(steps, "step", np.array(self.numbers, dtype=np.int64))
        for name, values in self.counts.items():
            _index_dataset(steps, name, np.array(values, dtype=np.int64))
        ranks = max(map(len, self.rank_sequences), default=0)
        if ranks:  # steps joined from several ranks: each rank's sequences (0s: no batch)
            table = np.zeros((count, ranks), dtype=np.int64)
            for i, sizes in enumerate(self.rank_sequences):
                table[i, : len(sizes)] = sizes
            _index_dataset(steps, RANK_SEQUENCES, table)
        for group, offsets in self.offsets.items():
            _index_dataset(
                handle.require_group(group), "step_offsets", np.array(offsets, dtype=np.int64)
            )
        for name, offsets in self.ragged_offsets.items():
            group = handle.require_group(f"ragged/{name}")
            _index_dataset(group, "step_offsets", np.array(offsets, dtype=np.int64))
            shapes = self.ragged_shapes[name]
            ndim = max(len(s) for s in shapes if s is not None)
            table = np.zeros((count, ndim), dtype=np.int64)
            for i, shape in enumerate(shapes):
                if shape is not None:
                    table[i] = shape
            _index_dataset(group, "shape", table)
        present = handle.require_group("present")
        for name in FIELDS:
            flags = np.array([name in f for f in self.fields], dtype=np.uint8)
            if flags.any():
                _index_dataset(present, name, flags)
        for name in self.unjoined_steps:
            flags = np.array([name in u for u in self.unjoined], dtype=np.uint8)
            _index_dataset(handle.require_group(UNJOINED), name, flags)
        for kind in OMEGA_KINDS:  # why a sketch every rank recorded was left out
            flags = np.array([why == kind for why in self.unjoined_why], dtype=np.uint8)
            if flags.any():
                _index_dataset(handle.require_group(UNJOINED), kind, flags)
        values, recorded = handle.require_group("scalars"), handle.require_group("scalars_recorded")
        for name in sorted(set().union(*self.scalars)):
            stored = scalar_dataset_name(name)
            _index_dataset(
                values,
                stored,
                np.array([s.get(name, np.nan) for s in self.scalars], dtype=np.float64),
            )
            _index_dataset(
                recorded, stored, np.array([name in s for s in self.scalars], dtype=np.uint8)
            )
        for where, column in self.columns.items():
            if column.crcs is not None:
                group, name = checksums_dataset(where).rsplit("/", 1)
                _index_dataset(
                    handle.require_group(group), name, np.array(column.crcs, dtype=np.uint32)
                )

    @property
    def unjoined_steps(self) -> dict[str, int]:
        """Geometry the ranks' join left out, by name, with the steps that left it out."""
        names = sorted(set().union(*self.unjoined))
        return {name: sum(name in u for u in self.unjoined) for name in names}

    @property
    def checksummed(self) -> bool:
        """Whether some data dataset has per-step CRC-32s (`checksums/`) instead of Fletcher32."""
        return any(column.crcs is not None for column in self.columns.values())


@dataclass(frozen=True, kw_only=True)
class PackSummary:
    """What `pack_run` wrote."""

    source: str
    out: str
    steps: int
    tokens: int
    source_bytes: int
    """Bytes of the run's files that the archive holds (`left_out` not counted)."""
    archive_bytes: int
    findings: list[Finding]
    left_out: dict[str, int] = field(default_factory=dict)
    """The entries of the run's directory that the archive does not hold (`_left_out`), with
    their bytes."""
    unknown_fields: list[str] = field(default_factory=list)
    """Arrays of the run's step files that this format version does not know (a newer minor
    version's fields), sorted: the archive does not hold them."""
    unjoined_geometry: dict[str, int] = field(default_factory=dict)
    """Geometry the run's ranks recorded that their join leaves out (`Step.unjoined`: Grams,
    which do not combine, or a sketch of some ranks only), by name, with its steps: as a
    replay of the directory, the archive holds none of it, only which steps left it out."""
    damaged_steps: int = 0
    """Steps of the listing packed that every rank wrote but that could not be read (a torn or
    corrupt file: a finding each), left out."""
    live: LiveRead | None = None
    """A live Recorder held the run: the steps listed to pack, and those landed since
    (`dump._live.live_read`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.source,
            "out": self.out,
            "steps": self.steps,
            "tokens": self.tokens,
            "source_bytes": self.source_bytes,
            "archive_bytes": self.archive_bytes,
            "left_out": self.left_out,
            "unknown_fields": self.unknown_fields,
            "unjoined_geometry": self.unjoined_geometry,
            "damaged_steps": self.damaged_steps,
            "integrity": IntegrityReport(self.findings).to_dict(),
            "live": None if self.live is None else self.live.to_dict(),
        }


def _left_out(run: Run) -> dict[str, int]:
    """The entries of a run directory on this machine that an archive does not hold, by name (a
    directory's ending in /), with their bytes: all but its manifest, its steps/ and its
    dot-named files (notes, locks, temporary files) and a file browser's files (`os_file`:
    Thumbs.db, desktop.ini): checkpoints/, branches/ (`stabledrl branch` reads and writes
    them in the run directory), a user's own files. {} for an archive, or a run at a URL of
    another filesystem."""
    local = local_path(run.location)
    if local is None or not os.path.isdir(local):
        return {}
    found: dict[str, int] = {}
    with suppress(OSError), os.scandir(local) as entries:
        for entry in entries:
            skipped = entry.name.startswith(".") or entry.name in (MANIFEST_NAME, STEPS_DIR)
            if not skipped and not os_file(Path(entry.path)):
                name = unicode_text(entry.name) + ("/" if entry.is_dir() else "")
                found[name] = size_on_disk(Path(entry.path))
    return dict(sorted(found.items()))


def check_pack_target(
    given: str | os.PathLike[str], run: Run, force: bool, *, to_force: str = "pass force=True"
) -> Path:
    """`given` as the archive's path, UsageError unless `pack_run` may write it: not a
    directory, nor a name ending in / (which names one), in one that exists, not inside
    `run`'s directory nor `run`'s archive itself (symlinks resolved: an archive there would
    replace a file of the run, or sit among its files), and no entry of that name at all (a
    file, a symlink even to nothing, a FIFO...) unless `force` (then written as
    `_atomic.output_path` writes: a link's target replaced, a FIFO or device written in place).
    `to_force`: how the message tells the caller to force it (the command's `pass --force`).
    WriteError when the system cannot tell (a name longer than the file system takes)."""
    out = Path(given)
    try:
        if inside_local_run(out, run.location):
            raise UsageError(
                f"{out} is inside the run {run.location}; write the archive outside it"
            )
        if out.is_dir():
            raise UsageError(
                f"{out} is a directory; give the archive's file name, e.g. {out}/run.h5"
            )
        if os.fspath(given).endswith(os.sep):
            raise UsageError(
                f"{given} ends in {os.sep}: give the archive's file name, e.g. {out}/run.h5"
            )
        problem = missing_directory(out)
    except OSError as exc:  # a name longer than the file system takes, ...
        raise write_error(out, exc) from None
    if problem is not None:
        raise UsageError(f"{out}: {problem}")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out} already exists; {to_force} to overwrite it")
    return out


def _write_archive(
    handle: h5py.File,
    run: Run,
    numbers: Sequence[int],
    manifest_text: str,
    guarded: _GuardedFile,
    progress: Callable[[int], None] | None,
    compression: PackCompression,
) -> tuple[_Packer, IntegrityReport]:
    """Every readable step of `numbers` (each checked in full as it is read, `progress(1)`
    after each, packed or not), then the run's integrity report as of the listing packed: its
    full check finds each step file checked already, so a file is read once (a run at a URL is
    not fetched twice)."""
    handle.attrs["kind"] = RUN_KIND
    handle.attrs["tool_version"] = __version__
    handle.attrs["source"] = unicode_text(run.location)  # h5py refuses a lone surrogate
    _text_dataset(handle, "manifest", manifest_text)
    packer = _Packer(handle, compression)
    with integrity_warnings_ignored():  # the integrity report names them
        for n in numbers:
            if guarded.error is not None:  # the disk is full: stop early, fail at the end
                break
            for step in run.steps_of((n,)):  # none when its file is damaged
                packer.add(step, run.location)
            if progress is not None:
                progress(1)
    packer.finish()
    integrity = run.listed_integrity  # of the listing packed: a live run grows meanwhile
    findings = [  # a file name that is not UTF-8, escaped: readers refuse a lone surrogate
        {k: unicode_text(v) if isinstance(v, str) else v for k, v in f.to_dict().items()}
        for f in integrity.findings
    ]
    _text_dataset(handle, "integrity", json.dumps(findings))
    extended = run.group_ids == "global" or any(
        f"sequences/{name}" in packer.columns for name in EXTENSION_FIELDS
    )
    manifest = run.manifest
    uses_1_2 = (
        manifest.get("policy") is None
        or manifest.get("source") is not None
        or any("logp" not in fields for fields in packer.fields)
        or any(needs_escape(name) for name in set().union(*packer.scalars))
    )
    uses_1_3 = any(f"sequences/{name}" in packer.columns for name in COUNT_FIELDS)
    handle.attrs["format_version"] = (
        CHECKSUMS_VERSION
        if packer.checksummed
        else written_version(
            extended, uses_1_2, uses_1_3, loss_norm=run.loss_norm, world_size=manifest["world_size"]
        )
    )
    return packer, integrity


REASON_SHOWN = 1024
"""Characters of a rank's stop reason an archive's manifest keeps at most, fewer when the
notes of many ranks would take it past `MANIFEST_LIMIT`."""


def _archive_manifest(run: Run) -> str:
    """The archive's manifest: the run's, with every rank's stop note as its `recording_stops`
    when the run has notes of its own beyond the manifest's (a run of several ranks), and the
    ranks a Recorder was recording or had died on as its `recording_when_packed`. The notes'
    reasons are cut (`REASON_SHOWN`, halved until the manifest fits its readers' bound)."""
    manifest, stops = run.manifest, run.listed_recording_stops  # of the listing packed
    live, died = run.recorder_ranks()
    if live or died:
        manifest = {**manifest, RECORDING_WHEN_PACKED: {"live": live, "died": died}}
    if stops == manifest_stops(manifest):
        text = _fitting(manifest)
        if text is None:
            raise InputError(
                f"{run.location}: cannot pack it: its manifest passes the {MANIFEST_LIMIT} "
                "bytes an archive's manifest may take"
            )
        return text
    shown = REASON_SHOWN
    while shown >= 0:
        cut = [{**note, "reason": _cut(note["reason"], shown)} for note in stops]
        text = _fitting({**manifest, RECORDING_STOPS: cut})
        if text is not None:
            return text
        shown = shown // 2 if shown else -1
    raise InputError(
        f"{run.location}: cannot pack it: its manifest and the stop notes of its "
        f"{len(stops)} ranks pass the {MANIFEST_LIMIT} bytes an archive's manifest may take"
    )


def _fitting(manifest: dict[str, Any]) -> str | None:
    """`manifest` as JSON within the `MANIFEST_LIMIT` bytes an archive's readers take:
    indented, or compact when indented it would not fit (a run's own manifest.json, written
    compactly, may be near the bound); None when neither fits."""
    text = json.dumps(manifest, indent=2, allow_nan=False)
    if len(text.encode()) > MANIFEST_LIMIT:
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
    return text if len(text.encode()) <= MANIFEST_LIMIT else None


def _cut(text: str, shown: int) -> str:
    """`text`, or its first `shown` characters and "...", whichever is shorter."""
    return text if len(text) <= shown + 3 else text[:shown] + "..."


def _nothing_to_pack(run: Run, integrity: IntegrityReport) -> str:
    """Why a run packs no step: it has none, or every one was skipped (its first finding)."""
    if not integrity.findings:
        return f"{run.location}: the run has no steps; nothing to pack"
    found = counted(len(integrity.findings), "integrity finding")
    return (
        f"{run.location}: no readable step to pack ({found}, the first: "
        f"{integrity.findings[0].message})"
    )


def pack_run(
    run: str | os.PathLike[str] | Run,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    compression: PackCompression = "fast",
    listed: Sequence[int] | None = None,
) -> PackSummary:
    """Writes `run` (every readable step) into one HDF5 file at `out`, atomically (a symlink,
    device or FIFO named `out` is written in place: `_atomic.output_path`). run: a run
    directory, archive or URL, opened here and closed when it returns or raises, or an opened
    Run, left open.

    A run being recorded is packed as listed when the pack begins: `listed`, its
    `listed_whole_step_numbers` taken by the caller (who counts them for a progress bar, say),
    else taken here (ascending, each step once, else UsageError); the steps that land
    meanwhile, and their files' findings, are left out.

    progress: called with 1 after each step of the listing is read (packed, or left out as
    damaged). compression: "fast" (only the fields a deflate halves are compressed: a replay
    reads the archive near the directory's speed) or "small" (every field gzip, with shuffle
    where it helps: the smallest file, ~2.5x slower to read); readers read either
    (`_layout.FILTERS`).

    The source's integrity findings (torn, corrupt or temporary step files, gaps) are carried
    into the archive; the steps they name are not packed. InputError (exit 3) when no step is
    left to pack (a run of no step, or every one damaged), no file written. UsageError (exit
    2) if `out` exists and not `force`, or lies inside the run's directory, `force` or not
    (`check_pack_target`); the target name is untouched until the archive is complete (written
    under a temporary name beside it, then renamed: a killed pack leaves no file under the
    target name). A failed write (a full disk) raises WriteError (exit 4), its temporary file
    removed.
    """
    if compression not in PACK_COMPRESSIONS:
        raise UsageError(f"compression {compression!r}: expected one of {list(PACK_COMPRESSIONS)}")
    given = path_argument(out, "out", "the archive's file")
    force = switch_argument(force, "force")
    chosen = None if listed is None else _listed_argument(listed)
    with opened_run(run) as source:
        target = check_pack_target(given, source, force)
        numbers = source.listed_whole_step_numbers if chosen is None else chosen
        return _pack(source, target, numbers, progress, compression)


def _listed_argument(listed: Sequence[int]) -> list[int]:
    """`pack_run`'s `listed`: step numbers, ascending, each once (an archive holds its steps
    so), else UsageError (for one number or str too, not their digits)."""
    if isinstance(listed, (str, bytes)) or not isinstance(listed, Iterable):
        raise UsageError(f"listed must be a list of step numbers, not {type_name(listed)}")
    numbers = [step_number(n, "listed") for n in listed]
    for before, after in pairwise(numbers):
        if after <= before:
            raise UsageError(f"listed must be ascending, each step once: {after} after {before}")
    return numbers


def _pack(
    run: Run,
    target: Path,
    numbers: list[int],
    progress: Callable[[int], None] | None,
    compression: PackCompression,
) -> PackSummary:
    """`pack_run` of the steps `numbers` of an opened run, its last listing's (not listed
    again), into a `target` checked already."""
    try:
        manifest_text = _archive_manifest(run)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{run.location}: its manifest cannot be written as JSON ({exc})"
        ) from None
    source_bytes = run.size_bytes  # before the archive: a store that cannot list leaves none
    unpacked = _left_out(run)
    source_bytes = max(0, source_bytes - sum(unpacked.values()))
    with output_path(target) as temp:
        guarded = _GuardedFile(temp)
        try:
            with h5py.File(guarded, "w") as handle:
                packer, integrity = _write_archive(
                    handle, run, numbers, manifest_text, guarded, progress, compression
                )
        finally:
            guarded.close()
        if guarded.error is not None:
            raise guarded.error
        if not packer.numbers:
            raise InputError(_nothing_to_pack(run, integrity))
        archive_bytes = temp.stat().st_size  # a FIFO or device written in place has no size
    return PackSummary(
        source=run.location,
        out=str(target),
        steps=len(packer.numbers),
        tokens=packer.offsets["tokens"][-1],
        source_bytes=source_bytes,
        archive_bytes=archive_bytes,
        findings=list(integrity.findings),
        left_out=unpacked,
        unknown_fields=sorted(packer.unknown_fields),
        unjoined_geometry=packer.unjoined_steps,
        damaged_steps=len(numbers) - len(packer.numbers),
        live=live_read(run, numbers),
    )
