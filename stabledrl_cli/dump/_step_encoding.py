"""Encoding and writing a step file: `encode_step` lays a step's tensors and metadata out
as safetensors' own writer does (the same bytes as `safetensors.numpy.save` plus the two
CRCs of `_stfile`), its data written straight from the arrays.

A step file is written by `write_step` through the tool's one atomic writer, under a temporary
name (`.step-....safetensors.tmp-PID`) that readers of a live run recognise as in flight.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import numpy as np

from stabledrl_cli._atomic import fsync_dir, make_durable, write_durably
from stabledrl_cli._json import json_items
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._file_names import temp_file_name
from stabledrl_cli.dump._schema import META_CRC_DATA, META_CRC_HEADER
from stabledrl_cli.dump._stfile import (
    HEADER_ITEM_LIMIT,
    HEADER_JSON,
    HEADER_LIMIT,
    METADATA_KEY,
    canonical_crc,
)
from stabledrl_cli.errors import UsageError

_DTYPE_CODES = {
    ("b", 1): "BOOL", ("u", 1): "U8", ("i", 1): "I8", ("i", 2): "I16", ("u", 2): "U16",
    ("f", 2): "F16", ("i", 4): "I32", ("u", 4): "U32", ("f", 4): "F32", ("f", 8): "F64",
    ("i", 8): "I64", ("u", 8): "U64",
}  # fmt: skip
"""numpy dtypes (kind, width) -> safetensors dtypes (the ones a step file can hold)."""
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")  # fmt: skip
"""safetensors' own dtype order: its writer lays tensors out from the last of these (widest)
to the first, by name within a dtype, so each tensor's bytes are aligned to its width."""
_DTYPE_RANK = {code: rank for rank, code in enumerate(_DTYPE_ORDER)}
_LITTLE_ENDIAN = {"<", "|"} | ({"="} if sys.byteorder == "little" else set())
"""numpy's byte-order marks of data already stored little-endian, as safetensors stores it."""


def encode_step(
    tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> list[bytes | memoryview]:
    """The file's bytes as parts: length, header, then each tensor's bytes, laid out as
    safetensors' own writer does (the same bytes as `safetensors.numpy.save` plus the CRCs).

    The tensors' parts are views of the arrays (nothing is copied): write them before the
    arrays change."""
    layout = _layout(tuple([(name, array.dtype, array.shape) for name, array in tensors.items()]))
    data: list[bytes | memoryview] = []
    crc = 0
    for name, swapped in layout.order:
        array = tensors[name]
        if swapped:
            array = array.astype(array.dtype.newbyteorder("<"))
        stored = np.ascontiguousarray(array)
        part = (stored if stored.ndim == 1 else stored.reshape(-1)).data.cast("B")
        crc = crc32(part, crc)
        data.append(part)
    meta = dict(metadata)
    meta[META_CRC_DATA] = data_crc = f"{crc:08x}"
    meta[META_CRC_HEADER] = _PLACEHOLDER
    text = layout.head + HEADER_JSON.encode(meta) + layout.tail
    encoded = _with_header_crc(text, data_crc).encode()  # stable bytes
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    if len(encoded) > HEADER_LIMIT:  # every reader would refuse the step as unreadable
        raise UsageError(
            f"the step's header of {len(encoded)} bytes is larger than {HEADER_LIMIT} bytes, "
            "the most its readers read: record fewer or shorter scalar names"
        )
    if (items := json_items(encoded)) > HEADER_ITEM_LIMIT:
        raise UsageError(
            f"the step's header holds {items:,} JSON items (commas and brackets counted), "
            f"more than the {HEADER_ITEM_LIMIT:,} its readers read: record fewer scalars or "
            "names with fewer commas and brackets"
        )
    return [struct.pack("<Q", len(encoded)), encoded, *data]


_FileLayoutKey = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]
"""Each tensor's (name, dtype, shape), in the caller's order."""


@dataclass(frozen=True)
class _FileLayout:
    """What a step file's layout owes to its tensors' names, dtypes and shapes alone, so that
    steps of one shape share it: the tensors' order in the file and the header's JSON around
    its metadata object (each tensor's dtype, shape and data offsets)."""

    order: tuple[tuple[str, bool], ...]
    """(name, stored as its little-endian copy) of each tensor, in file order."""
    head: str
    """The header's JSON up to its metadata object: the entries that sort before it."""
    tail: str
    """The header's JSON after its metadata object."""


