"""Readying a run directory for a Recorder: a new run, an overwritten one, or a resumed one.

In each case the rank's writer lock (`_writer_lock`) is held first: nothing changes while
another live Recorder of the rank records into the directory.

- New (the default): the directory must be absent or empty of what this recorder would write
  (for rank 0: anything besides steps/; for every rank: its own step and note files).
- `overwrite=True`: removes this recorder's own step files and `recording_stopped` note
  file, never another rank's (with world_size 1 every one is its own); each rank first
  removes the old manifest's `recording_closed` mark and its own rank of
  `recording_closed_ranks` (`reopen_run`), and rank 0 writes a fresh manifest once they are
  gone.
- `resume=True`: continues the run in place. Its manifest must agree on unit, world_size,
  group_ids and the policy spec (else UsageError); it is kept as it is, but for its
  `recording_closed` mark and this rank of `recording_closed_ranks`, which each rank removes
  before any step file of its own changes: the run is recorded again; and for a
  `recording_stopped` note when `resume_from` is at or before the step it names (that step
  and the later ones are recorded again), which rank 0 or the rank it names removes, as each
  rank does with its own note file (steps/stopped.rank-NNNN.json: one that does not read as
  a note is left, for its readers to report). Of this rank's step files, those before
  `resume_from` are kept and verified in full first (data checksum: a corrupt one is
  InputError, and nothing has changed), then those at or after it are removed (the resumed
  training writes them again), and temporary files left by a killed writer.

The run identity (the manifest's `run_id`, `new_run_id`): rank 0 writes a new one into every
fresh manifest (a new run, an overwritten one) and, when a resume removed any of its step
files, into the kept manifest before it removes them and again once they are gone (a reader
that listed the run in between, or a resume cut short there, sees another one); so does
another rank's resume that removed its file of a step whole until then (every rank's file
there): a reader that saw the old identity may have read such a step, which the resumed
training writes again under the same name. A step that already lacked a rank's file no reader
holds (`stabledrl watch` reads the run again once a step it read lacks one), so of the ranks
of a restart that all resume, rank 0 and at most one other renew the run's identity, not
every rank. A resume that removes no step file (it appends)
keeps the identity: every step a reader read is still as it was.

Ranks change the manifest one at a time (`_manifest_locked`), each change made to the
manifest as the others left it.

Any failure to write or remove a file is WriteError naming it.
"""

from __future__ import annotations

import errno
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import chain
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import fsync_dir, temp_name, write_atomic, write_error
from stabledrl_cli._json import parse_strict
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.dump._policy import same_policy
from stabledrl_cli.dump._run_files import parse_stop_note, read_manifest_bytes, symlink_refused
from stabledrl_cli.dump._schema import (
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    OS_FILE_RE,
    RECORDING_CLOSED,
    RECORDING_CLOSED_RANKS,
    RECORDING_STOPPED,
    RUN_ID,
    RUN_KIND,
    STEP_FILE_RE,
    STEPS_DIR,
    STOP_NOTE_LIMIT,
    STOP_NOTE_RE,
    STOP_RESUMED,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
    canonical_step,
    check_manifest,
    is_stop_note,
    note_text,
    parse_manifest,
)
from stabledrl_cli.dump._stfile import read_header
from stabledrl_cli.dump._writer_lock import WriterLock, hold_writer_lock, refuse_if_held
from stabledrl_cli.errors import InputError, UsageError, WriteError, counted

try:
    import fcntl
except ImportError:  # Windows: no flock; the manifest is changed without a lock, as before
    fcntl = None  # type: ignore[assignment]

_MUST_AGREE = ("unit", "world_size", "group_ids", "loss_norm")


_Owned = list[tuple[Path, int, bool]]


