"""`ArchiveRun`: a run packed into one HDF5 file (layout in `_layout`), read with the Run API.

Steps are read lazily: indexing a Step reads its slice of one dataset. Checksums catch corrupt
bytes on every read: HDF5's Fletcher32 of each chunk, or, for a dataset written without it, the
CRC-32 of each step's slice (`checksums/`); `integrity` reads every chunk (or step slice) once
and reports the steps that a bad one touches, and those steps are skipped with a warning, as a
corrupt step file of a run directory is. Archives without the 1.1 fields (micro_batch,
group_split) read as before: their steps simply lack those fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stabledrl_cli._json import NotUtf8, parse_strict
from stabledrl_cli.dump._archive_checks import (
    CRC_ATTR,
    H5_ERRORS,
    attributes,
    check_attributes,
    chunks_unwritten,
    crc_matches,
    index_crc,
    index_type,
    stored_chunks,
)
from stabledrl_cli.dump._archive_probe import names_a_run, probe
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._integrity import Finding, IntegrityReport, StepReadError
from stabledrl_cli.dump._layout import (
    ARCHIVE_MAJOR,
    RAGGED_FIELDS,
    RANK_SEQUENCES,
    REPLAY_REPORT_KIND,
    SCALAR_ESCAPE_VERSION,
    SEQUENCE_FIELDS,
    STEP_COUNTS,
    TOKEN_FIELDS,
    UNJOINED,
    checksums_dataset,
    decode,
    decode_json_text,
    scalar_name,
)
from stabledrl_cli.dump._run import Run, Step, scalar_names, unjoined_kind
from stabledrl_cli.dump._schema import (
    BATCH_FIELDS,
    FIELDS,
    GRAM_KEY,
    MANIFEST_LIMIT,
    RUN_KIND,
    SKETCH_KEY,
    check_manifest,
    check_readable_version,
    parse_manifest,
)
from stabledrl_cli.dump._stfile import FileKey, file_key
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.errors import InputError, UsageError, quoted
from stabledrl_cli.vocab import OMEGA_KINDS

# Each open dataset's chunk cache: steps are read in order, so consecutive steps share at most
# the chunk on their boundary (up to 256 KiB: `_packer`); 1 MiB holds it with room to spare.
# 8 MiB was no faster on any benchmark run and cost 45-60 MB of peak memory.
_CHUNK_CACHE_BYTES = 1 << 20
_INTEGRITY_LIMIT = 64 << 20
"""Bytes of the carried integrity findings (a run with a million stray files has ~200 MB; such
an archive is refused rather than parsed)."""


class NotARun(InputError):
    """An HDF5 file whose root names it something other than a run (a replay report)."""


def _chunk_count(dataset: h5py.Dataset) -> int | None:
    """Chunks of a chunked one-dimensional dataset (None for any other)."""
    if dataset.chunks is None or dataset.ndim != 1:
        return None
    return -(-int(dataset.shape[0]) // int(dataset.chunks[0]))


def _written_chunks(dataset: h5py.Dataset) -> np.ndarray | None:
    """The indexes of a chunked one-dimensional dataset's written chunks, ascending: all of
    them, or, when it has chunks never written (pack leaves unwritten the chunks of steps
    without the field), those its chunk index lists; None for any other dataset, or one whose
    chunk index cannot be walked (its reads fail)."""
    count = _chunk_count(dataset)
    if count is None:
        return None
    if not chunks_unwritten(dataset.id):
        return np.arange(count, dtype=np.int64)
    size = int(dataset.chunks[0])
    found: list[int] = []
    try:
        stored_chunks(dataset.id, lambda info: found.append(info.chunk_offset[0] // size))
    except H5_ERRORS:
        return None
    return np.sort(np.array(found, dtype=np.int64))


def _chunks_to_check(dataset: h5py.Dataset) -> list[tuple[slice, ...]]:
    """The selections the integrity check reads of a dataset not read whole: each written
    chunk (one never written holds no data, and costs libhdf5 kilobytes to read), or the
    whole of an unchunked one."""
    if not dataset.chunks:
        return [()]
    if not chunks_unwritten(dataset.id):
        return list(dataset.iter_chunks())
    found: list[tuple[int, ...]] = []
    stored_chunks(dataset.id, lambda info: found.append(info.chunk_offset))
    return [
        tuple(
            slice(at, min(at + width, size))
            for at, width, size in zip(offset, dataset.chunks, dataset.shape, strict=True)
        )
        for offset in sorted(found)
    ]


def _unread_chunks(
    dataset: h5py.Dataset, written: np.ndarray, read: set[int]
) -> list[tuple[slice, ...]]:
    """The selections of the `written` chunks (`_written_chunks`) of a chunked one-dimensional
    dataset that are not among those `read`."""
    size, length = int(dataset.chunks[0]), int(dataset.shape[0])
    unread = written[~np.isin(written, np.fromiter(read, np.int64, len(read)))]
    return [(slice(at, min(at + size, length)),) for at in (unread * size).tolist()]


def _data_dataset(name: str) -> str:
    """Where an archive stores the values of field `name` (`_layout`)."""
    if name in RAGGED_FIELDS:
        return f"ragged/{name}/data"
    return f"{'tokens' if name in TOKEN_FIELDS else 'sequences'}/{name}"


def _is_finding(value: object) -> bool:
    """Whether a carried finding has Finding's fields with their types."""
    return (
        isinstance(value, dict)
        and set(value) == {"kind", "step", "path", "message"}
        and isinstance(value["kind"], str)
        and isinstance(value["message"], str)
        and isinstance(value["path"], str | None)
        and (value["step"] is None or type(value["step"]) is int)
    )


