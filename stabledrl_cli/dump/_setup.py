"""Readying a run directory for a Recorder: a new run, an overwritten one, or a resumed one.

In each case the rank's writer lock (`_writer_lock`) is held first: nothing changes while
another live Recorder of the rank records into the directory.

- New (the default): the directory must be absent or empty of what this recorder would write
  (for rank 0: anything besides steps/; for every rank: its own step and note files). Another
  rank that finds rank 0's manifest there must agree with it on unit, world_size, group_ids,
  loss_norm and the policy spec (else UsageError).
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

Ranks change the manifest one at a time (`_manifest_edits`), each change made to the
manifest as the others left it.

Any failure to write or remove a file is WriteError naming it. A new run's making cut short
(Ctrl-C, a failed write), before the Recorder is made, is undone: the manifest it wrote and the
directories it made are removed while no rank's file is in them (`_unmake`); so is an
overwrite's where no run was (no manifest), never one that replaced a run.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import chain
from pathlib import Path
from typing import Any

from stabledrl_cli._atomic import fsync_dir, write_error
from stabledrl_cli._run_env import force_taken, note_overwrite, records_out
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._file_names import MANIFEST_NAME, STEP_FILE_RE, STEPS_DIR
from stabledrl_cli.dump._manifest import RUN_ID, check_manifest, parse_manifest
from stabledrl_cli.dump._manifest_edits import (
    manifest_now,
    new_run_id,
    reopen_run,
    write_new_manifest,
)
from stabledrl_cli.dump._rank_files import own_files, remove_file
from stabledrl_cli.dump._resume import check_same_run, resume_run
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._run_target import (
    check_replaceable,
    directory_or_nothing,
    in_the_way,
    os_file,
)
from stabledrl_cli.dump._writer_lock import WriterLock, hold_writer_lock, refuse_if_held
from stabledrl_cli.errors import InputError, UsageError

RECORD_FORCE_HINT = (
    "to record into it (a new recording replaces its run; one that resumes it continues it: "
    "TRL's train(resume_from_checkpoint=...), a script's log_policy_batch with recorder_kwargs "
    "resume=True)"
)
"""How `stabledrl record --force` records into an --out that holds a run: told by record's
own check before the command starts, and by its command's Recorder (`RunNotEmpty`)."""


