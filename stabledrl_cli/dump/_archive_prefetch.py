"""What the probe's child reads for the reader besides its checks, handed over as data.

Before its first step, an archive's reader reads the root attributes `kind` and
`format_version`, the texts `manifest` and `integrity`, and every index dataset whole
(`_archive_checks.is_index`), each text and index with its checksum attribute. The probe's
child has the file open and every object's attributes parsed by then, so it reads these as well
(`Prefetch`) and hands them back with its report: a JSON header naming each array's dtype and
shape, then the arrays' bytes (`encode`, `decode`). The reader takes each value from there
instead of reading it again, and checks it exactly as it checks its own reads (the checksums are
compared in its process). What the child did not hand over, the reader reads itself: values past
`PREFETCH_LIMIT` bytes in all, a value of a type the reader would refuse, a read that failed in
the child. Nothing here is trusted beyond being data: `decode` accepts numeric arrays whose
sizes add up, and strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from stabledrl_cli._json import NotUtf8
from stabledrl_cli.dump._archive_checks import CRC_ATTR, H5_ERRORS, TEXT_DATASETS, is_index
from stabledrl_cli.dump._layout import decode, decode_json_text

PREFETCH_LIMIT = 64 << 20
"""Bytes of index arrays and texts the child hands over (an honest archive of 10,000 steps
and 100 scalars has about 10 MB of them)."""
ROOT_ATTRIBUTES = ("kind", "format_version")


@dataclass
class Prefetched:
    """Values the reader would read, as the child read them (each taken once, by `pop`)."""

    root: dict[str, str | None] = field(default_factory=dict)
    """Root attributes by name, as `decode` gives them (None: absent)."""
    texts: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Text dataset -> (its text, its checksum attribute or None)."""
    arrays: dict[str, tuple[np.ndarray, str | None]] = field(default_factory=dict)
    """Index dataset -> (its values, its checksum attribute or None)."""


def _is_text_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _text_or_none(value: Any) -> tuple[bool, str | None]:
    """(whether `value` decodes to a str or None, that value)."""
    value = decode(value)
    return _is_text_or_none(value), value


class Prefetch:
    """The child's collector: `walk_objects` hands it each checked dataset (`dataset`), the
    child its root attributes (`root`) and texts (`text`)."""

    def __init__(self, limit: int = PREFETCH_LIMIT) -> None:
        self.found = Prefetched()
        self._checksums: dict[str, str | None] = {}
        self._left = limit

    def root(self, attrs: dict[str, Any]) -> None:
        for name in ROOT_ATTRIBUTES:
            usable, value = _text_or_none(attrs.get(name))
            if usable:
                self.found.root[name] = value

    def dataset(self, name: str, dataset: h5py.h5d.DatasetID, attrs: dict[str, Any]) -> None:
        usable, checksum = _text_or_none(attrs.get(CRC_ATTR))
        if not usable:
            return
        if name in TEXT_DATASETS:
            self._checksums[name] = checksum
            return
        nbytes = math.prod(dataset.shape) * dataset.dtype.itemsize
        if not is_index(name) or nbytes > self._left:
            return
        values = np.empty(dataset.shape, dataset.dtype)
        try:
            dataset.read(h5py.h5s.ALL, h5py.h5s.ALL, values)
        except H5_ERRORS:
            return  # the reader reads it, and meets the error itself
        self._left -= nbytes
        self.found.arrays[name] = (values, checksum)

    def text(self, name: str, value: Any) -> None:
        try:
            text = decode_json_text(value)
        except NotUtf8:
            return  # the reader reads it, and refuses it itself
        if name in self._checksums and isinstance(text, str) and len(text) <= self._left:
            self._left -= len(text)
            self.found.texts[name] = (text, self._checksums[name])

    def encode(self) -> tuple[dict[str, Any], bytes]:
        """The header's entry (JSON) and the arrays' bytes, in the header's order."""
        arrays = self.found.arrays
        header = {
            "root": self.found.root,
            "texts": {name: list(pair) for name, pair in self.found.texts.items()},
            "arrays": [
                [name, values.dtype.str, list(values.shape), checksum]
                for name, (values, checksum) in arrays.items()
            ],
        }
        return header, b"".join(values.tobytes() for values, _ in arrays.values())


def decode_prefetched(header: Any, payload: bytes) -> Prefetched:
    """`Prefetch.encode`'s output read back; an empty `Prefetched` where it is not that shape
    (the reader then reads every value itself)."""
    try:
        return _decode(header, payload)
    except (TypeError, ValueError, KeyError):
        return Prefetched()


def _decode(header: dict[str, Any], payload: bytes) -> Prefetched:
    found = Prefetched()
    for name, value in header["root"].items():
        if name in ROOT_ATTRIBUTES and _is_text_or_none(value):
            found.root[name] = value
    for name, (text, checksum) in header["texts"].items():
        if name in TEXT_DATASETS and isinstance(text, str) and _is_text_or_none(checksum):
            found.texts[name] = (text, checksum)
    offset, buffer = 0, bytearray(payload)
    for name, dtype_text, shape, checksum in header["arrays"]:
        dtype = np.dtype(dtype_text)
        if (
            dtype.kind not in "biuf"
            or not all(type(n) is int and n >= 0 for n in shape)
            or not (isinstance(name, str) and is_index(name) and _is_text_or_none(checksum))
        ):
            raise ValueError(name)
        count = math.prod(shape)
        if count:
            values = np.frombuffer(buffer, dtype, count, offset).reshape(shape)
        else:
            values = np.empty(shape, dtype)
        offset += count * dtype.itemsize
        found.arrays[name] = (values, checksum)
    if offset != len(buffer):
        raise ValueError("payload")
    return found
