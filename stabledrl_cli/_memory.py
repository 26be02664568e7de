"""Freed memory handed back to the operating system between a replay's chunks.

glibc serves a replay's large, short-lived tensors from its heap once they have been freed a
few times; the holes the small long-lived objects leave between them are never returned, so
without a trim the resident memory creeps up to a multiple of what a chunk holds. `malloc_trim`
returns every free page (not only the heap's top). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def release_freed_memory(keep: int) -> None:
    """Returns the allocator's free pages to the operating system once more than `keep` bytes
    lie free in its heap (glibc; elsewhere nothing): a trim costs page faults when the memory
    is used again, so it waits until the holes are worth it."""
    libc = _glibc()
    if libc is not None and libc.mallinfo2().fordblks > keep:
        libc.malloc_trim(0)
