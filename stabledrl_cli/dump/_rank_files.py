"""The files of a run directory that one rank's Recorder owns (with world_size 1 every one),
and their removal."""

from __future__ import annotations

import os
from pathlib import Path

from stabledrl_cli._atomic import write_error
from stabledrl_cli.dump._file_names import (
    STEP_FILE_RE,
    STOP_NOTE_RE,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
)

Owned = list[tuple[Path, int, bool]]


def own_files(steps: Path, rank: int, world_size: int) -> tuple[Owned, Owned]:
    """The files this recorder owns, its rank's (with world_size 1 every one): its step files,
    each (path, step, is_temporary), and its `recording_stopped` note files, each (path, rank,
    is_temporary)."""
    step_files: Owned = []
    notes: Owned = []
    if not steps.is_dir():
        return step_files, notes
    for name in sorted(os.listdir(steps)):
        temporary = name.startswith(".")
        step = STEP_FILE_RE.match(name) or TEMP_FILE_RE.match(name)
        note = STOP_NOTE_RE.match(name) or TEMP_STOP_NOTE_RE.match(name)
        if step is not None and (world_size == 1 or int(step.group(2) or 0) == rank):
            step_files.append((steps / name, int(step.group(1)), temporary))
        elif note is not None and (world_size == 1 or int(note.group(1)) == rank):
            notes.append((steps / name, int(note.group(1)), temporary))
    return step_files, notes


def remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None
