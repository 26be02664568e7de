"""The steps folder of a run directory sorted by name (`Listing`): final step files by step
and rank, temporary ones, the ranks' stop notes, and stray files, each with why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabledrl_cli.dump._file_names import (
    STEP_FILE_RE,
    STOP_NOTE_RE,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
    canonical_step,
)
from stabledrl_cli.dump._integrity import Finding

UNKNOWN_LISTED = 100
"""Stray files of steps/ listed as a finding each, at most: any more are one finding that
counts them (300,000 junk files would be 300,000 findings, gigabytes of report)."""


@dataclass(frozen=True)
class Entry:
    """What a name in steps/ is: a final step file (`rank` set), a temporary one, or an unknown
    file (`reason` set)."""

    path: Path
    step: int | None = None
    rank: int | None = None
    temporary: bool = False
    note: bool = False
    """A rank's `recording_stopped` note (`rank` set), or one in flight (`temporary` too)."""
    reason: str | None = None


@dataclass
class Listing:
    finals: dict[int, dict[int, Path]] = field(default_factory=dict)
    temps: list[tuple[int, Path]] = field(default_factory=list)
    notes: dict[int, Path] = field(default_factory=dict)
    """Each rank's `recording_stopped` note file, by rank."""
    unknown: list[tuple[Path, str]] = field(default_factory=list)
    """Files that are not step files of this run, each with why."""
    read_notes: tuple[dict[int, dict[str, Any]], list[Finding]] | None = None
    """`notes` read (`DirectoryRun._stop_notes`), once a listing: its integrity check and
    its notes shown (`inspect`) come from one read of each file."""


def unknown_reason(name: str, regular: bool, world_size: int) -> str | None:
    """Why a file in steps/ is not a finished step file of this run (None if it is one)."""
    match = STEP_FILE_RE.match(name)
    if match is None:
        return "not a step file of this run"
    if (match.group(2) is not None) != (world_size > 1):
        return "a step file of a run with another world_size"
    found = canonical_step(name)
    if found is None:
        return "a step file name not spelled as the writer spells it (or out of range)"
    if found[1] >= world_size:
        return f"rank {found[1]} >= the run's world_size {world_size}"
    if not regular:
        return "named like a step file but not a regular file (never opened)"
    return None


def missing_ranks(ranks: dict[int, Path], world_size: int) -> str | None:
    """'incomplete, no file for rank(s) [...]' naming at most five, or None (a rank that died,
    or is still writing the step); O(files), not O(world_size)."""
    if len(ranks) >= world_size:
        return None
    first: list[int] = []
    rank = 0
    while len(first) < 5 and rank < world_size:
        if rank not in ranks:
            first.append(rank)
        rank += 1
    more = world_size - len(ranks) - len(first)
    return f"incomplete, no file for rank(s) {first}" + (f" and {more} more" if more > 0 else "")


def listed_entry(steps_dir: Path, name: str, regular: bool, world_size: int) -> Entry:
    """What the file `name` of steps/ is in a run of `world_size` ranks (`Entry`)."""
    path = steps_dir / name
    note = STOP_NOTE_RE.match(name) or TEMP_STOP_NOTE_RE.match(name)
    if note is not None and world_size > 1:
        rank = int(note.group(1))
        why = (
            "a note's name not spelled as the writer spells it"
            if note.group(1) != f"{rank:04d}"
            else f"rank {rank} >= the run's world_size {world_size}"
            if rank >= world_size
            else "named like a note but not a regular file (never opened)"
            if not regular
            else None
        )
        if why is not None:
            return Entry(path, reason=why)
        return Entry(path, rank=rank, note=True, temporary=name.startswith("."))
    temp = TEMP_FILE_RE.match(name)
    if temp is not None:  # in flight when its final name is a step file of this run
        why = unknown_reason(name[1:].rsplit(".tmp-", 1)[0], regular, world_size)
        if why is None:
            return Entry(path, step=int(temp.group(1)), temporary=True)
        return Entry(path, reason=why)
    reason = unknown_reason(name, regular, world_size)
    final = canonical_step(name)
    if reason is not None or final is None:
        return Entry(path, reason=reason or "not a step file of this run")
    return Entry(path, step=final[0], rank=final[1])


def stray_findings(listing: Listing, named: Callable[[Path], str]) -> list[Finding]:
    """A finding for each temporary file of `listing` and each stray one (the first
    `UNKNOWN_LISTED`, then one that counts the rest), files named by `named`."""
    findings = []
    for n, path in listing.temps:
        findings.append(
            Finding(
                "temporary",
                n,
                named(path),
                f"step {n}: temporary file {path.name} (in flight, or left by a killed writer)",
            )
        )
    for path, reason in listing.unknown[:UNKNOWN_LISTED]:
        findings.append(Finding("unknown_file", None, named(path), f"{path.name}: {reason}"))
    unlisted = len(listing.unknown) - UNKNOWN_LISTED
    if unlisted > 0:
        message = (
            f"{unlisted:,} more files in steps/ that are not step files of this run, "
            f"not listed one by one (the first {UNKNOWN_LISTED} are)"
        )
        findings.append(Finding("unknown_file", None, None, message))
    return findings
