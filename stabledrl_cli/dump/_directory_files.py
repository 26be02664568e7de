"""How a run directory's files are reached on this machine's filesystem: `DirectoryFiles`, the
storage calls a `DirectoryRun` makes (list a folder, tell whether it changed since, key, read
and name a file). A run read through fsspec (`_remote`'s `RemoteRun`) makes each its own way;
everything else of reading a run directory is `DirectoryRun`'s, the same for both."""

from __future__ import annotations

import os
import time
from pathlib import Path

from stabledrl_cli.dump._run_files import is_symlink, read_manifest_bytes, symlink_refused
from stabledrl_cli.dump._stfile import FileKey, StepHeader, file_key, read_header
from stabledrl_cli.dump._stop_notes import STOP_NOTE_LIMIT

_SETTLED_NS = 2_000_000_000
"""How long before a listing the steps directory must have last changed for the listing to be
reused (far above any filesystem's timestamp granularity)."""


class DirectoryFiles:
    """The storage calls of a run directory on this machine's filesystem (module docstring)."""

    def named(self, path: Path) -> str:
        """How messages and findings name `path`, a file of this run: under the run's
        `location` (here the path itself)."""
        return str(path)

    def _said(self, exc: OSError) -> str:
        """What the filesystem said of a failed call, for a message."""
        return exc.strerror or str(exc)

    def _exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def _manifest_bytes(self, path: Path) -> bytes:
        return read_manifest_bytes(path)

    def _note_bytes(self, path: Path) -> bytes:
        """A rank's note file's bytes, at most `STOP_NOTE_LIMIT` + 1 of them; InputError."""
        return read_manifest_bytes(path, STOP_NOTE_LIMIT, "note")

    def _entries(self, directory: Path) -> list[tuple[str, bool]]:
        """(name, whether it is a regular file, not a link) of each entry, sorted by name;
        FileNotFoundError when there is no such directory, NotADirectoryError when it is
        something else (a file), InputError when it is a symlink (never followed)."""
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # a symlink: ENOTDIR on Linux, ELOOP elsewhere
            if is_symlink(directory):
                raise symlink_refused(self.named(directory)) from None
            raise
        try:
            with os.scandir(fd) as entries:
                found = sorted(entries, key=lambda entry: entry.name)
        finally:
            os.close(fd)
        listed = []
        for entry in found:
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError:
                regular = False
            listed.append((entry.name, regular))
        return listed

    def _stamp(self, directory: Path) -> object | None:
        """What changes whenever the directory's entries do, or None when no stamp can be
        trusted now (then it is listed again). Here its inode and modification time, once that
        time is older than `_SETTLED_NS` (a file added within the clock's granularity after a
        listing can leave the time as it was)."""
        try:
            st = os.stat(directory)
        except OSError:
            return None
        if time.time_ns() - st.st_mtime_ns <= _SETTLED_NS:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def _file_key(self, path: Path) -> FileKey:
        """What changes when the file does; OSError if it is gone."""
        return file_key(path.stat())

    def _header(
        self, path: Path, *, deep: bool, keep: bool = False, known: int | None = None
    ) -> StepHeader:
        """`parse_header` of the file (its arguments), `key` filled in; StepReadError."""
        return read_header(path, deep=deep, keep_data=keep, known=known)

    def _load(self, path: Path, known: int) -> StepHeader:
        """The file read whole, its header not checked again if its CRC is `known`."""
        return self._header(path, deep=False, keep=True, known=known)