class RunNotEmpty(UsageError):
    """A Recorder's refusal of a directory that is not empty (neither overwrite=True nor
    resume=True given), naming the first file found (`found`) and those two arguments (of a
    Recorder of `rank` under `stabledrl record --force`, when an earlier process of the
    command made the run: `earlier_process`). The Recorder that `stabledrl record -- CMD`
    makes for its command says `for_record` instead, a trainer `saying` its own arguments:
    the user typed a command, or a trainer's arguments, not a Recorder's."""

    def __init__(self, path: Path, found: str, rank: int = 0) -> None:
        self.path, self.found, self.rank = path, found, rank
        self.refused = f"{path} already exists and is not empty ({found})"
        if records_out(path) and force_taken(rank):
            message = self.earlier_process(
                "a later Recorder continues it with resume=True (overwrite=True replaces it)"
            )
        else:
            message = (
                f"{self.refused}; pass overwrite=True to replace the run, or resume=True to "
                "continue it"
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[type[RunNotEmpty], tuple[Path, str, int]]:
        return type(self), (self.path, self.found, self.rank)  # (the arguments are not args)

    def advised(self, under_record: str, elsewhere: str | None = None) -> UsageError:
        """The refusal in the words of the Recorder's caller: at `stabledrl record`'s --out,
        record's (`for_record`, a later process continuing the run as `under_record` says);
        elsewhere with `elsewhere` in place of the Recorder's arguments (`saying`), or as it
        is (a script's own Recorder: its arguments are the caller's)."""
        if records_out(self.path):
            return self.for_record(under_record)
        return self if elsewhere is None else self.saying(elsewhere)

    def saying(self, advice: str) -> UsageError:
        """The refusal with `advice` in place of the Recorder's arguments: how the user of
        the Recorder's caller (a trainer taking arguments of its own) replaces or continues
        the run."""
        return UsageError(f"{self.refused}; {advice}")

    def for_record(self, continues: str) -> UsageError:
        """The refusal as `stabledrl record`'s: a run that appeared in --out after record
        checked it (another job recording there), or that an earlier process of the command
        made (`earlier_process`), which a later one of the opener at hand continues as
        `continues` says."""
        if force_taken(self.rank):
            return UsageError(self.earlier_process(continues))
        return self.saying(f"run `stabledrl record --force` {RECORD_FORCE_HINT}")

    def earlier_process(self, continues: str) -> str:
        """The refusal of a run that an earlier process of record's command made (`python
        a.py && python b.py`), one that took --force for the rank (`_run_env.force_taken`),
        and how a later one `continues` it. A run that holds no step (the earlier process's
        first step failed) is said to be one."""
        made = "recorded it" if _holds_a_step(self.path) else "replaced it and recorded no step"
        return (
            f"{self.refused}: an earlier process of the command {made} (--force replaces the "
            f"run once); {continues}"
        )


def _holds_a_step(path: Path) -> bool:
    """Whether the run at `path` holds a step file of any rank."""
    try:
        names = os.listdir(path / STEPS_DIR)
    except OSError:
        return False
    return any(STEP_FILE_RE.match(name) for name in names)


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
                remove_file(folder / name)


def remove_stepless_run(path: Path) -> None:
    """Removes the run at `path` when it holds no step (an empty steps directory): its
    manifest and steps directory, the directory left as a new run finds it. WriteError when
    the manifest cannot be removed."""
    try:
        (path / STEPS_DIR).rmdir()
    except OSError:  # a step or a note there: the run stays
        return
    remove_file(path / MANIFEST_NAME)


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


@contextmanager
def prepared_run(
    path: Path,
    manifest: dict[str, Any],
    *,
    rank: int,
    world_size: int,
    overwrite: bool,
    resume: bool,
    resume_from: int | None,
) -> Iterator[tuple[dict[str, Any], int | None, WriterLock]]:
    """Readies `path` (module docstring) for the block, the Recorder's making. Gives the run's
    manifest (the existing one when resuming), the last step this rank already holds (None
    for a new run) and the rank's writer lock, taken before any file changes
    (`_writer_lock`: UsageError while another live Recorder holds it); the caller releases it
    when it closes. Cut short, here or in the block (Ctrl-C, a failed write), the lock is
    released and a new run unmade (`_unmake`), an overwrite's too where no run was before."""
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
    made: list[Path] = []
    # a new run's, or an overwrite's where no run was: undone if cut short (never another's)
    unmade = text is not None and not (overwrite and os.path.lexists(path / MANIFEST_NAME))
    try:
        try:
            manifest, last = _ready(
                path, manifest, is_dir, made, rank=rank, world_size=world_size,
                overwrite=overwrite, resume=resume, resume_from=resume_from,
            )  # fmt: skip
        except UsageError:
            if lock is None:  # steps/ made meanwhile, by a Recorder started with this one
                refuse_if_held(steps, rank, world_size)
            raise
        lock = lock or hold_writer_lock(steps, rank, world_size)
        if rank == 0 and text is not None:
            write_new_manifest(path, text)
            fsync_dir(path.parent if path.parent != path else path)
        yield manifest, last, lock
    except BaseException:
        if lock is not None:
            lock.release()
        if unmade:
            _unmake(path, made, manifest.get(RUN_ID) if rank == 0 else None)
        raise


def _unmake(path: Path, made: list[Path], run_id: object) -> None:
    """Undoes a new run's making cut short: its manifest, when it is the one of `run_id` and
    steps/ holds nothing (no rank's file), then the directories `made` (the folders above
    the run that it made too) while empty. The
    directory reads as it did before: a new Recorder, or `record` without --force, records
    into it. Best effort."""
    with suppress(OSError, InputError, ValueError):
        ours = run_id is not None and manifest_now(path).get(RUN_ID) == run_id
        if ours and not os.listdir(path / STEPS_DIR):
            os.unlink(path / MANIFEST_NAME)
    for directory in reversed(made):
        with suppress(OSError):
            directory.rmdir()


def _check_rank_0s(path: Path, manifest: dict[str, Any], rank: int) -> None:
    """UsageError when the manifest rank 0 wrote (if it has: ranks start together; or an
    earlier recording's, which rank 0 refuses too) says another unit, world_size, group_ids,
    loss_norm or policy than this rank's `manifest` (`check_same_run`): the rank's steps
    would be read as the run's. A manifest no reader reads is left for the readers to
    report."""
    try:
        run = DirectoryRun(path).manifest
    except (InputError, OSError):
        return
    check_same_run(run, manifest, f"{path}: rank {rank} cannot join the run there")


def _ready(
    path: Path,
    manifest: dict[str, Any],
    is_dir: bool,
    made: list[Path],
    *,
    rank: int,
    world_size: int,
    overwrite: bool,
    resume: bool,
    resume_from: int | None,
) -> tuple[dict[str, Any], int | None]:
    """`prepared_run`'s changes to the directory but the new manifest: the resumed run's
    manifest and this rank's last step, or the run's files removed (overwrite=True), or its
    emptiness checked; then the directories made (those it makes added to `made`)."""
    steps = path / STEPS_DIR
    last: int | None = None
    if resume:
        manifest, last = resume_run(path, manifest, rank, world_size, resume_from)
    elif overwrite:
        check_replaceable(path)
        reopen_run(path, rank)  # before any step file changes
        note_overwrite(path)  # record's run: `record` hears it was replaced, not resumed
        for file, _number, _temporary in chain(*own_files(steps, rank, world_size)):
            remove_file(file)
        if rank == 0:
            _remove_os_files(path)
    elif is_dir:
        # Other ranks may have made steps/ already: only what this rank would clobber counts.
        # A file browser's file (.DS_Store: a folder made in Finder) makes no folder a run's.
        listed = os.listdir(path) if rank == 0 else []
        others = [n for n in listed if n != STEPS_DIR and not os_file(path / n)]
        others.sort(key=lambda name: name != MANIFEST_NAME)  # the refusal names a run as one
        mine = [file.name for file, _, _ in chain(*own_files(steps, rank, world_size))]
        if MANIFEST_NAME in others:
            check_replaceable(path)  # another tool's: overwrite=True would not help either
        if others or mine:
            raise RunNotEmpty(path, (others + mine)[0], rank)
        if rank != 0:
            _check_rank_0s(path, manifest, rank)
    # One at a time, the run's missing folders too: each one made is unmade if cut short.
    for directory in (*_missing_folders(path), path, steps):
        try:
            directory.mkdir()
            made.append(directory)
        except FileExistsError as exc:
            if not directory.is_dir():  # a file, made meanwhile
                raise write_error(directory, exc) from None
        except OSError as exc:  # the line names the run when the run cannot be made
            raise write_error(steps if directory == steps else path, exc) from None
    return manifest, last


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, outermost first."""
    missing: list[Path] = []
    for folder in path.parents:
        if os.path.lexists(folder):
            break
        missing.insert(0, folder)
    return missing
