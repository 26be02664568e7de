"""`GuardedFile`: the file a pack writes its archive through, which keeps a failed write
instead of letting libhdf5 see it."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import mark_writing


class GuardedFile(io.RawIOBase):
    """The archive's temporary file as libhdf5 sees it (h5py's file-object driver): the first
    failed write (a full disk) is kept in `error` and every later write is dropped, so libhdf5
    never sees an I/O error. It would otherwise fail to close the file and crash the process
    (a segfault) when the objects of the half-written file are freed; `pack_run` raises the
    kept error once the file is closed, and the temporary file is removed.

    Once closed, it takes every call as a write to a lost file (kept in `error`, never
    raised): a SIGTERM that stops h5py while it closes the archive leaves h5py's file open,
    and h5py flushes it through this object when it frees it, after `pack_run` closed it."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        # Unbuffered: a buffered file would raise a deferred write error from seek or tell.
        self._raw = open(path, "w+b", buffering=0)  # noqa: SIM115 -- closed by close()
        mark_writing(self._raw.fileno())  # h5py's file-object driver takes no lock of its own
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _open(self) -> bool:
        """False once closed, the error kept."""
        if self._raw.closed:
            self.error = self.error or OSError(errno.EBADF, "written after it was closed")
            return False
        return True

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer) if self._open() else 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._open() and self.error is None:
            try:
                rest = view
                while rest:
                    written = self._raw.write(rest)
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    rest = rest[written:]
            except OSError as exc:
                self.error = exc
        return view.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence) if self._open() else 0

    def tell(self) -> int:
        return self._raw.tell() if self._open() else 0

    def truncate(self, size: int | None = None) -> int:
        if self._open() and self.error is None:
            try:
                return self._raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None and not self._raw.closed:
            try:
                self._raw.flush()
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        if not self.closed:
            self.flush()
            try:
                self._raw.close()
            except OSError as exc:
                self.error = self.error or exc
        super().close()
