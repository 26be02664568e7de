"""The small files of a run, read as a run's files are trusted: its manifest's bytes and a
rank's stop note, each a regular file, never read through a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from stabledrl_cli._json import parse_strict
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.dump._manifest import MANIFEST_LIMIT
from stabledrl_cli.dump._stop_notes import STOP_NOTE_LIMIT, STOP_NOTE_SHAPE, is_stop_note
from stabledrl_cli.errors import InputError


def symlink_refused(name: str) -> InputError:
    """The refusal of a run's manifest or steps folder that is a symlink, named `name`."""
    return InputError(f"{name}: a symlink (nothing in a run is followed out of it)")


def is_symlink(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def read_manifest_bytes(path: Path, limit: int = MANIFEST_LIMIT, what: str = "manifest") -> bytes:
    """The manifest's bytes (or another small file's, a `what` of at most `limit` bytes): a
    regular file (a symlink, FIFO or device is never read), at most `limit` + 1 bytes of it
    (`parse_manifest` refuses a longer one)."""
    try:
        fh, _ = open_regular(path, follow_links=False)
        with fh:
            return fh.read(limit + 1)
    except NotRegularFile:
        raise InputError(f"{path}: not a regular file") from None
    except OSError as exc:
        if is_symlink(path):
            raise symlink_refused(str(path)) from None
        raise InputError(f"{path}: unreadable {what} ({exc.strerror or exc})") from None


def parse_stop_note(raw: bytes, rank: int, where: str) -> dict[str, Any]:
    """Rank `rank`'s note file (`STOP_NOTE_RE`) as its note; InputError naming `where` for one
    past `STOP_NOTE_LIMIT` bytes, not strict UTF-8 JSON, not of the note's shape, or of
    another rank than its name's."""
    if len(raw) > STOP_NOTE_LIMIT:
        raise InputError(f"{where}: a note of more than {STOP_NOTE_LIMIT} bytes")
    note = parse_strict(raw, where, "note")
    if not is_stop_note(note):
        raise InputError(f"{where}: not a recording_stopped note {STOP_NOTE_SHAPE}")
    assert isinstance(note, dict)
    if note["rank"] != rank:
        raise InputError(f"{where}: its note says rank {note['rank']}, its file name {rank}")
    return note
