"""What the built-in example leaves beside its run (its checkpoints and its branch runs), which
a run recorded over it (`record --force`) must not keep: listed and refused before anything is
removed, then removed. Imports no torch: `record` checks them before the command starts."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from stabledrl_cli._atomic import write_error
from stabledrl_cli.capture.branch_protocol import BRANCHES_DIR, checkpoints_dir, list_checkpoints
from stabledrl_cli.dump._file_names import (
    MANIFEST_NAME,
    STEP_FILE_RE,
    STEPS_DIR,
    STOP_NOTE_RE,
    TEMP_FILE_RE,
    TEMP_STOP_NOTE_RE,
    WRITER_LOCK_RE,
)
from stabledrl_cli.dump._run_files import symlink_refused
from stabledrl_cli.dump._run_target import check_replaceable, os_file
from stabledrl_cli.errors import UsageError

TEMP_CHECKPOINT_RE = re.compile(r"^\.step-[0-9]{8}\.pt\.tmp-[0-9]+\Z")
"""A checkpoint still being written (`_atomic.temp_name`), or left by a writer killed then."""


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """The entries of a run's checkpoints folder named as checkpoints (a run recorded again
    over it must not keep stale ones), and those a killed writer left under their temporary
    names: whatever each is (a directory so named too, which the caller judges)."""
    directory = checkpoints_dir(run_dir)
    paths = [path for _, path in list_checkpoints(run_dir)]
    if directory.is_dir():
        paths += [p for p in directory.iterdir() if TEMP_CHECKPOINT_RE.match(p.name)]
    return paths


_RUN_FILES = (STEP_FILE_RE, TEMP_FILE_RE, STOP_NOTE_RE, TEMP_STOP_NOTE_RE, WRITER_LOCK_RE)
"""The names of what a Recorder leaves in a run's steps/ folder."""
_TEMP_MANIFEST_RE = re.compile(rf"^\.{re.escape(MANIFEST_NAME)}\.tmp-[0-9a-f-]+\Z")
"""A manifest a killed Recorder left half-written (`_manifest_edits._write_manifest`)."""


def _run_files(run: Path) -> list[Path]:
    """The files of the branch run `run` (its manifest, its steps/ folder's step files, notes,
    locks and temporaries, and a file browser's files in either folder), folders last;
    UsageError naming the first other entry, or a manifest that is no stabledrl run's."""
    files: list[Path] = []

    def refused(entry: Path) -> UsageError:
        return UsageError(
            f"{entry}: not a file of a branch run; recording over the run (--force) removes "
            "its branches, never another file: remove it, or record elsewhere"
        )

    if os.path.islink(run) or not run.is_dir():
        raise refused(run)
    for entry in sorted(run.iterdir()):
        if entry.name == STEPS_DIR and entry.is_dir() and not entry.is_symlink():
            for name in sorted(os.listdir(entry)):
                known = any(pattern.match(name) for pattern in _RUN_FILES)
                if not known and not os_file(entry / name):
                    raise refused(entry / name)
                files.append(entry / name)
            files.append(entry)
        elif entry.name == MANIFEST_NAME or _TEMP_MANIFEST_RE.match(entry.name):
            if entry.name == MANIFEST_NAME:
                check_replaceable(run)
            files.append(entry)
        elif os_file(entry):
            files.append(entry)
        else:
            raise refused(entry)
    return [*files, run]


def old_branches(run_dir: Path) -> list[Path]:
    """The files of the branch runs of the run at `run_dir` (RUN/branches, `stabledrl branch`),
    folders after their contents; [] without any. A run recorded again over (`record --force`)
    must not keep the branches of the run it replaces. Refused before anything is removed:
    RUN/branches as a symlink (InputError), as no folder (a file, which `branch` could never
    write into) or anything in it that is not a branch run (UsageError naming it); a file
    browser's file (.DS_Store) in it or in a branch run goes with them."""
    base = run_dir / BRANCHES_DIR
    if os.path.islink(base):
        raise symlink_refused(str(base))
    if not os.path.lexists(base):
        return []
    if not base.is_dir():
        raise UsageError(
            f"{base}: not a folder of branch runs; recording over the run (--force) removes "
            "its branches, never another file: remove it, or record elsewhere"
        )
    files = [
        path
        for run in sorted(base.iterdir())
        for path in ([run] if os_file(run) else _run_files(run))
    ]
    return [*files, base]


def old_run_files(run_dir: Path) -> list[Path]:
    """What the built-in example wrote beside the run at `run_dir` that a run recorded over it
    must not keep: its checkpoints (`checkpoint_files`, and their folder when it holds no other
    file: `_checkpoints_folder`) and its branch runs (`old_branches`), folders after their
    contents. Refused as those refuse, before anything is removed; a
    UsageError names an entry named as a checkpoint that is no file (a directory
    `step-00000008.pt`: the new run would save its checkpoint there, or `branch` read it), and
    `run_dir` holding such files but no run (no manifest): they are no run's (a project's own
    `checkpoints/step-00001000.pt`), and --force replaces a run only."""
    checkpoints = checkpoint_files(run_dir)
    for path in checkpoints:
        if not path.is_symlink() and not path.is_file():
            raise UsageError(
                f"{path}: not a checkpoint file; recording over the run (--force) removes its "
                "checkpoints, never another file: remove it, or record elsewhere"
            )
    branches = old_branches(run_dir)
    if not os.path.lexists(run_dir / MANIFEST_NAME):
        if checkpoints or branches:
            raise UsageError(
                f"{[*checkpoints, *branches][0]}: no run's ({run_dir} holds no "
                f"{MANIFEST_NAME}); recording over a run (--force) removes its checkpoints and "
                "branches, never what is no run's: remove it, or record elsewhere"
            )
        return []
    return [*checkpoints, *_checkpoints_folder(run_dir, checkpoints), *branches]


def _checkpoints_folder(run_dir: Path, checkpoints: list[Path]) -> list[Path]:
    """The run's checkpoints folder, after a file browser's files in it, when it holds nothing
    else than those and `checkpoints`: a run recorded over it looks like a new one, with no
    empty RUN/checkpoints (the example makes it again when it saves one). [] when it holds
    anything else (a file of the user's), or is not there."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    rest = [path for path in folder.iterdir() if path not in checkpoints]
    return [*rest, folder] if all(os_file(path) for path in rest) else []


def remove_old_run_files(files: list[Path]) -> None:
    """Removes the `files` of `old_run_files`; WriteError naming one that cannot be removed. A
    folder that something came into since the list was made (a checkpoint of the new run) is
    kept, with it."""
    for path in files:
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                continue
            raise write_error(path, exc) from None