_LAYOUTS: dict[_FileLayoutKey, _FileLayout] = {}
_LAYOUTS_KEPT = 64
"""Layouts kept for reuse (a run whose step shapes all differ clears them now and then)."""


def _layout(key: _FileLayoutKey) -> _FileLayout:
    """The layout of tensors of `key`'s names, dtypes and shapes (made once, then reused)."""
    layout = _LAYOUTS.get(key)
    if layout is None:
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.clear()
        layout = _LAYOUTS[key] = _new_layout(key)
    return layout


def _new_layout(key: _FileLayoutKey) -> _FileLayout:
    entries = []
    for name, dtype, shape in key:
        code = _DTYPE_CODES.get((dtype.kind, dtype.itemsize))
        if code is None:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored")
        if name == METADATA_KEY:
            raise ValueError(f"{name}: the header's metadata has this name, a tensor cannot")
        entries.append((-_DTYPE_RANK[code], name, code, shape, dtype))
    entries.sort(key=lambda entry: entry[:2])
    pieces: dict[str, str] = {}
    order = []
    position = 0
    for _, name, code, shape, dtype in entries:
        end = position + math.prod(shape) * dtype.itemsize
        entry = {"dtype": code, "shape": list(shape), "data_offsets": [position, end]}
        pieces[name] = f"{HEADER_JSON.encode(name)}:{HEADER_JSON.encode(entry)}"
        order.append((name, dtype.byteorder not in _LITTLE_ENDIAN))
        position = end
    names = sorted([*pieces, METADATA_KEY])  # the header's keys in its JSON's (sorted) order
    at = names.index(METADATA_KEY)
    head = "{" + "".join(pieces[name] + "," for name in names[:at]) + f'"{METADATA_KEY}":'
    tail = "".join("," + pieces[name] for name in names[at + 1 :]) + "}"
    return _FileLayout(order=tuple(order), head=head, tail=tail)


_PLACEHOLDER = "0" * 8
"""The header CRC's place in the header's JSON until it is known (as wide as a CRC)."""


def _with_header_crc(text: str, data_crc: str) -> str:
    """`text`, the header's JSON with `_PLACEHOLDER` as its CRC (and `data_crc` as the data's),
    with the header CRC in its place.

    The CRC covers the JSON without the keys that start with "_crc32" (`canonical_crc`).
    When the two CRC keys are the only such keys (the text holds `"_crc32` twice: a step's own
    metadata has no other), sorted they are adjacent, and found once in `text` they are cut
    out of it instead of encoding the header a second time.
    """
    entries = f'"{META_CRC_DATA}":"{data_crc}","{META_CRC_HEADER}":"{_PLACEHOLDER}"'
    if text.count('"_crc32') != 2 or text.count(entries) != 1:
        header = json.loads(text)  # the same JSON again, from the same canonical encoder
        header[METADATA_KEY][META_CRC_HEADER] = canonical_crc(header)
        return HEADER_JSON.encode(header)
    start = text.index(entries)
    end = start + len(entries)
    if text[end] == ",":
        canonical = text[:start] + text[end + 1 :]
    elif text[start - 1] == ",":
        canonical = text[: start - 1] + text[end:]
    else:  # the metadata holds nothing else
        canonical = text[:start] + text[end:]
    header_crc = f"{crc32(canonical.encode()):08x}"
    return text[: end - 1 - len(_PLACEHOLDER)] + header_crc + text[end - 1 :]


def write_step(
    directory: str, name: str, parts: list[bytes | memoryview], *, durable: bool = True
) -> None:
    """Writes step file `name` into `directory` atomically and durably (with `durable` False
    under its name, whole, not yet fsynced: `make_step_durable`); WriteError naming it if that
    fails."""
    write_durably(
        f"{directory}{os.sep}{name}",
        f"{directory}{os.sep}{temp_file_name(name, os.getpid())}",
        directory,
        parts,
        durable=durable,
    )


def make_step_durable(directory: str, name: str) -> None:
    """Fsyncs step file `name` of `directory` and the directory (`write_step(...,
    durable=False)` wrote it); WriteError naming it if that fails."""
    make_durable(f"{directory}{os.sep}{name}", directory)


def discard_step(directory: str, name: str) -> None:
    """Removes step file `name` from `directory`, durably, as far as the system lets it (a
    directory that refused a write may refuse this too)."""
    with suppress(OSError):
        os.unlink(f"{directory}{os.sep}{name}")
        fsync_dir(directory)
