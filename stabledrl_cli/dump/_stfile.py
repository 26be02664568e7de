"""One step file: safetensors bytes with two CRC32s, written atomically, checked on read.

safetensors has no checksum, so a flipped bit in the data would be read back silently. The
writer adds two to the metadata: `_crc32_header` over the canonical header JSON (without the
two CRC keys), so scalars can be read and trusted from the header alone, and `_crc32_data`
over the data buffer. The data buffer is safetensors' own; only the header is re-emitted.

A step file is written by `write_step` through the tool's one atomic writer, under a temporary
name (`.step-....safetensors.tmp-PID`) that readers of a live run recognise as in flight.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from stabledrl_cli._atomic import write_atomic
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._schema import META_CRC_DATA, META_CRC_HEADER, temp_file_name

_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the header size
_CHUNK = 1 << 22


def _canonical_crc(header: dict[str, Any]) -> str:
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if not k.startswith("_crc32")}
    body = dict(header, __metadata__=meta)
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{zlib.crc32(text.encode()):08x}"


def encode_step(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> list[bytes]:
    """The file's bytes as parts: length, header, data."""
    raw = st_save(tensors, metadata=metadata)
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    header.setdefault("__metadata__", {})
    header["__metadata__"][META_CRC_DATA] = f"{zlib.crc32(data):08x}"
    header["__metadata__"][META_CRC_HEADER] = _canonical_crc(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()  # stable bytes
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return [struct.pack("<Q", len(text)), text, data]


def write_step(final: Path, parts: list[bytes]) -> None:
    """Writes a step file atomically and durably; WriteError naming it if that fails."""
    write_atomic(final, parts, temp=final.with_name(temp_file_name(final.name, os.getpid())))


@dataclass(frozen=True)
class StepHeader:
    """What a step file's header says: tensor dtypes and shapes, and the metadata strings."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    data_start: int
    data_len: int


def read_header(path: Path, *, deep: bool) -> StepHeader:
    """Parses and checks a step file's header; with `deep`, also the data CRC (reads it all).

    Raises StepReadError: "torn" for a file shorter than its header says, "unreadable" else.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise StepReadError("torn", f"{size} bytes, shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _HEADER_LIMIT:
                raise StepReadError("unreadable", f"header length {header_len} is not plausible")
            raw = fh.read(header_len)
            if len(raw) < header_len:
                raise StepReadError(
                    "torn", f"header cut at {8 + len(raw)} of {8 + header_len} bytes"
                )
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise StepReadError("unreadable", f"header is not JSON: {exc}") from None
            if not isinstance(header, dict):
                raise StepReadError("unreadable", "header is not a JSON object")
            metadata = header.get("__metadata__") or {}
            expected = metadata.get(META_CRC_HEADER) if isinstance(metadata, dict) else None
            if expected is None:
                raise StepReadError("unreadable", "no header checksum (not a stabledrl step file)")
            if _canonical_crc(header) != expected:
                raise StepReadError("unreadable", "header checksum mismatch")
            tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
            data_len = 0
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = (info["dtype"], tuple(int(d) for d in info["shape"]))
                data_len = max(data_len, int(info["data_offsets"][1]))
            data_start = 8 + header_len
            if size < data_start + data_len:
                raise StepReadError(
                    "torn", f"{size} bytes, the header needs {data_start + data_len}"
                )
            if size > data_start + data_len:
                raise StepReadError("unreadable", f"{size - data_start - data_len} trailing bytes")
            if deep:
                crc = 0
                while chunk := fh.read(_CHUNK):
                    crc = zlib.crc32(chunk, crc)
                if f"{crc:08x}" != metadata.get(META_CRC_DATA):
                    raise StepReadError("unreadable", "data checksum mismatch (corrupt bytes)")
    except OSError as exc:
        raise StepReadError("unreadable", f"cannot read: {exc.strerror or exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StepReadError("unreadable", f"malformed header: {exc}") from None
    return StepHeader(
        tensors=tensors, metadata=dict(metadata), data_start=data_start, data_len=data_len
    )
