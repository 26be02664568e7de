"""`ArchiveFile`: a packed run's HDF5 file opened and vouched for before its index is read.

It is read only once `_archive_probe`'s child has run `_archive_checks` on it; then its root
names a run of a readable version, and its JSON texts and index datasets are read whole, each
checked against its CRC-32 (a mismatch refuses the manifest, and marks every step bad for an
index). What the archive holds is read by `_archive_index`, its steps by `_archive_reader`.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stabledrl_cli._json import NotUtf8
from stabledrl_cli.dump._archive_checks import (
    CRC_ATTR,
    H5_ERRORS,
    attributes,
    check_attributes,
    crc_matches,
    held_bytes,
    index_crc,
    index_type,
    named,
)
from stabledrl_cli.dump._archive_probe import names_a_run, probe
from stabledrl_cli.dump._integrity import Finding
from stabledrl_cli.dump._layout import (
    ARCHIVE_MAJOR,
    REPLAY_REPORT_KIND,
    SCALAR_ESCAPE_VERSION,
    decode,
    decode_json_text,
)
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._stfile import FileKey, file_key
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.dump._versions import RUN_KIND, NotARun, check_readable_version
from stabledrl_cli.errors import InputError, UsageError, quoted

# Each open dataset's chunk cache: steps are read in order, so consecutive steps share at most
# the chunk on their boundary (up to 256 KiB: `_pack_column`); 1 MiB holds it with room to
# spare. 8 MiB was no faster on any benchmark run and cost 45-60 MB of peak memory.
_CHUNK_CACHE_BYTES = 1 << 20


class ArchiveFile(Run):
    """A packed run's HDF5 file, opened and checked (module docstring)."""

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
        self._load_findings: list[Finding] = []
        self._checksummed = False
        self._all_bad: str | None = None
        """Why every step is bad (an index checksum failed), if one is."""
        self._open: dict[str, h5py.Dataset] = {}
        self._closed = False
        self._read_whole: set[str] = set()
        """The index and text datasets read whole when the archive was opened: the integrity
        check does not read them again either."""
        where = self.location
        try:
            if size is None:
                stat = os.stat(path)
                size, key = held_bytes(stat), file_key(stat)
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

    @abstractmethod
    def _load(self) -> None:
        """Reads and checks what the archive holds (`_archive_index`), once its kind and version
        are known; InputError refuses it."""

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
            raise NotARun(
                f"{location} is a replay report, not a run (read it with "
                "stabledrl_cli.replay.hdf5.read_hdf5: docs/replay-json.md)"
            )
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

    def _require_type(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...], dtypes: tuple[str, ...], ndim: int
    ) -> None:
        """InputError (the archive refused) unless dataset `name` (of `dtype` and `shape`) has
        `ndim` dimensions and one of `dtypes`, in either byte order: a dataset of another type
        is not pack's, and reading it as one would convert its values (a step number 1.5 read
        as 1, 2**63 as a negative one)."""
        if len(shape) != ndim or dtype.newbyteorder("=") not in [np.dtype(d) for d in dtypes]:
            raise InputError(
                f"{self.location}: corrupt run archive ({named(name)} is {dtype.name} "
                f"{list(shape)}, expected a {ndim}-D {' or '.join(dtypes)} array)"
            )

    @property
    def archive_version(self) -> tuple[int, int] | None:
        return self.format_version

    def close(self) -> None:
        self._open.clear()
        self._file.close()
        if self._store is not None:
            self._store.close()
        self._closed = True

    def check_open(self) -> None:
        """UsageError once the run is closed: its data can no longer be read (h5py would find
        no dataset in the closed file, which would read as a corrupt archive)."""
        if self._closed:
            raise UsageError(
                f"{self.location}: the run was closed (run.close(), or the end of its with "
                "block); open it again with open_run"
            )

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
