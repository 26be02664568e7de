"""The names of a run's files (docs/run-format.md): the manifest, the step files, the ranks'
notes and locks, and the temporary names they are written under."""

from __future__ import annotations

import re

from stabledrl_cli.dump._schema import STEP_LIMIT

MANIFEST_NAME = "manifest.json"
STEPS_DIR = "steps"

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first bytes of an HDF5 file (a packed run)."""
# The names of a run's files below match as the writer spells them only: ASCII digits (`\d`
# also takes other scripts', which int() reads) and `\Z` (`$` also matches before a final
# newline: `stopped.rank-0001.json\n` was read as rank 1's note).
STEP_FILE_RE = re.compile(r"^step-([0-9]{8,})(?:\.rank-([0-9]{4,}))?\.safetensors\Z")
STOP_NOTE_RE = re.compile(r"^stopped\.rank-([0-9]{4,})\.json\Z")
"""A rank's own `recording_stopped` note in steps/ (`stop_note_name`), written by a Recorder of
a world_size > 1 run as it stops: the ranks of a run, or of a node's own directory, never
write the same file."""
TEMP_STOP_NOTE_RE = re.compile(r"^\.stopped\.rank-([0-9]{4,})\.json\.tmp-[0-9]+\Z")
"""A rank's note while it is written (`_atomic.temp_name` of its name): in flight, not read."""
WRITER_LOCK_RE = re.compile(r"^\.writer\.rank-([0-9]{4,})\.lock\Z")
"""The file a live Recorder of a rank holds locked (`writer_lock_name`; `dump._writer_lock`):
no step's data, never read; it goes when the Recorder closes."""
OS_FILE_RE = re.compile(r"^(\.DS_Store|\._.+|Thumbs\.db|desktop\.ini)\Z")
"""The files an operating system's file browser leaves in any folder it shows (macOS Finder's
.DS_Store and ._NAME AppleDouble files, Windows Explorer's Thumbs.db and desktop.ini): never
a user's data nor a run's. Readers pass over them; recording over a run (overwrite=True,
--force) removes them from it with its branch runs (`dump._run_target.os_file`)."""
# Temporary names start with a dot so that no glob for finished steps ever matches them.
TEMP_FILE_RE = re.compile(r"^\.step-([0-9]{8,})(?:\.rank-([0-9]{4,}))?\.safetensors\.tmp-[0-9]+\Z")


def step_file_name(step: int, rank: int, world_size: int) -> str:
    """`step-00000042.safetensors`, or with `.rank-0001` when the run has several ranks."""
    if world_size > 1:
        return f"step-{step:08d}.rank-{rank:04d}.safetensors"
    return f"step-{step:08d}.safetensors"


def canonical_step(name: str) -> tuple[int, int] | None:
    """(step, rank) of a finished step file's name when it is the one spelling the writer uses
    (`step_file_name`) of an int64 step; None for any other name (e.g. `step-000000001`)."""
    match = STEP_FILE_RE.match(name)
    if match is None:
        return None
    step, rank = int(match.group(1)), int(match.group(2) or 0)
    if step > STEP_LIMIT:
        return None
    expected = step_file_name(step, rank, 2 if match.group(2) is not None else 1)
    return (step, rank) if expected == name else None


def stop_note_name(rank: int) -> str:
    """`stopped.rank-0001.json`: the name of rank `rank`'s note in steps/ (`STOP_NOTE_RE`)."""
    return f"stopped.rank-{rank:04d}.json"


def writer_lock_name(rank: int) -> str:
    """`.writer.rank-0001.lock`: the file in steps/ a live Recorder of rank `rank` holds locked
    (`WRITER_LOCK_RE`)."""
    return f".writer.rank-{rank:04d}.lock"


def temp_file_name(final_name: str, pid: int) -> str:
    """The name a step file has while it is written (matches `TEMP_FILE_RE`)."""
    return f".{final_name}.tmp-{pid}"
