"""What a data dataset's HDF5 chunk index says: which chunks were ever written (pack leaves
unwritten the chunks of steps without the field), and the selections the integrity check reads
(`_archive_reader`). Walked once an archive, when it is opened (`_archive_index`)."""

from __future__ import annotations

import h5py
import numpy as np

from stabledrl_cli.dump._archive_checks import counted_unwritten, stored_chunks


def chunk_count(dataset: h5py.Dataset) -> int | None:
    """Chunks of a chunked one-dimensional dataset (None for any other)."""
    if dataset.chunks is None or dataset.ndim != 1:
        return None
    return -(-int(dataset.shape[0]) // int(dataset.chunks[0]))


def written_chunks(dataset: h5py.Dataset) -> np.ndarray | None:
    """The indexes of a chunked one-dimensional dataset's written chunks, ascending: all of
    them, or, when it has chunks never written (pack leaves unwritten the chunks of steps
    without the field), those its chunk index lists; None for any other dataset. An h5py
    error when its chunk index cannot be walked, or counted in a file too small to hold the
    chunks its shape declares (`counted_unwritten`): they are then not listed (a crafted
    48 KB archive declares 54 million)."""
    count = chunk_count(dataset)
    if count is None:
        return None
    if not counted_unwritten(dataset.id):
        return np.arange(count, dtype=np.int64)
    size = int(dataset.chunks[0])
    found: list[int] = []
    stored_chunks(dataset.id, lambda info: found.append(info.chunk_offset[0] // size))
    return np.sort(np.array(found, dtype=np.int64))


def chunks_to_check(dataset: h5py.Dataset) -> list[tuple[slice, ...]]:
    """The selections the integrity check reads of a dataset not read whole: each written
    chunk (one never written holds no data, and costs libhdf5 kilobytes to read), or the
    whole of an unchunked one; an h5py error as `written_chunks` raises it."""
    if not dataset.chunks:
        return [()]
    if not counted_unwritten(dataset.id):
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


def unread_chunks(
    dataset: h5py.Dataset, written: np.ndarray, read: set[int]
) -> list[tuple[slice, ...]]:
    """The selections of the `written` chunks (`written_chunks`) of a chunked one-dimensional
    dataset that are not among those `read`."""
    size, length = int(dataset.chunks[0]), int(dataset.shape[0])
    unread = written[~np.isin(written, np.fromiter(read, np.int64, len(read)))]
    return [(slice(at, min(at + size, length)),) for at in (unread * size).tolist()]