def _unreadable(exc: BaseException, store_failure: str | None) -> StepReadError:
    """Why a step's data could not be read: the store failed under the read, or its bytes."""
    if store_failure is not None:
        return StepReadError("unreadable", f"cannot read: {store_failure}")
    return StepReadError("unreadable", f"archive data checksum failed: {exc}")


@dataclass(eq=False, kw_only=True, repr=False)  # Step's repr
class ArchiveStep(Step):
    """A Step of a packed run: `step[name]` reads the step's slice of the archive."""

    archive: ArchiveRun = field(repr=False)
    index: int = field(repr=False)
    """The step's position in the archive's [S] datasets."""
    loaded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Arrays already read (and checked) when the step was loaded; each is handed out once."""

    @property
    def unknown_fields(self) -> frozenset[str]:
        return self.archive.unknown_fields

    def _read(self, name: str) -> np.ndarray:
        if name in self.loaded:
            return self.loaded.pop(name)
        self.archive.check_open()
        try:
            return self.archive.read_field(self.index, name)
        except H5_ERRORS as exc:
            raise InputError(
                f"{self.archive.location}: cannot read {name} of step {self.step}: "
                f"{self.archive.failure_of(exc)}"
            ) from None


@dataclass(frozen=True)
class _ArchiveChecks:
    """`ArchiveRun.checks`: per data dataset, the chunks read (their Fletcher32 checked) and the
    steps whose slice was read (its CRC-32 checked), of the archive whose key is `key`."""

    key: FileKey
    chunks: dict[str, frozenset[int]]
    steps: dict[str, frozenset[int]]


def _archive_at(source: str, *, verify: bool) -> Run:
    """The archive at the local path `source`, opened again (`ArchiveRun.__reduce__`)."""
    return ArchiveRun(Path(source), verify=verify)


class ArchiveRun(Run):
    """A run packed by `stabledrl pack` into one HDF5 file (layout in the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        verify: bool = True,
        fileobj: StoreFile | None = None,
        size: int | None = None,
        key: FileKey | None = None,
    ) -> None:
        """fileobj, size, key: the archive as a binary file object of `size` bytes, and what
        changes when it does (read through fsspec, `dump._remote`; messages then name it by its
        `location`)."""
        self.path = path
        self.verify = verify
        self._store = fileobj
        self._bad: dict[int, StepReadError] = {}  # step index -> why it cannot be read
        self._failed_reads: dict[int, StepReadError] = {}
        """The steps of `_bad` a step's read marked, that no finding names (yet)."""
        self._load_findings: list[Finding] = []
        self._verified: set[int] = set()
        self._checked_all = False
        self._checksummed = False
        self._all_bad: str | None = None
        """Why every step is bad (an index checksum failed), if one is."""
        self._open: dict[str, h5py.Dataset] = {}
        self._closed = False
        self._read_chunks: dict[str, set[int]] = {}
        """Per data dataset, the chunks a step's read has decoded (their Fletcher32 checked):
        the integrity check does not read them again."""
        self._step_crcs: dict[str, np.ndarray] = {}
        """Per data dataset written without Fletcher32, the CRC-32 of each step's slice."""
        self._read_steps: dict[str, set[int]] = {}
        """Per such dataset, the steps whose slice a read has checked."""
        self._read_whole: set[str] = set()
        """The index and text datasets read whole when the archive was opened: the integrity
        check does not read them again either."""
        self._written: dict[str, np.ndarray] = {}
        """Per chunked data dataset, the indexes of its written chunks (`_written_chunks`): a
        step whose slice lies in another holds no data, and the integrity check reads these
        without walking the chunk index again."""
        where = self.location
        try:
            if size is None:
                stat = os.stat(path)
                size, key = stat.st_size, file_key(stat)
        except OSError as exc:
            raise InputError(f"{where}: unreadable HDF5 file ({exc})") from None
        file_size = size
        self._key = key
        """What changes when the archive does: another reader's `checks` hold only for the same."""
        try:
            self._open_file(file_size, fileobj)
        except InputError:
            failure = self._store_failure()
            if fileobj is not None:
                fileobj.close()
            if failure is None:
                raise
            raise InputError(f"{where}: cannot read it: {failure}") from None

    def _open_file(self, file_size: int, fileobj: StoreFile | None) -> None:
        where = self.location
        probed = probe(self.path, file_size, fileobj=fileobj, where=where)
        try:
            source = self.path if fileobj is None else fileobj
            self._file = h5py.File(source, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
        except H5_ERRORS as exc:
            raise InputError(f"{where}: unreadable HDF5 file ({exc})") from None
        self._prefetched = probed.values_for(self._file)
        try:
            self._check_kind()
            self._datasets = probed.objects(self._file, where, file_size)
            self._load()
        except InputError:
            self._file.close()
            raise
        except H5_ERRORS as exc:
            self._file.close()
            raise InputError(
                f"{where}: corrupt run archive ({type(exc).__name__}: {exc})"
            ) from None

    def _store_failure(self) -> str | None:
        """The store's error under the last failed read of an archive read through fsspec
        (`StoreFile`), or None: a local file's, or a failure of the file's own bytes."""
        return None if self._store is None else self._store.take_failure()

    def failure_of(self, exc: BaseException) -> str:
        """Why a read of a step's data failed: the store's error, else h5py's (a checksum)."""
        return self._store_failure() or str(exc)

    def _text(self, name: str, limit: int) -> str:
        """A JSON string dataset, its size capped and its checksum checked (if it has one): a
        mismatch refuses the manifest, and makes the integrity text, which holds no step, an
        `unchecked` finding (a replay skips no step for it)."""
        prefetched = self._prefetched.texts.pop(name, None)
        if prefetched is None:
            dataset = self._named_dataset(name)
            try:
                text = decode_json_text(dataset[()])
            except NotUtf8:
                raise InputError(
                    f"{self.location} ({name}): unreadable {name}: not UTF-8 JSON"
                ) from None
            prefetched = text, decode(dataset.attrs.get(CRC_ATTR))
        text, expected = prefetched
        self._read_whole.add(name)
        if not isinstance(text, str) or len(text) > limit:
            raise InputError(
                f"{self.location}: corrupt run archive ({name} is not a bounded string)"
            )
        if expected is not None and not crc_matches(expected, index_crc(text)):
            if name == "manifest":
                raise InputError(
                    f"{self.location}: corrupt run archive (manifest checksum mismatch)"
                )
            self._load_findings.append(
                Finding(
                    "unchecked",
                    None,
                    f"{self.location}:{name}",
                    f"{name}: checksum mismatch (the findings it carries are read unchecked)",
                )
            )
        return text

    def _index(self, name: str) -> np.ndarray:
        """An index dataset read whole (its size was bounded by `check_objects`; with h5py's
        low-level calls, a third of the high-level ones' time), its checksum checked: a
        mismatch marks every step bad (its numbers, counts or scalars are not to be trusted)
        and is a finding."""
        prefetched = self._prefetched.arrays.pop(name, None)
        if prefetched is None:
            try:
                dataset = h5py.h5d.open(self._file.id, name.encode())
            except KeyError:  # missing, a group, or under a dataset where a group belongs
                raise self._no_dataset(name) from None
            values = np.empty(dataset.shape, dataset.dtype)
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
            prefetched = values, decode(attributes(dataset).get(CRC_ATTR))
        values, expected = prefetched
        self._read_whole.add(name)
        dtype, ndim = index_type(name)
        self._require_type(name, values.dtype, values.shape, (dtype,), ndim)
        if self._checksummed and not crc_matches(expected, index_crc(values)):
            why = "no checksum" if expected is None else "checksum mismatch"
            self._load_findings.append(
                Finding(
                    "unreadable",
                    None,
                    f"{self.location}:{name}",
                    f"archive index {name}: {why}; every step is skipped",
                )
            )
            self._all_bad = f"archive index {name}: {why}"
        return values.astype(values.dtype.newbyteorder("="), copy=False)

    def _check_kind(self) -> None:
        """A run archive of a readable version, else InputError (a replay report named)."""
        location = self.location
        kind = self._root_attribute("kind")
        if isinstance(kind, str) and kind == REPLAY_REPORT_KIND:
            raise NotARun(f"{location} is a replay report, not a run (open it with read_hdf5)")
        if not names_a_run(kind):
            if kind is None or isinstance(kind, str):
                shown = f"HDF5 kind {'none' if kind is None else quoted(kind)}"
            else:  # an array compares element by element, and would be printed whole
                shown = f"HDF5 kind of type {type(kind).__name__}, not text"
            raise NotARun(f"{location} is not a run ({shown}, expected {RUN_KIND!r})")
        version = self._root_attribute("format_version")
        if version is not None and not isinstance(version, str):  # an HDF5 number or array
            raise InputError(
                f"{location}: malformed format version (HDF5 format_version of type "
                f"{type(version).__name__}, not text)"
            )
        self.format_version = check_readable_version(version, location, ARCHIVE_MAJOR)

    def _root_attribute(self, name: str) -> Any:
        """A root attribute of the archive, decoded (None when it has none)."""
        if name in self._prefetched.root:
            return self._prefetched.root.pop(name)
        check_attributes(self._file.id, "the root", self.location, only=name)
        return decode(self._file.attrs.get(name))

    def _load(self) -> None:
        handle, location = self._file, self.location
        manifest = parse_manifest(self._text("manifest", MANIFEST_LIMIT), f"{location} (manifest)")
        check_manifest(manifest, f"{location} (manifest)")
        self._manifest = manifest
        self.world_size = int(manifest.get("world_size") or 1)
        carried = parse_strict(self._text("integrity", _INTEGRITY_LIMIT), location, "integrity")
        if not isinstance(carried, list) or not all(_is_finding(f) for f in carried):
            raise InputError(
                f"{location}: corrupt run archive (integrity is not a list of findings)"
            )
        self._carried = [Finding(**f) for f in carried]
        prefetched_step = self._prefetched.arrays.get("steps/step")
        self._checksummed = (
            CRC_ATTR in self._named_dataset("steps/step").attrs
            if prefetched_step is None
            else prefetched_step[1] is not None
        )
        if not self._checksummed:
            self._load_findings.append(
                Finding(
                    "unchecked",
                    None,
                    location,
                    "archive written without index checksums (by an older stabledrl): its step "
                    "numbers, counts and scalars are read unchecked; pack the run again",
                )
            )
        self._numbers = self._index("steps/step").astype(np.int64)
        self._counts = {name: self._index(f"steps/{name}") for name in STEP_COUNTS}
        self._rank_sequences = (
            self._index(f"steps/{RANK_SEQUENCES}")
            if RANK_SEQUENCES in self._members("steps", required=True)
            else None
        )
        self._offsets = {
            group: self._index(f"{group}/step_offsets") for group in ("tokens", "sequences")
        }
        self._ragged = {
            name: (self._index(f"ragged/{name}/step_offsets"), self._ragged_shapes(name))
            for name in self._members("ragged")
            if name in FIELDS
        }
        # Per-step facts stay columns ([S] arrays), turned into a Step's set and dict only when
        # that step is loaded: a long archive costs a few bytes a step, not a dict a step.
        present = self._members("present", required=True)
        self._present = {
            name: self._index(f"present/{name}").astype(bool) for name in present if name in FIELDS
        }
        members = self._members(UNJOINED)
        self._unjoined = {
            name: self._index(f"{UNJOINED}/{name}").astype(bool)
            for name in members
            if name in (GRAM_KEY, SKETCH_KEY)
        }
        self._omegas = {  # why a sketch every rank recorded was left out
            kind: self._index(f"{UNJOINED}/{kind}").astype(bool)
            for kind in OMEGA_KINDS
            if kind in members
        }
        self.unknown_fields = frozenset(present).difference(FIELDS)
        """The fields of a newer minor version the archive holds (`present/NAME`): never read,
        each step's `unknown_fields` (a step's own `present/NAME` is not read either)."""
        count = len(self._numbers)
        # Which fields' data datasets the archive holds, each looked up once (a lookup by path
        # in libhdf5): the checks below and `_mark_inconsistent_steps` ask again.
        self._data_paths = {where for where in map(_data_dataset, FIELDS) if where in handle}
        for name in FIELDS:
            where = _data_dataset(name)
            has_data = where in self._data_paths and (
                name not in RAGGED_FIELDS or name in self._ragged
            )
            if name in self._present and self._present[name].any() and not has_data:
                raise self._no_dataset(where)
            if has_data and name not in self._present:  # its steps would read without it
                raise self._no_dataset(f"present/{name}")
        self._check_data_datasets()
        recorded = set(self._scalar_members("scalars_recorded"))
        values = set(self._scalar_members("scalars"))
        for group, missing in (
            ("scalars", recorded - values),
            ("scalars_recorded", values - recorded),
        ):
            if missing:  # a series holds both: its values, and the steps that recorded it
                raise self._no_dataset(f"{group}/{min(missing)}")
        stored = {scalar_name(name, self.format_version): name for name in values}
        self._scalar_values = {
            name: self._index(f"scalars/{stored[name]}") for name in sorted(stored)
        }
        self._scalar_recorded = {
            name: self._index(f"scalars_recorded/{stored[name]}").astype(bool)
            for name in self._scalar_values
        }
        offsets = [*self._offsets.values(), *(o for o, _ in self._ragged.values())]
        per_step = [
            *self._counts.values(),
            *self._step_crcs.values(),
            *self._present.values(),
            *self._unjoined.values(),
            *self._omegas.values(),
            *self._scalar_values.values(),
            *self._scalar_recorded.values(),
        ]
        if (
            any(o.shape != (count + 1,) for o in offsets)
            or any(c.shape != (count,) for c in per_step)
            or any(t.ndim != 2 or t.shape[0] != count for _, t in self._ragged.values())
        ):
            raise InputError(
                f"{location}: corrupt run archive (index lengths do not match the steps)"
            )
        self._check_rank_sequences()
        self._check_unjoined()
        self._index_of = {int(n): i for i, n in enumerate(self._numbers)}
        self._mark_inconsistent_steps()

    def _check_rank_sequences(self) -> None:
        """`steps/rank_sequences`, when the archive has it, splits each step's sequences over
        the run's ranks (a row of 0s: a step without a batch), else InputError; so does an
        archive of a per_rank run of several ranks without it, which a replay would read as
        global (pack writes it for every step with a batch)."""
        table = self._rank_sequences
        if table is None:
            if (
                self._manifest.get("loss_norm") == "per_rank"
                and self.world_size > 1
                and self._counts["num_sequences"].any()
            ):
                raise InputError(
                    f"{self.location}: corrupt run archive (no steps/{RANK_SEQUENCES}: a "
                    f"loss_norm per_rank run of {self.world_size} ranks replays each rank's "
                    "sequences alone)"
                )
            return
        sequences = self._counts["num_sequences"]
        sums = table.sum(axis=1)  # [S, R]: `_index` checked its dimensions
        if (
            table.shape != (len(self._numbers), self.world_size)
            or self.world_size < 2
            or (table < 0).any()
            or ((sums != sequences) & (sums != 0)).any()
        ):
            raise InputError(
                f"{self.location}: corrupt run archive (steps/{RANK_SEQUENCES} does not split "
                f"each step's sequences over the run's {self.world_size} ranks)"
            )

    def _check_unjoined(self) -> None:
        """`unjoined/NAME` flags only steps of several ranks' batches that lack NAME (the join
        left it out), else InputError."""
        batch = self._present.get("logp", np.zeros(len(self._numbers), dtype=bool))
        for name, flags in self._unjoined.items():
            lacking = batch & ~self._present.get(name, np.zeros_like(flags))
            if flags.any() and (self.world_size < 2 or (flags & ~lacking).any()):
                raise InputError(
                    f"{self.location}: corrupt run archive ({UNJOINED}/{name} flags a step "
                    f"that holds {name} or no batch of {self.world_size} ranks)"
                )
        left_out = self._unjoined.get(SKETCH_KEY, np.zeros(len(self._numbers), dtype=bool))
        reasons = np.zeros(len(self._numbers), dtype=np.int64)
        for kind, flags in self._omegas.items():
            reasons += flags
            if (flags & ~left_out).any() or (reasons > 1).any():
                raise InputError(
                    f"{self.location}: corrupt run archive ({UNJOINED}/{kind} flags a step "
                    f"whose {SKETCH_KEY} is not flagged left out, or that another flag gives "
                    "another reason for)"
                )

    def _ragged_shapes(self, name: str) -> np.ndarray:
        """ragged/NAME/shape ([S, ndim]: `_index`), its columns the field's dimensions, else
        InputError (the archive refused): every step of the field would read in another shape."""
        shapes = self._index(f"ragged/{name}/shape")
        ndim = FIELDS[name].ndim
        if shapes.shape[1] != ndim:
            raise InputError(
                f"{self.location}: corrupt run archive (ragged/{name}/shape is "
                f"{shapes.dtype.name} {list(shapes.shape)}, expected a [steps, {ndim}] array: "
                f"{name} has {ndim} dimension{'s' if ndim > 1 else ''})"
            )
        return shapes

    def _check_data_datasets(self) -> None:
        """Each field's data dataset, if the archive has one, is flat (1-D), holds the
        field's dtype, in either byte order (`_slice` hands out the native one), and is
        checked: by Fletcher32, or by its `checksums/` dataset (read here); else the archive is
        refused (InputError): every step of the field would be unreadable, or read unchecked."""
        for name, spec in FIELDS.items():
            where = _data_dataset(name)
            if where not in self._data_paths:
                continue
            dataset = self._dataset(where)
            self._require_type(where, dataset.dtype, dataset.shape, spec.dtypes, 1)
            written = _written_chunks(dataset)
            if written is not None:
                self._written[where] = written
            crcs = checksums_dataset(where)
            if crcs in self._file:
                self._step_crcs[where] = self._index(crcs)
            elif not dataset.fletcher32:
                raise InputError(
                    f"{self.location}: corrupt run archive ({where} has no checksum: neither "
                    f"HDF5's Fletcher32 nor a {crcs} dataset)"
                )

    def _require_type(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...], dtypes: tuple[str, ...], ndim: int
    ) -> None:
        """InputError (the archive refused) unless dataset `name` (of `dtype` and `shape`) has
        `ndim` dimensions and one of `dtypes`, in either byte order: a dataset of another type
        is not pack's, and reading it as one would convert its values (a step number 1.5 read
        as 1, 2**63 as a negative one)."""
        if len(shape) != ndim or dtype.newbyteorder("=") not in [np.dtype(d) for d in dtypes]:
            raise InputError(
                f"{self.location}: corrupt run archive ({name} is {dtype.name} {list(shape)}, "
                f"expected a {ndim}-D {' or '.join(dtypes)} array)"
            )

    def _mark_inconsistent_steps(self) -> None:
        """Marks the steps whose index entries disagree with each other or with the data
        datasets (a slice out of range, counts that disagree with offsets, a ragged shape that
        does not match its slice, a repeated, negative or descending step number, scored tokens
        past the tokens, a step scalar that is not the step's number, a batch without one of its
        required fields, a step without a batch that counts tokens, a batch of no token: what
        a step file's header may not say either); each is a finding."""
        count = len(self._numbers)
        reasons: dict[int, str] = {}

        def mark(bad: np.ndarray, why: str) -> None:
            for index in np.flatnonzero(bad):
                reasons.setdefault(int(index), why)

        if self._all_bad is not None:
            mark(np.ones(count, dtype=bool), self._all_bad)
        _, first = np.unique(self._numbers, return_index=True)
        unique = np.zeros(count, dtype=bool)
        unique[first] = True
        mark(~unique, "its step number repeats an earlier step's")
        mark(self._numbers < 0, "a negative step number")
        below = np.zeros(count, dtype=bool)  # pack writes the steps ascending
        below[1:] = self._numbers[1:] < np.maximum.accumulate(self._numbers)[:-1]
        mark(below, "its step number is below an earlier step's")
        tokens, scored = self._counts["num_tokens"], self._counts["num_scored_tokens"]
        for at in np.flatnonzero((scored < 0) | (scored > tokens)):
            reasons.setdefault(int(at), f"{scored[at]} scored tokens of {tokens[at]}")
        if "step" in self._scalar_values:
            said = self._scalar_values["step"]
            for at in np.flatnonzero(
                self._scalar_recorded["step"] & (said != self._numbers.astype(np.float64))
            ):
                reasons.setdefault(int(at), f"its step scalar says {said[at]:g}")
        absent = np.zeros(count, dtype=bool)
        batch = np.zeros(count, dtype=bool)
        for name in BATCH_FIELDS:
            batch |= self._present.get(name, absent)
        for name, spec in FIELDS.items():
            if spec.required:
                mark(
                    batch & ~self._present.get(name, absent),
                    f"required field {name} is missing",
                )
        counted = (tokens != 0) | (self._counts["num_sequences"] != 0) | (scored != 0)
        mark(~batch & counted, "a step without a batch counts tokens")
        mark(batch & (tokens == 0), "the step has no tokens")
        for group, names, counts in (
            ("tokens", TOKEN_FIELDS, self._counts["num_tokens"]),
            ("sequences", SEQUENCE_FIELDS, self._counts["num_sequences"]),
        ):
            offsets = self._offsets[group].astype(np.int64)
            lengths = [
                self._dataset(f"{group}/{n}").shape[0]
                for n in names
                if f"{group}/{n}" in self._data_paths
            ]
            # Without a dataset of the group (no per-sequence field but seq_id) nothing is read
            # from its range: the offsets only have to agree with the counts.
            end = min(lengths) if lengths else int(offsets[-1])
            mark(
                (offsets[:-1] < 0) | (offsets[1:] > end) | (np.diff(offsets) != counts),
                f"its {group} offsets disagree with its counts or the data",
            )
        for name, (offsets, shapes) in self._ragged.items():
            offsets = offsets.astype(np.int64)
            end = self._dataset(f"ragged/{name}/data").shape[0]
            sizes = np.prod(np.maximum(shapes, 0), axis=1, dtype=np.float64)
            present = self._present.get(name, np.zeros(count, dtype=bool))
            mark(
                (offsets[:-1] < 0)
                | (offsets[1:] > end)
                | (np.diff(offsets) < 0)
                | (present & ((shapes < 0).any(axis=1) | (sizes != np.diff(offsets)))),
                f"its {name} shape does not match its data",
            )
            for column, dim in enumerate(FIELDS[name].dims):
                if dim == "units":  # T, or N for geometry taken per sequence
                    mark(
                        present
                        & (shapes[:, column] != self._counts["num_tokens"])
                        & (shapes[:, column] != self._counts["num_sequences"]),
                        f"its {name} shape disagrees with its tokens and sequences counts",
                    )
                elif dim is not None:
                    mark(
                        present & (shapes[:, column] != self._counts[f"num_{dim}"]),
                        f"its {name} shape disagrees with its {dim} count",
                    )
            if FIELDS[name].per == "unit_pairs":
                mark(present & (shapes[:, 0] != shapes[:, 1]), f"its {name} is not square")
        for name in FIELDS:
            where = _data_dataset(name)
            if where in self._written and (starts := self._offsets_of(where)) is not None:
                mark(
                    self._present.get(name, absent) & self._unwritten(where, starts),
                    f"its {name} lies in chunks of {where} never written",
                )
        for index, why in sorted(reasons.items()):
            self._bad[index] = StepReadError("unreadable", why)
            if self._all_bad is None:
                self._load_findings.append(
                    Finding(
                        "unreadable",
                        int(self._numbers[index]),
                        self.location,
                        f"step {int(self._numbers[index])}: {why}",
                    )
                )

    def _unwritten(self, where: str, offsets: np.ndarray) -> np.ndarray:
        """Which steps' slices of data dataset `where` (by its step `offsets`) span a chunk
        never written: they hold no data (the fill value, unchecked)."""
        written = self._written.get(where)
        begin, end = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
        dataset = self._dataset(where)
        if written is None or len(written) == _chunk_count(dataset):
            return np.zeros(len(begin), dtype=bool)
        size = int(dataset.chunks[0])
        first, last = begin // size, (end - 1) // size
        held = np.searchsorted(written, last, "right") - np.searchsorted(written, first, "left")
        unwritten: np.ndarray = (end > begin) & (held != last - first + 1)
        return unwritten

    def _fields_of(self, index: int) -> set[str]:
        return {name for name, mask in self._present.items() if mask[index]}

    def _scalars_of(self, index: int) -> dict[str, float]:
        return {
            name: float(values[index])
            for name, values in self._scalar_values.items()
            if self._scalar_recorded[name][index]
        }

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def archive_version(self) -> tuple[int, int] | None:
        return self.format_version

    def close(self) -> None:
        self._open.clear()
        self._file.close()
        if self._store is not None:
            self._store.close()
        self._closed = True

    def __reduce__(self) -> tuple[Callable[..., Run], tuple[str]]:
        """Pickled as the way to open it again, from its `source` (its HDF5 file cannot be),
        as a directory's run pickles whole: a worker process given either reads the same run.
        UsageError once closed."""
        self.check_open()
        return self._reopen(), (self.source,)

    def _reopen(self) -> Callable[[str], Run]:
        """How `__reduce__` opens the run again from its `source`."""
        return partial(_archive_at, verify=self.verify)

    def check_open(self) -> None:
        """UsageError once the run is closed: its data can no longer be read (h5py would find
        no dataset in the closed file, which would read as a corrupt archive)."""
        if self._closed:
            raise UsageError(
                f"{self.location}: the run was closed (run.close(), or the end of its with "
                "block); open it again with open_run"
            )

    # -- steps ---------------------------------------------------------------------------------
    def _dataset(self, where: str) -> h5py.Dataset:
        """The data dataset `where`, opened once and kept open (its chunk cache then serves
        consecutive steps); at most one per field of the schema."""
        dataset = self._open.get(where)
        if dataset is None:
            dataset = self._open[where] = self._named_dataset(where)
        return dataset

    def _named_dataset(self, name: str) -> h5py.Dataset:
        """The dataset `name`, else InputError (`_no_dataset`)."""
        try:
            found = self._file[name]
        except KeyError:
            raise self._no_dataset(name) from None
        if not isinstance(found, h5py.Dataset):
            raise self._no_dataset(name)
        return found

    def _no_dataset(self, name: str) -> InputError:
        """The refusal of an archive without dataset `name` (missing, or a group in its place):
        h5py's own errors say "not a dataset", "message type not found", "component not found"."""
        return InputError(f"{self.location}: corrupt run archive (no dataset {name})")

    def _members(self, group: str, *, required: bool = False) -> list[str]:
        """The names in the archive's `group` (none when it has no such group and it is not
        `required`), else InputError: a dataset in a group's place would list its values."""
        found = self._file.get(group)
        if found is None and not required:
            return []
        if not isinstance(found, h5py.Group):
            raise InputError(f"{self.location}: corrupt run archive (no group {group})")
        return list(found)

    def _scalar_members(self, group: str) -> list[str]:
        """The scalar dataset names in `group`: in an archive before format 1.2, which wrote a
        name with "/" as HDF5 makes of it (groups), the paths under `group` that end in a
        dataset (or in an empty group, which then reads as the dataset it lacks)."""
        names = self._members(group)
        if not names or self.format_version >= SCALAR_ESCAPE_VERSION:
            return names
        paths: list[str] = []

        def leaf(path: str, item: h5py.Dataset | h5py.Group) -> None:
            if isinstance(item, h5py.Dataset) or not len(item):
                paths.append(path)

        self._file[group].visititems(leaf)
        return paths

    def _slice(self, where: str, index: int, begin: int, end: int) -> np.ndarray:
        """Entries [begin, end) of the data dataset `where`, step `index`'s slice; the chunks
        read are noted, or, for a dataset with per-step CRC-32s, the slice's CRC is checked
        (OSError on a mismatch, as HDF5 raises for a failed Fletcher32) and the step noted."""
        dataset = self._dataset(where)
        part: np.ndarray = dataset[begin:end]
        crcs = self._step_crcs.get(where)
        if crcs is not None:  # of the bytes as stored: before any change of byte order
            if crc32(part) != crcs[index]:
                step = int(self._numbers[index])
                raise OSError(f"{where}: step {step}'s slice fails its CRC-32")
            self._read_steps.setdefault(where, set()).add(index)
        elif end > begin and dataset.chunks:
            size = dataset.chunks[0]
            self._read_chunks.setdefault(where, set()).update(
                range(begin // size, (end - 1) // size + 1)
            )
        if not part.dtype.isnative:  # written on a machine of the other byte order
            part = part.astype(part.dtype.newbyteorder("="))
        return part

    def read_field(self, index: int, name: str) -> np.ndarray:
        """Step `index`'s array `name` from the archive (token [T], sequence [N], or ragged)."""
        if name in TOKEN_FIELDS or name in SEQUENCE_FIELDS:
            offsets = self._offsets["tokens" if name in TOKEN_FIELDS else "sequences"]
            return self._slice(_data_dataset(name), index, offsets[index], offsets[index + 1])
        offsets, shapes = self._ragged[name]
        flat = self._slice(_data_dataset(name), index, offsets[index], offsets[index + 1])
        return flat.reshape(tuple(int(d) for d in shapes[index]))

    def _verify(self, index: int) -> dict[str, np.ndarray]:
        """Reads the step's every field once (Fletcher32 checks each chunk, or `_slice` the
        step's CRC-32), or marks it bad.

        Returns what it read, so the Step hands those arrays out instead of reading them
        again ({} when the step was checked before)."""
        if index in self._verified or index in self._bad:
            return {}
        self.check_open()
        try:
            arrays = {name: self.read_field(index, name) for name in sorted(self._fields_of(index))}
        except H5_ERRORS as exc:
            self._bad[index] = self._failed_reads[index] = _unreadable(exc, self._store_failure())
            return {}
        self._verified.add(index)
        return arrays

    def _has_step(self, n: int) -> bool:
        return n in self._index_of

    def _try_step(self, n: int, *, deep: bool) -> ArchiveStep | StepReadError:
        index = self._index_of.get(n)
        if index is None:
            return StepReadError("unreadable", f"no step {n} in the archive")
        loaded = self._verify(index) if deep and self.verify else {}
        if index in self._bad:
            return self._bad[index]
        counts = {name: int(self._counts[name][index]) for name in STEP_COUNTS}
        unjoined = frozenset(name for name, flags in self._unjoined.items() if flags[index])
        omega = next((kind for kind, flags in self._omegas.items() if flags[index]), None)
        fields = self._fields_of(index)
        sketched = SKETCH_KEY in fields
        return ArchiveStep(
            step=n,
            scalars=self._scalars_of(index),
            fields=fields,
            num_tokens=counts["num_tokens"],
            num_sequences=counts["num_sequences"],
            num_scored_tokens=counts["num_scored_tokens"],
            unjoined=unjoined,
            unjoined_why=unjoined_kind(unjoined, omega=omega),
            sketch_width=int(self._ragged[SKETCH_KEY][1][index][1]) if sketched else None,
            rank_sequences=self._ranks_of(index),
            archive=self,
            index=index,
            loaded=loaded,
        )

    def _ranks_of(self, index: int) -> tuple[int, ...]:
        """`Step.rank_sequences` of the step at `index`: () without the table, or for a step
        without a batch."""
        if self._rank_sequences is None or not self._rank_sequences[index].any():
            return ()
        return tuple(int(n) for n in self._rank_sequences[index])

    @property
    def step_numbers(self) -> list[int]:
        return [int(n) for i, n in enumerate(self._numbers) if i not in self._bad]

    def scalar_series_many(self, names: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """From the scalar datasets (no per-step objects)."""
        readable = np.ones(len(self._numbers), dtype=bool)
        readable[list(self._bad)] = False
        result = {}
        for name in scalar_names(names):
            if name not in self._scalar_values:
                result[name] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
                continue
            keep = readable & self._scalar_recorded[name]
            result[name] = (
                self._numbers[keep].astype(np.int64),
                self._scalar_values[name][keep].astype(np.float64),
            )
        return result

    # -- integrity -----------------------------------------------------------------------------
    def _check_all_chunks(self) -> list[Finding]:
        """Reads every chunk of every dataset that was not read already (an index or text read
        whole at opening, a chunk a step's read decoded); a bad one marks the steps whose data
        it holds (a dataset that cannot even be opened or listed: every step it holds). A
        dataset with per-step CRC-32s is read step slice by step slice (`_check_steps`)."""
        findings = []
        for name in self._datasets:
            if name in self._read_whole:
                continue
            if name in self._step_crcs:
                findings.extend(self._check_steps(name))
                continue
            read = self._read_chunks.get(name, set())
            try:
                dataset = self._file[name]
                if name in self._written:
                    chunks = _unread_chunks(dataset, self._written[name], read)
                elif read and len(read) == _chunk_count(dataset):
                    continue
                else:
                    chunks = _chunks_to_check(dataset)
            except H5_ERRORS as exc:
                findings.extend(self._bad_chunk(name, (slice(0, None),), exc))
                continue
            for chunk in chunks:
                if read and chunk[0].start // dataset.chunks[0] in read:
                    continue
                try:
                    dataset[chunk]
                except H5_ERRORS as exc:
                    findings.extend(self._bad_chunk(name, chunk, exc))
        return findings

    def _check_steps(self, name: str) -> list[Finding]:
        """Reads each step's slice of data dataset `name` (which has per-step CRC-32s) that no
        read has checked yet, its CRC checked by `_slice`; a bad one marks its step. A slice
        out of the dataset's range is left alone: `_mark_inconsistent_steps` marked its step."""
        offsets = self._offsets_of(name)
        if offsets is None:
            return []
        read, length = self._read_steps.get(name, set()), self._dataset(name).shape[0]
        unwritten = self._unwritten(name, offsets)  # a step's is marked, another's holds none
        findings = []
        for index in range(len(self._numbers)):
            begin, end = int(offsets[index]), int(offsets[index + 1])
            if index in read or unwritten[index] or not 0 <= begin <= end <= length:
                continue
            try:
                self._slice(name, index, begin, end)
            except H5_ERRORS as exc:
                findings.extend(self._bad_steps(name, [index], "a corrupt step slice", exc))
        return findings

    def _bad_chunk(self, name: str, chunk: tuple[slice, ...], exc: BaseException) -> list[Finding]:
        """Marks the steps whose data `chunk` of dataset `name` holds; their findings."""
        return self._bad_steps(name, self._steps_of_chunk(name, chunk), "a corrupt chunk", exc)

    def _bad_steps(self, name: str, hit: list[int], what: str, exc: BaseException) -> list[Finding]:
        """Marks steps `hit` (indexes), whose data in dataset `name` is bad; a finding for
        each (`step N: ...`, as a step file's), or one of no step when `hit` is empty."""
        failure = self._store_failure()
        said = f"{what}: {exc}"
        if failure is not None:
            said = f"unreadable: {failure}"
        path = f"{self.location}:{name}"
        if not hit:
            return [Finding("unreadable", None, path, f"archive dataset {name} ({said})")]
        findings = []
        for index in hit:
            self._bad.setdefault(index, _unreadable(exc, failure))
            self._failed_reads.pop(index, None)
            step = int(self._numbers[index])
            message = f"step {step}: archive dataset {name}: {said}"
            findings.append(Finding("unreadable", step, path, message))
        return findings

    def _offsets_of(self, name: str) -> np.ndarray | None:
        """The step offsets [S+1] into data dataset `name`, or None (not a data dataset)."""
        parts = name.split("/")
        if len(parts) < 2 or parts[-1] in ("step_offsets", "shape"):
            return None
        if parts[0] in ("tokens", "sequences"):
            return self._offsets[parts[0]]
        if parts[0] == "ragged" and parts[-1] == "data" and parts[1] in self._ragged:
            return self._ragged[parts[1]][0]
        return None

    def _steps_of_chunk(self, name: str, chunk: tuple[slice, ...]) -> list[int]:
        offsets = self._offsets_of(name)
        if not chunk or offsets is None:
            return []
        start = chunk[0].start or 0
        stop = np.iinfo(np.int64).max if chunk[0].stop is None else chunk[0].stop
        return [
            i for i in range(len(self._numbers)) if offsets[i] < stop and offsets[i + 1] > start
        ]

    def checks(self) -> _ArchiveChecks | None:
        if self._key is None:
            return None
        return _ArchiveChecks(
            self._key,
            {name: frozenset(chunks) for name, chunks in self._read_chunks.items()},
            {name: frozenset(steps) for name, steps in self._read_steps.items()},
        )

    def adopt_checks(self, checks: object) -> None:
        """The chunks and step slices another reader of this same archive (`key`) read and
        found sound: the integrity check does not read them again."""
        if not isinstance(checks, _ArchiveChecks) or checks.key != self._key:
            return
        for name, chunks in checks.chunks.items():
            self._read_chunks.setdefault(name, set()).update(chunks)
        for name, steps in checks.steps.items():
            self._read_steps.setdefault(name, set()).update(steps)

    def header_findings(self) -> list[Finding]:
        """The source run's findings as packed and those of the archive's indexes and texts
        (read when it was opened): no data chunk is read."""
        return [*self._carried, *self._load_findings]

    def _failed_read_findings(self) -> list[Finding]:
        """A finding for each step a read marked bad that no finding of the integrity check
        names: a read the store failed, which the check's own read then passed, still skipped
        it."""
        findings = []
        for index, bad in sorted(self._failed_reads.items()):
            step = int(self._numbers[index])
            findings.append(Finding(bad.kind, step, self.location, f"step {step}: {bad}"))
        return findings

    @property
    def integrity(self) -> IntegrityReport:
        """The source run's findings as packed, plus any corrupt chunk of the archive itself."""
        if not self._checked_all:
            self.check_open()
            self._archive_findings = self._check_all_chunks()
            self._checked_all = True
        findings = [*self._carried, *self._load_findings, *self._archive_findings]
        findings += self._failed_read_findings()
        findings.sort(key=lambda f: (f.step if f.step is not None else -1, f.kind))
        return IntegrityReport(findings)
