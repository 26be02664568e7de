"""A Recorder's `recording_stopped` note: in the manifest, in a rank's own file, and every
rank's gathered by rank."""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import chain
from typing import Any

from stabledrl_cli.dump._schema import is_count

RECORDING_STOPPED = "recording_stopped"
"""The manifest's note ({step, rank, reason}) that a Recorder stopped recording after a write
failed (`on_write_error="warn"`): the training went on, that rank recorded no later step."""
STOP_RESUMED = "resumed"
"""In a `recording_stopped` note (manifest's or a rank's file), true once a resume of its rank
appended to the run after the stop (a resume that records the stopped step again removes the
note): the note stays, for the steps it says are missing, but its rank records again. It
changes no format version: an older reader leaves the key alone."""
RECORDING_STOPS = "recording_stops"
"""Every rank's `recording_stopped` note, a list ordered by rank: what a reader gives of a
run whose ranks stopped (`Run.recording_stops`), and where an archive keeps them (its
manifest's copy: `stabledrl pack`)."""
STOP_NOTE_LIMIT = 1 << 16
"""Bytes a rank's note may take (its reason is an error's text, a path or two in it)."""
STOP_NOTE_SHAPE = "{step: an integer >= 0 or null, rank: an integer >= 0, reason: text}"


def is_stop_note(value: object) -> bool:
    """Whether `value` is a `recording_stopped` note (`STOP_NOTE_SHAPE`)."""
    return (
        isinstance(value, dict)
        and (value.get("step") is None or is_count(value.get("step")))
        and is_count(value.get("rank"))
        and isinstance(value.get("reason"), str)
    )


def note_text(note: dict[str, Any]) -> bytes:
    """A rank's note as its file holds it: JSON, one line."""
    return (json.dumps(note) + "\n").encode()


def stops_by_rank(*sources: Iterable[object]) -> list[dict[str, Any]]:
    """One stop note a rank, by rank (each a copy): of the notes in `sources`, in their order,
    the first of a rank; what is not a note's dict (a None) is passed over."""
    by_rank: dict[int, dict[str, Any]] = {}
    for stop in chain(*sources):
        if isinstance(stop, dict):
            by_rank.setdefault(stop["rank"], dict(stop))
    return [by_rank[rank] for rank in sorted(by_rank)]


def manifest_stops(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The stop notes a manifest holds, one a rank, by rank: its `recording_stops` (an
    archive's; the first of a rank), and its one `recording_stopped` note for a rank they do
    not name."""
    stops = manifest.get(RECORDING_STOPS)
    return stops_by_rank(
        stops if isinstance(stops, list) else [], [manifest.get(RECORDING_STOPPED)]
    )
