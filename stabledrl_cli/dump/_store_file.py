"""`StoreFile`: a packed `.h5` read through fsspec, as the file object h5py reads.

When the store fails under a read (a connection reset, a timeout, an expired credential),
h5py reports what it was parsing, not why its read failed: the failure surfaced as "corrupt
run archive (OSError)", a step as "archive data checksum failed", and a store's own error type
(httpx's, gcsfs's HttpError: no OSError) as an internal error. This file object keeps the
store's error, raises it to h5py as an OSError, and lets the reader ask what it was, so a
message says the store failed and quotes it.

A forked child (the archive probe's) cannot read through its parent's file object when the
filesystem is asynchronous (http, s3fs, gcsfs): the file waits on its parent's event loop, a
thread the fork does not copy, and the read hung. So the first read in another process opens
the file anew (`reopen`), at the same position, on a filesystem of its own.

h5py calls this file object holding its lock, and an asynchronous filesystem's read waits on
its event loop's thread; a garbage collection run on that thread that frees an h5py object
waits on h5py's lock: neither thread went on (a probe child's read hung its 20 s, and the
archive was refused as 'a corrupt or crafted archive', exit 3, 2 in 80 reads of a served
archive under load). No collection starts while the store is read (`_uncollected`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

from stabledrl_cli.errors import described


@contextlib.contextmanager
def _uncollected() -> Iterator[None]:
    """No garbage collection starts, on any thread, while the block runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StoreFile(io.RawIOBase):
    """A binary file object of the store (fsspec's) whose failures are kept (`take_failure`)."""

    def __init__(
        self,
        file: Any,
        reopen: Callable[[], Any] | None = None,
        written: Callable[[str], str] = str,
    ) -> None:
        """reopen: opens the file anew, on a filesystem made in the calling process. written:
        how a failure is written (a URL's credentials hidden)."""
        super().__init__()
        self._file = file
        self._reopen = reopen
        self._written = written
        self._pid = os.getpid()
        self._failure: str | None = None

    def _here(self) -> Any:
        """The file, opened anew at its position when this process is not the one that
        opened it."""
        if self._reopen is not None and self._pid != os.getpid():
            position = self._file.tell()
            self._file = self._reopen()
            self._file.seek(position)
            self._pid = os.getpid()
        return self._file

    def _failed(self, exc: Exception) -> OSError:
        if self._failure is None:
            self._failure = f"the store failed ({self._written(described(exc))})"
        return OSError(self._failure)

    def take_failure(self) -> str | None:
        """The store's first error since last asked (`the store failed (Type: message)`), or
        None: once told, a later error of h5py is the file's own again."""
        failure, self._failure = self._failure, None
        return failure

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            with _uncollected():
                data = self._here().read(len(memoryview(buffer)))
        except Exception as exc:
            raise self._failed(exc) from exc
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            with _uncollected():
                return int(self._here().seek(offset, whence))
        except Exception as exc:
            raise self._failed(exc) from exc

    def tell(self) -> int:
        try:
            with _uncollected():
                return int(self._here().tell())
        except Exception as exc:
            raise self._failed(exc) from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a read-only file's close loses nothing
            self._file.close()
        super().close()
