"""Work to finish as a child process of `multiprocessing` ends, where atexit cannot do it.

A child that multiprocessing started by fork or forkserver (a notebook launcher's fork; the
default start method of Python 3.14 on Linux) ends with `os._exit` once its target returns:
none of its atexit handlers runs, only multiprocessing's own finalizers, first thing after the
target. A spawned child runs both, the finalizers first.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import multiprocessing.util
from collections.abc import Callable


def at_child_end(handler: Callable[[], object]) -> Callable[[], None]:
    """In a child process of multiprocessing, runs `handler` as its target returns (or
    raises); elsewhere nothing. Returns the function that cancels it. A handler that atexit
    runs too must be safe to run twice (a spawned child runs both)."""
    if multiprocessing.parent_process() is None:
        return lambda: None
    finalizer = multiprocessing.util.Finalize(None, handler, exitpriority=0)
    return finalizer.cancel


def in_pool_worker() -> bool:
    """Whether this process is a worker of a `multiprocessing.Pool`: its target never returns
    while the pool lives, and the pool ends it with SIGTERM (`terminate`, as leaving `with
    Pool()` does) once the results are in, so nothing of it runs at its end."""
    process = multiprocessing.current_process()
    worker = getattr(multiprocessing.pool, "worker", None)  # (not in the stubs)
    return worker is not None and getattr(process, "_target", None) is worker