def _own_files(steps: Path, rank: int, world_size: int) -> tuple[_Owned, _Owned]:
    """The files this recorder owns, its rank's (with world_size 1 every one): its step files,
    each (path, step, is_temporary), and its `recording_stopped` note files, each (path, rank,
    is_temporary)."""
    step_files: _Owned = []
    notes: _Owned = []
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


def _whole_steps(steps: Path, world_size: int) -> set[int]:
    """The steps every rank's file of is in `steps` (a reader may have read them)."""
    files: dict[int, int] = {}
    for found in map(canonical_step, os.listdir(steps)):
        if found is not None and found[1] < world_size:
            files[found[0]] = files.get(found[0], 0) + 1
    return {step for step, count in files.items() if count == world_size}


def _stop_note_of(path: Path, rank: int) -> dict[str, Any] | None:
    """The note a rank's note file holds, None when it holds none (`parse_stop_note`)."""
    try:
        return parse_stop_note(read_manifest_bytes(path, STOP_NOTE_LIMIT, "note"), rank, str(path))
    except InputError:
        return None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from None


def os_file(entry: Path) -> bool:
    """Whether `entry` is a file browser's file (`OS_FILE_RE`), not a folder so named."""
    return bool(OS_FILE_RE.match(entry.name)) and (entry.is_symlink() or not entry.is_dir())


def _remove_os_files(path: Path) -> None:
    """Removes a file browser's files (`os_file`: .DS_Store...) from the run at `path` and its
    steps directory: a run recorded over another keeps none of the old run's folders' litter.
    WriteError naming one that cannot be removed."""
    for folder in (path, path / STEPS_DIR):
        try:
            names = sorted(os.listdir(folder))
        except OSError:  # no such folder yet (or no folder: the recording refuses it)
            continue
        for name in names:
            if os_file(folder / name):
                _remove(folder / name)


def remove_stepless_run(path: Path) -> None:
    """Removes the run at `path` when it holds no step (an empty steps directory): its
    manifest and steps directory, the directory left as a new run finds it. WriteError when
    the manifest cannot be removed."""
    try:
        (path / STEPS_DIR).rmdir()
    except OSError:  # a step or a note there: the run stays
        return
    _remove(path / MANIFEST_NAME)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not (path / MANIFEST_NAME).is_file():
        raise UsageError(f"{path}: nothing to resume (no {MANIFEST_NAME})")
    return DirectoryRun(path).manifest


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


RECORD_FORCE_HINT = (
    "to record into it (a new recording replaces its run; one that resumes it continues it: "
    "TRL's train(resume_from_checkpoint=...), a script's log_policy_batch with recorder_kwargs "
    "resume=True)"
)
"""How `stabledrl record --force` records into an --out that holds a run: told by record's
own check before the command starts, and by its command's Recorder (`RunNotEmpty`)."""


class RunNotEmpty(UsageError):
    """A Recorder's refusal of a directory that is not empty (neither overwrite=True nor
    resume=True given), naming the first file found (`found`) and those two arguments; the
    Recorder that `stabledrl record -- CMD` makes for its command says `for_record` instead:
    the user typed a command, not a Recorder's arguments."""

    def __init__(self, path: Path, found: str) -> None:
        self.path, self.found = path, found
        self.refused = f"{path} already exists and is not empty ({found})"
        super().__init__(
            f"{self.refused}; pass overwrite=True to replace the run, or resume=True to continue it"
        )

    def __reduce__(self) -> tuple[type[RunNotEmpty], tuple[Path, str]]:
        return type(self), (self.path, self.found)  # (pickled: the arguments are not args)

    def for_record(self) -> UsageError:
        """The refusal as `stabledrl record`'s: a run that appeared in --out after record
        checked it (another job recording there), or that an earlier process of the command
        recorded (`python a.py && python b.py`)."""
        return UsageError(f"{self.refused}; run `stabledrl record --force` {RECORD_FORCE_HINT}")


