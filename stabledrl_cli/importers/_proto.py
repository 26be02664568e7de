"""A small protobuf wire-format reader: the fields of one message, nothing more.

It never recurses (a caller decodes a nested message by calling `fields` on its bytes), reads
a varint of at most 10 bytes and a length-delimited field only within its message, and raises
ProtoError for anything else (a group, a reserved wire type, a field past the end).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class ProtoError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


Field = tuple[int, int, int | memoryview]
"""(field number, wire type, value): an int for VARINT and FIXED*, the bytes for LENGTH."""


def varint(data: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise ProtoError("a varint runs past the end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
    raise ProtoError("a varint longer than 10 bytes")


def fields(data: memoryview) -> Iterator[Field]:
    """The fields of one message, in order (repeated fields once per occurrence)."""
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtoError("field number 0")
        if wire == VARINT:
            value, pos = varint(data, pos)
            yield number, wire, value
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            if pos + size > len(data):
                raise ProtoError("a fixed-size field runs past the end")
            yield number, wire, int.from_bytes(data[pos : pos + size], "little")
            pos += size
        elif wire == LENGTH:
            size, pos = varint(data, pos)
            if size > len(data) - pos:
                raise ProtoError("a length-delimited field runs past the end")
            yield number, wire, data[pos : pos + size]
            pos += size
        else:
            raise ProtoError(f"wire type {wire} (groups are not read)")


def signed64(value: int) -> int:
    """A varint read as int64 (two's complement)."""
    return value - (1 << 64) if value >> 63 else value


def float32(bits: int) -> float:
    """A FIXED32 field's bits as a float."""
    return float(struct.unpack("<f", bits.to_bytes(4, "little"))[0])


def float64(bits: int) -> float:
    """A FIXED64 field's bits as a double."""
    return float(struct.unpack("<d", bits.to_bytes(8, "little"))[0])


def text(value: int | memoryview) -> str:
    """A string field (UTF-8; a byte that is not, written `\\xff`: two strings stay two)."""
    if isinstance(value, int):
        raise ProtoError("a string field with a numeric wire type")
    return bytes(value).decode("utf-8", "backslashreplace")


def first_element(wire: int, value: int | memoryview, element: int) -> int | None:
    """The first value of a repeated numeric field's occurrence (of wire type `wire`): the
    value itself when it was written unpacked, else the first element of the packed bytes
    (`element`: VARINT, FIXED32 or FIXED64); None when the packed bytes are empty. ProtoError
    for an unpacked value of another wire type (its bits would not fit the element)."""
    if isinstance(value, int):
        if wire != element:
            raise ProtoError(f"a numeric field of wire type {wire}, not {element}")
        return value
    if not len(value):
        return None
    if element == VARINT:
        return varint(value, 0)[0]
    size = 8 if element == FIXED64 else 4
    if len(value) < size:
        raise ProtoError("a packed field shorter than one element")
    return int.from_bytes(value[:size], "little")
