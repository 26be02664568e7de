"""CRC-32C (Castagnoli), as TFRecord framing uses it, in pure Python (slicing by 8)."""

from __future__ import annotations

import struct

_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reversed


def _tables() -> list[list[int]]:
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        first.append(crc)
    tables = [first]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[b] >> 8) ^ first[prev[b] & 0xFF] for b in range(256)])
    return tables


_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7 = _tables()


def crc32c(data: bytes | memoryview) -> int:
    """The CRC-32C of `data`."""
    crc = 0xFFFFFFFF
    view = memoryview(data)
    whole = len(view) - len(view) % 8
    for (word,) in struct.iter_unpack("<Q", view[:whole]):
        word ^= crc
        crc = (
            _T7[word & 0xFF]
            ^ _T6[(word >> 8) & 0xFF]
            ^ _T5[(word >> 16) & 0xFF]
            ^ _T4[(word >> 24) & 0xFF]
            ^ _T3[(word >> 32) & 0xFF]
            ^ _T2[(word >> 40) & 0xFF]
            ^ _T1[(word >> 48) & 0xFF]
            ^ _T0[word >> 56]
        )
    for byte in view[whole:]:
        crc = _T0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits plus a constant, modulo 2**32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