def directory_or_nothing(path: Path, named: str) -> bool:
    """Whether `path` is a directory (False: nothing is there). UsageError naming it as
    `named` when something else is in the way (a file, a symlink to nothing: `_in_the_way`
    says which), WriteError when the system cannot tell (a name longer than the file system
    takes, ...). The path is looked for before it is asked whether it is a directory: another
    rank of the run may make the directory in between, and what was not there then is no file
    in the way."""
    exists = os.path.lexists(path)
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise write_error(path, exc) from None
    if exists and not is_dir:
        raise UsageError(f"{named} {_in_the_way(path)}")
    return is_dir


def _in_the_way(path: Path) -> str:
    """What is at `path` where a directory goes, said after its name: a symlink whose target
    is missing (`ln -s /nonexistent/x out`) is said to be one, not a thing that exists."""
    try:
        os.stat(path)
    except FileNotFoundError:
        with suppress(OSError):  # gone meanwhile, or made no link by another process
            return f"is a symlink to {os.readlink(path)}, which does not exist"
    except OSError:  # a symlink loop, ...: something is there, and no directory
        pass
    return "exists and is not a directory"


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


def in_the_way(path: Path) -> tuple[Path, bool] | None:
    """The first of the run directory `path`'s `steps` and manifest that is there as what no
    run can be written into: a file where `steps` goes, a directory where the manifest goes
    (a symlink is left to the readers and writers, which refuse it themselves); with whether a
    directory goes there. None when neither is in the way."""
    for name, folder in ((STEPS_DIR, True), (MANIFEST_NAME, False)):
        place = path / name
        if os.path.lexists(place) and not os.path.islink(place) and place.is_dir() != folder:
            return place, folder
    return None


def refuse_in_the_way(path: Path) -> None:
    """WriteError when the run directory `path` of `stabledrl record`, or its `steps` or
    manifest, is something no run can be written into (a file where a directory goes):
    `record` checked them before its command started, so it came there while the command ran,
    and the run cannot be written (exit 4, as a step's write that fails on it later), where a
    Recorder refuses a path given so (exit 2). Called by record's own Recorder (the bootstrap)
    and by a script's Recorder of record's run alike."""
    found = (path, True) if os.path.lexists(path) and not path.is_dir() else in_the_way(path)
    if found is not None:
        place, folder = found
        code = errno.ENOTDIR if folder else errno.EISDIR
        raise write_error(place, OSError(code, os.strerror(code)))


def check_replaceable(path: Path) -> None:
    """UsageError when the directory `path` holds another tool's manifest.json (JSON that is
    no stabledrl run's manifest: an object of another kind, a list, a number...): replacing a
    run rewrites its manifest, and never overwrites that. A manifest that cannot be read as
    JSON (a damaged run's, a FIFO or a link put in its place) is a run's to replace. So is a
    UsageError a `steps` that is no directory (a file) or a manifest that is one: the new run
    could not be written there, and replacing a run removes its files, never another."""
    found = in_the_way(path)
    if found is not None:
        place, folder = found
        kept = "step files" if folder else "manifest"
        raise UsageError(
            f"{place}: not a {'directory' if folder else 'file'} (where a run keeps its "
            f"{kept}); replacing a run never removes it: remove it, or record elsewhere"
        )
    try:
        if manifest_now(path).get("format") == RUN_KIND:
            return
    except InputError:
        return
    except ValueError:  # JSON, but no object: no Recorder wrote it
        pass
    where = path / MANIFEST_NAME
    raise UsageError(
        f"{where} is not a stabledrl run's manifest: replacing a run would overwrite it; "
        "remove it, or record elsewhere"
    )


def new_run_id() -> str:
    """A run identity no other recording has: 32 random hex digits (random even under
    SOURCE_DATE_EPOCH, since two byte-identical recordings are still two runs)."""
    return uuid.uuid4().hex


