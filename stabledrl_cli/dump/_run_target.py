"""Whether a path can take a run: a directory or nothing there, nothing in the way of its
steps or manifest, no other run's folder around it, no other tool's manifest that replacing a
run would overwrite; and the file browser's files (`os_file`: .DS_Store...) that make no
folder a run's."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from stabledrl_cli._atomic import write_error
from stabledrl_cli.dump._file_names import MANIFEST_NAME, OS_FILE_RE, STEPS_DIR
from stabledrl_cli.dump._manifest_edits import manifest_now
from stabledrl_cli.dump._versions import RUN_KIND
from stabledrl_cli.errors import InputError, UsageError

BRANCHES_DIR = "branches"
"""A run's sub-directory of branch runs (`RUN/branches/POLICY@STEP`)."""
CHECKPOINTS_DIR = "checkpoints"
"""A run's sub-directory of the built-in example's checkpoints (`RUN/checkpoints`)."""


def os_file(entry: Path) -> bool:
    """Whether `entry` is a file browser's file (`OS_FILE_RE`), not a folder so named."""
    return bool(OS_FILE_RE.match(entry.name)) and (entry.is_symlink() or not entry.is_dir())


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
    target = _missing_target(path)
    if target is not None:
        return f"is a symlink to {target}, which does not exist"
    return "exists and is not a directory"


def _missing_target(path: Path) -> str | None:
    """Where the symlink `path` leads when nothing is there, else None."""
    try:
        os.stat(path)
    except FileNotFoundError:
        with suppress(OSError):  # gone meanwhile, or made no link by another process
            return os.readlink(path)
    except OSError:  # a symlink loop, ...: something is there, and no directory
        pass
    return None


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


def refuse_under_a_file(path: Path, named: str) -> None:
    """UsageError `{named}: {folder} is not a directory` when the nearest of `path`'s folders
    that exists is no directory (a regular file, a FIFO, a device), or `... is a symlink to
    ..., which does not exist`: no run can be made below it. Anything else (a symlink loop) is
    left for the writes to refuse."""
    for folder in path.parents:
        if os.path.lexists(folder):
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise UsageError(f"{named}: {folder} is not a directory")
            if _missing_target(folder) is not None:
                raise UsageError(f"{named}: {folder} {_in_the_way(folder)}")
            return


def check_outside_run_folders(
    place: Path, run_dir: Path, *, what: str, run: str, given: str, branch: bool = False
) -> None:
    """UsageError when `place`, where `what` would be written (`a run`), lies in the steps,
    checkpoints or branches folder of the run at `run_dir`: that run would hold a file that is
    not its own, which recording over it (--force) refuses to remove. A `branch` run may be one
    folder down in the branches folder (RUN/branches/POLICY@STEP), where --force removes it.
    The line names the run as `run` and says to give another `given` (what named the place).
    A symlink loop on the way is left for the writes to refuse (`os.path.realpath`, not
    `resolve`, which raises RuntimeError on one before Python 3.13)."""
    where = Path(os.path.realpath(place))
    for folder in (STEPS_DIR, CHECKPOINTS_DIR, BRANCHES_DIR):
        inside = Path(os.path.realpath(run_dir)) / folder
        if branch and folder == BRANCHES_DIR and where.parent == inside:
            continue
        if where.is_relative_to(inside):
            raise UsageError(
                f"{place}: {what} would be inside the {folder} folder of {run}; pass another "
                f"{given}"
            )


def check_not_in_a_run(path: Path, given: str, *, branch: bool = False) -> None:
    """UsageError when a run at `path` would lie in the steps, checkpoints or branches folder
    of another run (a folder above it holding a manifest, a branch run's too:
    `check_outside_run_folders`, which says to give another `given`), or anywhere else inside
    a stabledrl run (RUN/sub: recording over that run, --force, would keep it, and its size
    and `pack`'s warning would count it); a `branch` run may be a run's RUN/branches/NAME. A
    folder whose manifest.json is another tool's (a web app's) holds no run: runs go below it."""
    runs = _manifest_parents(path)
    for parent in runs:  # a run's folders first: the line names the folder
        check_outside_run_folders(
            path, parent, what="a run", run=str(parent), given=given, branch=branch
        )
    where = Path(os.path.realpath(path))
    for parent in runs:
        run = Path(os.path.realpath(parent))
        nested = where != run and where.is_relative_to(run)  # (RUN/sub/.. is RUN itself)
        if nested and not (branch and where.parent == run / BRANCHES_DIR) and _a_run(parent):
            raise UsageError(
                f"{path}: a run would be inside the run {parent}; pass another {given}"
            )


def _manifest_parents(path: Path) -> list[Path]:
    """The folders above `path` that hold a manifest.json: as given first, then with links
    resolved (`os.path.realpath`, which leaves a symlink loop for the writes to refuse)."""
    parents = (*path.parents, *Path(os.path.realpath(path)).parents)
    return [parent for parent in parents if os.path.lexists(parent / MANIFEST_NAME)]


def run_holding(path: Path) -> Path | None:
    """The stabledrl run whose directory `path` lies in (`_manifest_parents` whose manifest
    reads as a run's: `_a_run`), or None: a file written there would replace a file of that
    run, kept nowhere else, or sit among its files."""
    return next((parent for parent in _manifest_parents(path) if _a_run(parent)), None)


def _a_run(path: Path) -> bool:
    """Whether `path` holds a stabledrl run: a manifest readable as one (`manifest_now`)."""
    try:
        return manifest_now(path).get("format") == RUN_KIND
    except (InputError, ValueError):
        return False


def check_out(out: Path) -> None:
    """UsageError when the --out of `record` or `import` cannot take a run: inside another
    run's folders (`check_not_in_a_run`) or under a file (`refuse_under_a_file`)."""
    check_not_in_a_run(out, "--out")
    refuse_under_a_file(out, f"--out {out}")


def check_replaceable(path: Path, elsewhere: str = "record elsewhere") -> None:
    """UsageError when the directory `path` holds another tool's manifest.json (JSON that is
    no stabledrl run's manifest: an object of another kind, a list, a number...): replacing a
    run rewrites its manifest, and never overwrites that. A manifest that cannot be read as
    JSON (a damaged run's, a FIFO or a link put in its place) is a run's to replace. So is a
    UsageError a `steps` that is no directory (a file) or a manifest that is one: the new run
    could not be written there, and replacing a run removes its files, never another. Each
    refusal ends with the remedy `remove it, or {elsewhere}`."""
    found = in_the_way(path)
    if found is not None:
        place, folder = found
        kept = "step files" if folder else "manifest"
        raise UsageError(
            f"{place}: not a {'directory' if folder else 'file'} (where a run keeps its "
            f"{kept}); replacing a run never removes it: remove it, or {elsewhere}"
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
        f"remove it, or {elsewhere}"
    )
