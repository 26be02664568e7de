"""`Column`: a growing 1-D data dataset of an archive, with its HDF5 filters and chunk size."""

from __future__ import annotations

import zlib
from itertools import pairwise
from typing import Any

import h5py
import numpy as np

from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._layout import CHUNK_ELEMENTS, FILTERS
from stabledrl_cli.errors import InputError
from stabledrl_cli.vocab import PackCompression


def column_filters(compression: PackCompression, first: np.ndarray) -> dict[str, Any]:
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


class Column:
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
