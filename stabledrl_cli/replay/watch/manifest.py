"""A followed run's manifest as a watch last read it (`RunWatcher`): its file's key, to tell
when it changed, and the notes a Recorder adds to its own run; a change beyond those notes is
another run's manifest, or the same run amended."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stabledrl_cli.dump._file_names import MANIFEST_NAME
from stabledrl_cli.dump._manifest import RECORDING_CLOSED, RECORDING_CLOSED_RANKS, RUN_ID
from stabledrl_cli.dump._manifest_edits import closed_ranks, manifest_now
from stabledrl_cli.dump._stfile import FileKey, file_key
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.errors import InputError


def _stopped_note(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's `recording_stopped` note, None without one."""
    note = manifest.get(RECORDING_STOPPED)
    return dict(note) if isinstance(note, dict) else None


def _run_of(manifest: dict[str, Any]) -> dict[str, Any]:
    notes = (RECORDING_STOPPED, RECORDING_CLOSED, RECORDING_CLOSED_RANKS)
    return {k: v for k, v in manifest.items() if k not in notes}


class WatchedManifest:
    """The manifest of the run at `path`, as last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.key: FileKey | None = None
        """Its file's key as last read; None for a packed archive (it has none)."""
        self.closed_mark = False
        """Its `recording_closed` mark."""
        self.recording_stopped: dict[str, Any] | None = None
        """Its `recording_stopped` ({step, rank, reason}: a Recorder's note that its
        recording stopped after a failed write or `note_stop`, training going on)."""
        self.closed_ranks: set[int] = set()
        """The ranks it marks closed (`recording_closed_ranks`)."""
        self.amended = False
        """Whether the manifest last found changed is the same run's (its `run_id`)."""

    def key_now(self) -> FileKey | None:
        """The key of the run directory's manifest as it is now; None without one (not yet,
        no more, or the path is no directory)."""
        try:
            return file_key((self.path / MANIFEST_NAME).stat())
        except OSError:
            return None

    def opened(self, manifest: dict[str, Any]) -> None:
        """Notes the manifest of the run just opened (`key` read before it)."""
        self.recording_stopped = _stopped_note(manifest)
        self.closed_ranks = set(closed_ranks(manifest))
        # A packed archive holds every step it will ever have, marked or not.
        archive = self.key is None
        self.closed_mark = archive or manifest.get(RECORDING_CLOSED) is True

    def replaced(self, read: dict[str, Any]) -> bool:
        """The run read so far (its manifest `read`) is gone: its manifest was removed, or
        rewritten as another run's (a change beyond `recording_stopped`, `recording_closed`
        and `recording_closed_ranks`, the notes a Recorder adds to its own run: a new `run_id`
        among them); or its manifest was amended beyond those notes under the same `run_id`
        (`amended`): it is read again all the same."""
        self.amended = False
        if self.key is None:  # a packed archive: never written while it is read
            return False
        key = self.key_now()
        if key is None:  # gone, or the path is no directory now
            return True
        if key == self.key:
            return False
        self.key = key
        try:  # read as open_run reads it: a FIFO put there is not waited on
            now = manifest_now(self.path)
        except (InputError, ValueError):
            return True  # reopened, it says what is wrong with it
        self.recording_stopped = _stopped_note(now)
        self.closed_ranks = set(closed_ranks(now))
        self.closed_mark = now.get(RECORDING_CLOSED) is True
        if _run_of(now) == _run_of(read):
            return False
        run_id = read.get(RUN_ID)
        self.amended = run_id is not None and now.get(RUN_ID) == run_id
        return True

    def kept(self) -> bool:
        """Whether the manifest is still the one last read (a packed archive always is): a
        resume removes the `recording_closed` mark before any step file changes."""
        return self.key is None or self.key_now() == self.key
