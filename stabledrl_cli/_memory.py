"""Freed memory kept for reuse during a replay, and handed back to the operating system between
its chunks.

A replay allocates and frees tensors of a step's size hundreds of times a step. By default
glibc maps each one above its mmap threshold afresh and gives the top of its heap back as soon
as it is free, so every tensor's pages fault in again (2.3-2.8 s of system time in a 14-16 s
catalogue replay of 262K-position steps). `heap_kept` serves them from the heap and keeps the
freed pages; without trims the holes the small long-lived objects leave between them would
creep the resident memory up to a multiple of what a chunk holds, so `release_freed_memory`
returns every free page (not only the heap's top) once enough lies free. Elsewhere than glibc
both do nothing.

Several computing threads (`heap_kept(shared=True)`) would each take an arena of their own,
whose heaps glibc unmaps whenever they empty, whatever the thresholds: 2.3M page faults and 3.7
s of system time in that catalogue replay on 2 threads, against 70K and 0.2 s on one. So they
share the main heap: the process's malloc arenas are capped at one (`M_ARENA_MAX`). glibc fixes
that cap the first time a thread needs an arena of its own, so it stays for the life of the
process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024
"""glibc's documented default of both thresholds."""
HEAP_SERVED = 32 * 1024 * 1024
"""Allocations below this come from the heap inside `heap_kept` (glibc's own dynamic ceiling
for its mmap threshold on 64-bit systems)."""
_NEVER_TRIM = 2**31 - 1


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
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
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


@contextmanager
def heap_kept(shared: bool = False) -> Iterator[None]:
    """Inside: allocations below `HEAP_SERVED` come from the heap, and freed memory stays there
    until `release_freed_memory` (no page faults when the next step reuses it); `shared`: the
    threads started from now on allocate from that heap too (module docstring). On exit glibc's
    default thresholds are back (fixed: its dynamic adjustment of them stays off) and the free
    pages are returned."""
    libc = _glibc()
    if libc is None:
        yield
        return
    if shared:
        libc.mallopt(_M_ARENA_MAX, 1)
    libc.mallopt(_M_MMAP_THRESHOLD, HEAP_SERVED)
    libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
