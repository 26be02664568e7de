"""One step file: safetensors bytes with two CRC32s, checked on read (`read_header`,
`parse_header`).

safetensors has no checksum, so a flipped bit in the data would be read back silently. The
writer adds two to the metadata: `_crc32_header` over the canonical header JSON (without the
two CRC keys: `canonical_crc`), so scalars can be read and trusted from the header alone, and
`_crc32_data` over the data buffer. How a step file is encoded and written atomically is
`_step_encoding`'s.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stabledrl_cli._json import NotUtf8, has_lone_surrogate, json_items, utf8_text
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._schema import MAX_METADATA, MAX_TENSORS, META_CRC_DATA, META_CRC_HEADER
from stabledrl_cli.errors import counted, quoted, shown

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the header size
HEADER_ITEM_LIMIT = 1_000_000
"""The most JSON items a step header may hold, counted before it is parsed (`json_items`): a
real header holds at most about 30,000 (MAX_METADATA entries, MAX_TENSORS of a few items
each), while 100 MB of crafted small items (`[[],[],...]`) would parse into 2.6 GB."""


_CHUNK = 1 << 22


HEADER_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
"""The header's one JSON form (sorted keys, no spaces, ASCII): as written, and as its CRC
covers it (without the two CRC keys). One encoder, built once, for every header."""


def canonical_crc(header: dict[str, Any]) -> str:
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if not k.startswith("_crc32")}
    text = HEADER_JSON.encode(dict(header, __metadata__=meta))
    return f"{crc32(text.encode()):08x}"


METADATA_KEY = "__metadata__"


FileKey = tuple[int, int, int]
"""What changes when a file does: (inode, size, mtime in ns) of a local file; a step file
replaced or rewritten gets another key."""


def file_key(st: os.stat_result) -> FileKey:
    """The key of a local file from its stat."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class StepHeader:
    """What a step file's header says: tensor dtypes and shapes, and the metadata strings;
    with `keep_data`, the data buffer too (read in the same open)."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    data_start: int
    data_len: int
    offsets: dict[str, int] = field(default_factory=dict)
    """Each tensor's first byte within the data buffer."""
    key: FileKey = (0, 0, 0)
    """The file's key when it was read (`read_header`: of the open file; else the storage's)."""
    header_crc: int = 0
    """CRC32 of the header's bytes as read (`parse_header`'s `known`)."""
    data: bytearray | None = None
    """The data buffer (`data_len` bytes), when read with `keep_data`."""

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` of the kept data buffer as a numpy array (a view when aligned)."""
        assert self.data is not None
        dtype_name, shape = self.tensors[name]
        dtype = np.dtype(_NUMPY_DTYPES[dtype_name]).newbyteorder("<")
        begin = self.offsets[name]
        array = np.frombuffer(self.data, dtype=dtype, count=math.prod(shape), offset=begin)
        if begin % dtype.itemsize:
            array = array.copy()  # torch wants aligned memory
        return array.reshape(shape)


DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
"""safetensors' dtypes and their widths; any other dtype (a byte string, say) is unreadable."""
_NUMPY_DTYPES = {
    "U8": "u1", "I8": "i1", "I16": "i2", "U16": "u2", "F16": "f2", "I32": "i4",
    "U32": "u4", "F32": "f4", "I64": "i8", "U64": "u8", "F64": "f8", "BOOL": "?",
}  # fmt: skip
"""The safetensors dtypes numpy reads (the schema's fields use some of them)."""


_Layout = tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, int], int]
"""Each tensor's (dtype, shape), its first byte, and the data length they cover."""


def _shape_bytes(shape: list[int], width: int, most: int) -> int | None:
    """The bytes of a tensor of `shape` whose elements take `width` bytes, or None when they
    are more than `most`. The product stops there: a crafted shape of a million dimensions of
    2**62 each (20 MB of header) would take hours to multiply out, each product longer than
    the last."""
    if 0 in shape:
        return 0
    total = width
    for dim in shape:
        total *= dim
        if total > most:
            return None
    return total


def _tensor_entries(header: dict[str, Any]) -> _Layout:
    """The header's layout; StepReadError unless every tensor has a known dtype, a shape whose
    bytes equal its extent, and the extents tile the data buffer without gaps or overlaps
    (what safetensors' own reader assumes)."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise StepReadError("unreadable", f"tensor {quoted(name)}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise StepReadError(
                "unreadable", f"tensor {quoted(name)}: unknown dtype {shown(dtype)}"
            )
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise StepReadError("unreadable", f"tensor {quoted(name)}: malformed shape or offsets")
        begin, end = offsets
        extent = end - begin
        need = _shape_bytes(shape, DTYPE_SIZES[dtype], max(extent, 0))
        if need != extent:
            needs = f"more than {max(extent, 0)}" if need is None else need
            raise StepReadError(
                "unreadable",
                f"tensor {quoted(name)}: {dtype} {shown(shape)} needs {needs} bytes, its "
                f"extent has {extent}",
            )
        tensors[name] = (dtype, tuple(shape))
        extents.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(extents):
        if begin != position:
            raise StepReadError("unreadable", f"tensor {quoted(name)}: data extents overlap or gap")
        position = end
    return tensors, {name: begin for begin, _, name in extents}, position


def _check_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise StepReadError("unreadable", "header metadata is not a map of strings")
    return metadata


def too_large_to_read(size: int) -> StepReadError:
    """The error of a step file of which a read of `size` bytes (its data, or the whole file)
    finds no buffer to hold them (a sparse file of 8 GB takes 4 KB on disk)."""
    return StepReadError("unreadable", f"a read of {size:,} bytes of it does not fit in memory")


def _read_exactly(fh: BinaryIO, size: int) -> bytearray:
    """`size` bytes from `fh` into one buffer; StepReadError("torn") if the file ends first,
    "unreadable" if no buffer of that size can be had (`too_large_to_read`)."""
    try:
        data = bytearray(size)
    except MemoryError:
        raise too_large_to_read(size) from None
    view, got = memoryview(data), 0
    while got < size:
        count = fh.readinto(view[got:])  # type: ignore[attr-defined]  # every binary file has it
        if not count:
            raise StepReadError("torn", f"data cut at {got} of {size} bytes")
        got += count
    return data


def _known_layout(header: dict[str, Any]) -> _Layout:
    """`_tensor_entries` of a header already checked (byte for byte the same), unchecked."""
    entries = {name: info for name, info in header.items() if name != "__metadata__"}
    tensors = {name: (info["dtype"], tuple(info["shape"])) for name, info in entries.items()}
    offsets = {name: info["data_offsets"][0] for name, info in entries.items()}
    end = max((info["data_offsets"][1] for info in entries.values()), default=0)
    return tensors, offsets, end


def read_header(
    path: Path, *, deep: bool, keep_data: bool = False, known: int | None = None
) -> StepHeader:
    """`parse_header` of a local step file, in one open; its `key` is the open file's.

    Only a regular file is opened (never followed through a symlink, never a FIFO or device).
    Raises StepReadError: "torn" for a file shorter than its header says, "unreadable" else.
    """
    try:
        fh, st = open_regular(path, follow_links=False)
    except NotRegularFile:
        raise StepReadError("unreadable", "not a regular file") from None
    except OSError as exc:
        if os.path.islink(path):  # (the open says ELOOP: a loop, which a link need not be)
            raise StepReadError("unreadable", "a symlink, never followed") from None
        raise StepReadError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    try:
        with fh:
            header = parse_header(fh, st.st_size, deep=deep, keep_data=keep_data, known=known)
    except OSError as exc:
        raise StepReadError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    return replace(header, key=file_key(st))


def parse_header(
    fh: BinaryIO, size: int, *, deep: bool, keep_data: bool = False, known: int | None = None
) -> StepHeader:
    """Parses and checks the header of a step file of `size` bytes open at its start (any
    binary file object: a local file, an fsspec one, bytes in memory); with `deep`, also the
    data CRC (reads it all); with `keep_data`, keeps the data buffer in the result (one read).
    `known`: the `header_crc` of this file's header when it was checked before: a header with
    the same bytes is not checked again.

    Raises StepReadError: "torn" for a file shorter than its header says, "unreadable" else.
    """
    try:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise StepReadError(
                "torn", f"{counted(size, 'byte')}, shorter than a safetensors header"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > HEADER_LIMIT:
            raise StepReadError("unreadable", f"header length {header_len} is not plausible")
        if 8 + header_len > size:
            raise StepReadError("torn", f"header cut at {size} of {8 + header_len} bytes")
        raw = fh.read(header_len)
        if len(raw) < header_len:
            raise StepReadError("torn", f"header cut at {8 + len(raw)} of {8 + header_len} bytes")
        if (items := json_items(raw)) > HEADER_ITEM_LIMIT:  # before parsing: GBs if crafted
            raise StepReadError(
                "unreadable",
                f"header holds {items:,} JSON items, more than the {HEADER_ITEM_LIMIT:,} a step "
                "holds",
            )
        header_crc = crc32(raw)
        try:
            text = utf8_text(raw)
            header = json.loads(text)
        except RecursionError:
            raise StepReadError("unreadable", "header JSON nested too deeply") from None
        except NotUtf8:
            raise StepReadError("unreadable", "header is not UTF-8 JSON") from None
        except json.JSONDecodeError as exc:
            raise StepReadError("unreadable", f"header is not JSON: {exc}") from None
        if header_crc == known:
            metadata = header["__metadata__"]
            tensors, offsets, data_len = _known_layout(header)
        else:
            if not isinstance(header, dict):
                raise StepReadError("unreadable", "header is not a JSON object")
            tensor_count = len(header) - (METADATA_KEY in header)
            if tensor_count > MAX_TENSORS:  # before its CRC: millions cost minutes and GBs
                raise StepReadError(
                    "unreadable",
                    f"header has {tensor_count:,} tensors, more than the {MAX_TENSORS:,} a step "
                    "holds",
                )
            metadata = header.get("__metadata__") or {}
            if isinstance(metadata, dict) and len(metadata) > MAX_METADATA:
                raise StepReadError(
                    "unreadable",
                    f"header metadata has {len(metadata):,} entries, more than the "
                    f"{MAX_METADATA:,} a step holds",
                )
            expected = metadata.get(META_CRC_HEADER) if isinstance(metadata, dict) else None
            if expected is None:
                raise StepReadError("unreadable", "no header checksum (not a stabledrl step file)")
            if canonical_crc(header) != expected:
                raise StepReadError("unreadable", "header checksum mismatch")
            metadata = _check_metadata(metadata)
            if has_lone_surrogate(text, header):
                raise StepReadError("unreadable", "header has a string with a lone surrogate")
            tensors, offsets, data_len = _tensor_entries(header)
        data_start = 8 + header_len
        if size < data_start + data_len:
            raise StepReadError("torn", f"{size} bytes, the header needs {data_start + data_len}")
        if size > data_start + data_len:
            raise StepReadError("unreadable", f"{size - data_start - data_len} trailing bytes")
        data = _read_exactly(fh, data_len) if keep_data else None
        if deep:
            if data is not None:
                crc = crc32(data)
            else:
                crc = 0
                while chunk := fh.read(_CHUNK):
                    crc = crc32(chunk, crc)
            if f"{crc:08x}" != metadata.get(META_CRC_DATA):
                raise StepReadError("unreadable", "data checksum mismatch (corrupt bytes)")
    except OSError as exc:
        raise StepReadError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as exc:
        raise StepReadError("unreadable", f"malformed header: {exc}") from None
    return StepHeader(
        tensors=tensors,
        metadata=dict(metadata),
        data_start=data_start,
        data_len=data_len,
        offsets=offsets,
        header_crc=header_crc,
        data=data,
    )
