"""A run's manifest as it is on disk, and the changes its ranks make to it one at a time (an
exclusive `flock` of the run directory: `_manifest_locked`), each made to the manifest as
the others left it: a key set or removed, a rank's close, the `recording_closed` mark
removed and put back, a fresh manifest written whole."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import temp_name, write_atomic
from stabledrl_cli._json import parse_strict
from stabledrl_cli.dump._file_names import MANIFEST_NAME
from stabledrl_cli.dump._manifest import MANIFEST_LIMIT, RECORDING_CLOSED, RECORDING_CLOSED_RANKS
from stabledrl_cli.dump._run_files import read_manifest_bytes
from stabledrl_cli.errors import InputError, WriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; the manifest is changed without a lock, as before
    fcntl = None  # type: ignore[assignment]


def manifest_now(path: Path) -> dict[str, Any]:
    """The manifest of the run at `path` as it is on disk, read as its readers read it
    (`read_manifest_bytes`: a regular file only, at most a bounded part of it: a FIFO or a
    link to a device put in its place is never waited on nor read for ever; `parse_strict`:
    JSON nested past the parser's depth is refused, not a RecursionError). InputError when it
    cannot be read or is not JSON, ValueError when it is no JSON object."""
    where = path / MANIFEST_NAME
    manifest = parse_strict(read_manifest_bytes(where), str(where), "manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: not a JSON object")
    return manifest


LOCK_WAIT = 10.0
"""Seconds a change of the manifest waits for another process's lock (`_manifest_locked`): a
change holds it for a read and an fsynced write, milliseconds."""

_LOCK_RETRY = 0.005
"""Seconds between two tries of a lock that another process holds."""


def _lock(directory: int) -> None:
    """An exclusive `flock` of `directory` once it is free, within `LOCK_WAIT` seconds;
    nothing when the file system refuses it or it stays held."""
    if fcntl is None:
        return
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return
            time.sleep(_LOCK_RETRY)
        except OSError:
            return


@contextmanager
def _manifest_locked(path: Path) -> Iterator[None]:
    """Inside: no other process changes the manifest of the run at `path` (`amend_manifest`,
    a fresh manifest). Ranks of one run that start or stop together each read the manifest and
    write it back whole: without this, one rank's write undid what another wrote in between
    (a resumed run's new run_id, say, or a fresh manifest replaced by the one it replaced).
    An exclusive `flock` of the run directory, which the system releases when its holder dies;
    on a file system that refuses it (NFS, for a directory), or held past `LOCK_WAIT` seconds
    (its holder frozen: a debugger, SIGSTOP), it goes without, as before: the training that
    records never waits longer."""
    try:
        directory: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # the manifest's own read or write says why
        directory = None
    try:
        if directory is not None:
            _lock(directory)
        yield
    finally:
        if directory is not None:
            os.close(directory)


def _write_manifest(path: Path, text: bytes) -> None:
    """Writes the run's manifest (`write_atomic`) through a temporary name of this write's own:
    ranks on several hosts often have the same pid (in containers), and two writes through one
    name (the pid's) tore the manifest or failed."""
    target = path / MANIFEST_NAME
    temp = temp_name(target)
    write_atomic(target, text, temp=temp.with_name(f"{temp.name}-{uuid.uuid4().hex}"))


def write_new_manifest(path: Path, text: bytes) -> None:
    """Writes `text` whole as the run's manifest (a new run's, an overwritten one's) while no
    other process changes it (`_manifest_locked`)."""
    with _manifest_locked(path):
        _write_manifest(path, text)


def amend_manifest(path: Path, name: str, value: object | None) -> None:
    """Rewrites the run's manifest (atomically) with `name` set to `value`, or without it for
    None, in the manifest as it is then (`_manifest_locked`: another rank's change is kept).
    InputError, ValueError or WriteError when it cannot."""

    def amended(manifest: dict[str, Any]) -> None:
        if value is None:
            manifest.pop(name, None)
        else:
            manifest[name] = value

    change_manifest(path, amended)


def change_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrites the run's manifest (atomically) as `change` changes it in place, the manifest
    as it is then (`amend_manifest`); InputError, the manifest left as it was, for a change
    that takes it past the `MANIFEST_LIMIT` bytes its readers take (a note on a manifest near
    it): the run stays readable, without the note."""
    with _manifest_locked(path):
        manifest = manifest_now(path)
        change(manifest)
        text = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
        if len(text) > MANIFEST_LIMIT:
            raise InputError(
                f"{path / MANIFEST_NAME}: not changed: it would be {len(text)} bytes, larger "
                f"than the {MANIFEST_LIMIT} its readers take"
            )
        _write_manifest(path, text)


def closed_ranks(manifest: dict[str, Any]) -> list[int]:
    """The manifest's `recording_closed_ranks`, [] without a list of them."""
    ranks = manifest.get(RECORDING_CLOSED_RANKS)
    return ranks if isinstance(ranks, list) else []


def close_rank(path: Path, rank: int, world_size: int) -> None:
    """Adds `rank` of a run of `world_size` > 1 ranks to its `recording_closed_ranks` (its
    Recorder closed, its writes done) and, when every rank is in them then, marks the run
    `recording_closed`: no rank can tell alone that the others are done. InputError,
    ValueError or WriteError when it cannot."""

    def closed(manifest: dict[str, Any]) -> None:
        ranks = sorted({*closed_ranks(manifest), rank})
        manifest[RECORDING_CLOSED_RANKS] = ranks
        if ranks == list(range(world_size)):
            manifest[RECORDING_CLOSED] = True

    change_manifest(path, closed)


def reopen_run(path: Path, rank: int | None = None) -> dict[str, Any] | None:
    """Removes the run's `recording_closed` mark, if its manifest has one, and its
    `recording_closed_ranks`: the run is about to be recorded again (resumed, or replaced), so
    a reader must not take it for finished while its step files change; with `rank` (a
    Recorder's), only that rank of `recording_closed_ranks`, the other ranks' closes stand.
    -> the manifest as it was closed (`reclose_run` takes it), None when nothing was removed:
    no manifest or one that cannot be read (a new one is written), or one without the mark
    and the rank. WriteError when the mark cannot be removed."""
    try:
        manifest = manifest_now(path)
    except (InputError, ValueError):
        return None
    ranks = closed_ranks(manifest)
    if RECORDING_CLOSED not in manifest and (rank not in ranks if rank is not None else not ranks):
        return None

    def reopened(now: dict[str, Any]) -> None:
        now.pop(RECORDING_CLOSED, None)
        left = [r for r in closed_ranks(now) if rank is not None and r != rank]
        if left:
            now[RECORDING_CLOSED_RANKS] = left
        else:
            now.pop(RECORDING_CLOSED_RANKS, None)

    change_manifest(path, reopened)
    return manifest


def reclose_run(path: Path, closed: dict[str, Any]) -> None:
    """Puts back the `recording_closed` mark (and `recording_closed_ranks`) that `reopen_run`
    removed from the manifest `closed`, when the manifest is that one still but for them: the
    recording that reopened the run ended without changing it (a resume refused, a command
    that recorded nothing), so the run is the one that was closed. The caller knows its step
    files are unchanged too. Best effort, as the mark's first write: nothing when it cannot."""
    marks = (RECORDING_CLOSED, RECORDING_CLOSED_RANKS)
    reopened = {name: value for name, value in closed.items() if name not in marks}
    with suppress(InputError, ValueError, WriteError), _manifest_locked(path):
        if manifest_now(path) == reopened:
            _write_manifest(path, (json.dumps(closed, indent=2, allow_nan=False) + "\n").encode())


def new_run_id() -> str:
    """A run identity no other recording has: 32 random hex digits (random even under
    SOURCE_DATE_EPOCH, since two byte-identical recordings are still two runs)."""
    return uuid.uuid4().hex
