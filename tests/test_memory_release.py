"""Freed heap memory goes back to the system between a replay's chunks (glibc's malloc_trim).

Each case runs in a fresh interpreter, whose heap starts in a known state. The cases allocate
numpy arrays, from the same glibc heap as torch's CPU tensors, so that a case's interpreter
does not pay for importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stabledrl_cli._memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="not glibc: nothing to release")

SCENARIO = """
import numpy as np
from stabledrl_cli._memory import release_freed_memory

def anonymous_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

raise_threshold = np.ones(1 << 20, np.float32)  # freed, it raises glibc's threshold for using mmap
del raise_threshold
keep, big = [], []
for _ in range(64):  # 64 MB of 1 MB arrays, each followed by a small one that outlives it
    block = np.empty(1 << 18, np.float32)
    block.fill(1.0)
    big.append(block)
    keep.append(np.ones(4, np.float32))
del big  # holes the heap cannot give back by shrinking its top
before = anonymous_kb()
release_freed_memory(keep=KEEP)
print(before - anonymous_kb())
"""


def _released_kb(keep: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO.replace("KEEP", str(keep))],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


def test_release_returns_the_holes_to_the_system() -> None:
    assert _released_kb(keep=0) > 32 * 1024


def test_release_waits_until_enough_is_free() -> None:
    assert abs(_released_kb(keep=1 << 40)) < 4 * 1024


REUSE = """
import resource
import numpy as np
from stabledrl_cli._memory import _glibc, heap_kept

def anonymous_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

def reuse_faults():
    # Minor page faults of reusing 40 MB freed in 1 MB arrays, over four rounds.
    faults = 0
    for round in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [np.ones(1 << 18, np.float32) for _ in range(40)]
        del blocks
        if round:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults

with heap_kept():
    mapped = _glibc().mallinfo2().hblkhd
    blocks = [np.ones(1 << 18, np.float32) for _ in range(40)]
    mapped = _glibc().mallinfo2().hblkhd - mapped
    del blocks
    kept = reuse_faults()
    held = anonymous_kb()
print(mapped, kept, held - anonymous_kb())
"""


def test_heap_kept_serves_and_reuses_memory_from_the_heap() -> None:
    done = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True)
    mapped, faults, returned_kb = (int(word) for word in done.stdout.split()[-3:])
    assert mapped < 1 << 20  # 1 MB arrays come from the heap, not from fresh mappings
    assert faults < 4 * 40 * 256 // 8  # their freed pages are reused, not faulted in again
    assert returned_kb > 32 * 1024  # and go back to the system on exit


THREAD_ARENAS = """
import ctypes, sys, threading
import numpy as np
from stabledrl_cli._memory import _glibc, heap_kept

with heap_kept(shared=sys.argv[1] == "shared"):
    threads = [threading.Thread(target=lambda: np.ones(1 << 22, np.float32)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _glibc().malloc_stats()  # "Arena N:" for each arena, on stderr
"""


@pytest.mark.parametrize("shared", ["shared", "own"])
def test_threads_allocate_from_the_kept_heap_when_asked(shared: str) -> None:
    """A replay's computing threads (`heap_kept(shared=True)`) allocate from the main heap,
    whose freed pages it keeps; else each takes an arena of its own, whose heaps glibc unmaps
    as they empty (`_memory`)."""
    done = subprocess.run(
        [sys.executable, "-c", THREAD_ARENAS, shared], capture_output=True, text=True, check=True
    )
    arenas = done.stderr.count("Arena ")
    assert arenas == 1 if shared == "shared" else arenas > 1, done.stderr