def _check_compatible(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    defaults = {"group_ids": "per_rank", "loss_norm": "global"}
    for name in _MUST_AGREE:
        was, now = old.get(name, defaults.get(name)), new.get(name, defaults.get(name))
        if was != now:
            raise UsageError(
                f"cannot resume {path}: its {name} is {was!r}, this recorder's {now!r}"
            )
    was, now = (old.get("policy") or {}).get("spec"), (new.get("policy") or {}).get("spec")
    if not same_policy(was, now):  # (the run keeps its own spelling of it)
        raise UsageError(f"cannot resume {path}: its policy is {was!r}, this recorder's {now!r}")
    names, given = old.get("param_names"), new.get("param_names")
    if given is not None and given != names:  # (none given: the run's are kept, as its meta)
        had = counted(len(names), "name") if isinstance(names, list) else "none"
        raise UsageError(
            f"cannot resume {path}: its param_names are not this recorder's ({had}, "
            f"{len(given)} given)"
        )


def _records_again(stopped: object, resume_from: int | None) -> bool:
    """Whether a resume from `resume_from` records again the step whose failed write stopped
    the recording (the manifest's `recording_stopped` note): then the note, which says the
    later steps are missing, goes. A resume that appends keeps it."""
    step = stopped.get("step") if isinstance(stopped, dict) else None
    return isinstance(step, int) and resume_from is not None and resume_from <= step


def _resume(
    path: Path, manifest: dict[str, Any], rank: int, world_size: int, resume_from: int | None
) -> tuple[dict[str, Any], int | None]:
    existing = _read_manifest(path)
    _check_compatible(existing, manifest, path)
    existing.pop(RECORDING_CLOSED, None)
    last: int | None = None
    replaced: _Owned = []
    step_files, notes = _own_files(path / STEPS_DIR, rank, world_size)
    for file, step, temporary in step_files:
        if temporary or (resume_from is not None and step >= resume_from):
            replaced.append((file, step, temporary))
            continue
        try:
            read_header(file, deep=True)
        except StepReadError as exc:  # refused: nothing has changed, the mark stays
            raise InputError(
                f"cannot resume {path}: step {step} ({file.name}) is {exc.kind}: {exc}; "
                f"resume from step {step} or earlier"
            ) from None
        last = step if last is None else max(last, step)
    reopen_run(path, rank)  # before any step file changes
    stopped = existing.get(RECORDING_STOPPED) or {}
    if _records_again(stopped, resume_from) and rank in (0, stopped["rank"]):
        del existing[RECORDING_STOPPED]
        amend_manifest(path, RECORDING_STOPPED, None)
    elif is_stop_note(stopped) and stopped["rank"] == rank:
        resumed = {**stopped, STOP_RESUMED: True}
        with suppress(InputError):  # best effort: a manifest at its size bound keeps the note
            amend_manifest(path, RECORDING_STOPPED, resumed)
            existing[RECORDING_STOPPED] = resumed
    for note, note_rank, temporary in notes:
        kept = None if temporary else _stop_note_of(note, note_rank)
        if temporary or _records_again(kept, resume_from):
            _remove(note)
        elif kept is not None:  # its rank records again: a reader no longer waits on the stop
            write_atomic(note, note_text({**kept, STOP_RESUMED: True}))
    rewritten = {step for _, step, temporary in replaced if not temporary}
    whole = _whole_steps(path / STEPS_DIR, world_size) if rank and rewritten else set()
    # steps a reader may have read are written again (this rank's part): a new identity, before
    # they are removed (a resume cut short there leaves it) and again once they are gone
    renew = bool(rewritten) and (rank == 0 or not rewritten.isdisjoint(whole))
    if renew:
        existing[RUN_ID] = new_run_id()
        amend_manifest(path, RUN_ID, existing[RUN_ID])
    for file, _, _ in replaced:
        _remove(file)
    if renew:
        existing[RUN_ID] = new_run_id()
        amend_manifest(path, RUN_ID, existing[RUN_ID])
    return existing, last


def _readable_text(path: Path, manifest: dict[str, Any]) -> bytes:
    """The text of a new run's `manifest`, checked as its readers check it: a Recorder never
    writes a run that `open_run` refuses as corrupt (a world_size past its bound, a manifest
    past its size bound, ...). UsageError naming the reason."""
    text = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
    where = str(path / MANIFEST_NAME)
    try:
        check_manifest(parse_manifest(text, where), where)
    except InputError as exc:
        raise UsageError(
            f"{path}: not recorded, its readers would refuse the run's manifest ({exc})"
        ) from None
    return text


def prepare_run(
    path: Path,
    manifest: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    overwrite: bool,
    resume: bool,
    resume_from: int | None,
) -> tuple[dict[str, Any], int | None, WriterLock]:
    """Readies `path` (module docstring). Returns the run's manifest (the existing one when
    resuming), the last step this rank already holds (None for a new run) and the rank's
    writer lock, taken before any file changes (`_writer_lock`: UsageError while another live
    Recorder holds it); the caller releases it when it closes."""
    text = None
    if not resume:  # checked on every rank, before anything on disk changes
        fresh = {**manifest, RUN_ID: new_run_id()}
        text = _readable_text(path, fresh)
        manifest = fresh if rank == 0 else manifest
    is_dir = directory_or_nothing(path, str(path))
    steps = path / STEPS_DIR
    if os.path.islink(steps):  # its step files would be removed and written out of the run
        raise symlink_refused(str(steps))
    # Held before any file changes; a new run's steps/ is made first (nothing to guard yet).
    lock = hold_writer_lock(steps, rank, world_size) if steps.is_dir() else None
    try:
        try:
            manifest, last = _ready(
                path, manifest, is_dir, rank=rank, world_size=world_size, overwrite=overwrite,
                resume=resume, resume_from=resume_from,
            )  # fmt: skip
        except UsageError:
            if lock is None:  # steps/ made meanwhile, by a Recorder started with this one
                refuse_if_held(steps, rank, world_size)
            raise
        lock = lock or hold_writer_lock(steps, rank, world_size)
        if rank == 0 and text is not None:
            with _manifest_locked(path):
                _write_manifest(path, text)
            fsync_dir(path.parent if path.parent != path else path)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return manifest, last, lock


def _ready(
    path: Path,
    manifest: dict[str, Any],
    is_dir: bool,
    *,
    rank: int,
    world_size: int,
    overwrite: bool,
    resume: bool,
    resume_from: int | None,
) -> tuple[dict[str, Any], int | None]:
    """`prepare_run`'s changes to the directory but the new manifest: the resumed run's
    manifest and this rank's last step, or the run's files removed (overwrite=True), or its
    emptiness checked; then the directories made."""
    steps = path / STEPS_DIR
    last: int | None = None
    if resume:
        manifest, last = _resume(path, manifest, rank, world_size, resume_from)
    elif overwrite:
        check_replaceable(path)
        reopen_run(path, rank)  # before any step file changes
        for file, _number, _temporary in chain(*_own_files(steps, rank, world_size)):
            _remove(file)
        if rank == 0:
            _remove_os_files(path)
    elif is_dir:
        # Other ranks may have made steps/ already: only what this rank would clobber counts.
        # A file browser's file (.DS_Store: a folder made in Finder) makes no folder a run's.
        listed = os.listdir(path) if rank == 0 else []
        others = [n for n in listed if n != STEPS_DIR and not os_file(path / n)]
        mine = [file.name for file, _, _ in chain(*_own_files(steps, rank, world_size))]
        if MANIFEST_NAME in others:
            check_replaceable(path)  # another tool's: overwrite=True would not help either
        if others or mine:
            raise RunNotEmpty(path, (others + mine)[0])
    for directory in (path, steps):  # the line names the run when the run cannot be made
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(directory, exc) from None
    return manifest, last
