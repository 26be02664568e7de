"""`ArchiveRun`: a run packed into one HDF5 file (layout in `_layout`), read with the Run API.

Steps are read lazily: indexing a Step reads its slice of one dataset. Checksums catch corrupt
bytes on every read: HDF5's Fletcher32 of each chunk, or, for a dataset written without it, the
CRC-32 of each step's slice (`checksums/`); `integrity` reads every chunk (or step slice) once
and reports the steps that a bad one touches, and those steps are skipped with a warning, as a
corrupt step file of a run directory is. Archives without the 1.1 fields (micro_batch,
group_split) read as before: their steps simply lack those fields.

Its file is opened and checked by `_archive_file`, its index read by `_archive_index`, and the
steps the index contradicts marked by `_archive_marks`: this module reads the steps, and the
integrity check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from stabledrl_cli.dump._archive_checks import H5_ERRORS, named
from stabledrl_cli.dump._archive_chunks import chunk_count, chunks_to_check, unread_chunks
from stabledrl_cli.dump._archive_index import data_dataset
from stabledrl_cli.dump._archive_marks import ArchiveMarks
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._integrity import Finding, IntegrityReport, StepReadError
from stabledrl_cli.dump._layout import SEQUENCE_FIELDS, STEP_COUNTS, TOKEN_FIELDS
from stabledrl_cli.dump._run import Run, scalar_names
from stabledrl_cli.dump._schema import SKETCH_KEY
from stabledrl_cli.dump._step import Step, unjoined_kind
from stabledrl_cli.dump._stfile import FileKey
from stabledrl_cli.errors import InputError


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


class ArchiveRun(ArchiveMarks):
    """A run packed by `stabledrl pack` into one HDF5 file (layout in `_layout`)."""

    def _load(self) -> None:
        """The index (`ArchiveMarks`), then what the reads of steps note (none yet)."""
        super()._load()
        self._failed_reads: dict[int, StepReadError] = {}
        """The steps of `_bad` a step's read marked, that no finding names (yet)."""
        self._verified: set[int] = set()
        self._checked_all = False
        self._read_chunks: dict[str, set[int]] = {}
        """Per data dataset, the chunks a step's read has decoded (their Fletcher32 checked):
        the integrity check does not read them again."""
        self._read_steps: dict[str, set[int]] = {}
        """Per data dataset with per-step CRC-32s, the steps whose slice a read has checked."""
        self._chunk_widths: dict[str, int] = {}

    def __reduce__(self) -> tuple[Callable[..., Run], tuple[str]]:
        """Pickled as the way to open it again, from its `source` (its HDF5 file cannot be),
        as a directory's run pickles whole: a worker process given either reads the same run.
        UsageError once closed."""
        self.check_open()
        return self._reopen(), (self.source,)

    def _reopen(self) -> Callable[[str], Run]:
        """How `__reduce__` opens the run again from its `source`."""
        return partial(_archive_at, verify=self.verify)

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
        elif end > begin and (size := self._chunk_width(where)):
            self._read_chunks.setdefault(where, set()).update(
                range(begin // size, (end - 1) // size + 1)
            )
        if not part.dtype.isnative:  # written on a machine of the other byte order
            part = part.astype(part.dtype.newbyteorder("="))
        return part

    def _chunk_width(self, where: str) -> int:
        """Entries a chunk of data dataset `where` holds (0: not chunked), asked of h5py once
        (it reads the dataset's creation properties at each ask: a tenth of a step's read)."""
        width = self._chunk_widths.get(where)
        if width is None:
            chunks = self._dataset(where).chunks
            width = self._chunk_widths[where] = int(chunks[0]) if chunks else 0
        return width

    def read_field(self, index: int, name: str) -> np.ndarray:
        """Step `index`'s array `name` from the archive (token [T], sequence [N], or ragged)."""
        if name in TOKEN_FIELDS or name in SEQUENCE_FIELDS:
            offsets = self._offsets["tokens" if name in TOKEN_FIELDS else "sequences"]
            return self._slice(data_dataset(name), index, offsets[index], offsets[index + 1])
        offsets, shapes = self._ragged[name]
        flat = self._slice(data_dataset(name), index, offsets[index], offsets[index + 1])
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

    def _check_all_chunks(self) -> list[Finding]:
        """Reads every chunk of every dataset that was not read already (an index or text read
        whole at opening, a chunk a step's read decoded); a bad one marks the steps whose data
        it holds (a dataset that cannot even be opened or listed: every step it holds; a data
        dataset whose chunk index cannot be walked is not read: opening marked its steps). A
        dataset with per-step CRC-32s is read step slice by step slice (`_check_steps`)."""
        findings = []
        for name in self._datasets:
            if name in self._read_whole or name in self._unindexed:
                continue
            if name in self._step_crcs:
                findings.extend(self._check_steps(name))
                continue
            read = self._read_chunks.get(name, set())
            try:
                dataset = self._file[name]
                if name in self._written:
                    chunks = unread_chunks(dataset, self._written[name], read)
                elif read and len(read) == chunk_count(dataset):
                    continue
                else:
                    width = self._chunk_width(name) if read else 0
                    chunks = [
                        chunk
                        for chunk in chunks_to_check(dataset)
                        if not width or chunk[0].start // width not in read
                    ]
            except H5_ERRORS as exc:
                findings.extend(self._bad_chunk(name, (slice(0, None),), exc))
                continue
            for chunk in chunks:
                try:
                    dataset[chunk]
                except H5_ERRORS as exc:
                    findings.extend(self._bad_chunk(name, chunk, exc))
        return findings

    def _check_steps(self, name: str) -> list[Finding]:
        """Reads each step's slice of data dataset `name` (which has per-step CRC-32s) that
        holds data there (`_holds`) and that no read has checked yet, its CRC checked by
        `_slice`; a bad one marks its step. A slice out of the dataset's range, or in chunks
        never written, is left alone: `_mark_inconsistent_steps` marked its step."""
        offsets = self._offsets_of(name)
        if offsets is None:
            return []
        read, length = self._read_steps.get(name, set()), self._dataset(name).shape[0]
        wanted = self._holds(name, offsets) & ~self._unwritten(name, offsets)
        findings = []
        for index in np.flatnonzero(wanted).tolist():
            begin, end = int(offsets[index]), int(offsets[index + 1])
            if index in read or not 0 <= begin <= end <= length:
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
        name = named(name)
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

    def _steps_of_chunk(self, name: str, chunk: tuple[slice, ...]) -> list[int]:
        """The indexes of the steps that hold data in data dataset `name` (`_holds`) whose
        slice overlaps `chunk`."""
        offsets = self._offsets_of(name)
        if not chunk or offsets is None:
            return []
        start = chunk[0].start or 0
        stop = np.iinfo(np.int64).max if chunk[0].stop is None else chunk[0].stop
        overlaps = (offsets[:-1] < stop) & (offsets[1:] > start)
        held: list[int] = np.flatnonzero(self._holds(name, offsets) & overlaps).tolist()
        return held

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
