"""`open_run`: a run directory or a packed archive, behind the one Run API."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli._url import is_url, slashless_hint
from stabledrl_cli.dump._arguments import path_argument, switch_argument
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._file_names import HDF5_SIGNATURE
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._versions import NotARun
from stabledrl_cli.errors import InputError, UsageError


def open_run(path: str | os.PathLike[str], *, verify: bool = True) -> Run:
    """Opens a run directory or a packed .h5 archive (`stabledrl pack`) for lazy reading, at
    a path or an fsspec URL (`memory://`, `file://`, `s3://`...; docs/scaling.md).

    Raises InputError (exit 3) for a missing path, a non-run (a replay report included), or a
    newer major format version; UsageError (exit 2) for a `path` that is empty or no str or
    path object (None, bytes, a number) or a `verify` that is not True or False.
    `verify=False` skips the data checksum when arrays are read (headers are always checked).
    """
    given = path_argument(path)  # as the user wrote it: Path drops a doubled or trailing slash
    verify = switch_argument(verify, "verify")
    if isinstance(path, str) and is_url(path):
        from stabledrl_cli.dump._remote import open_url

        return open_url(path, verify=verify)
    run_path = Path(path)
    try:
        is_dir = stat.S_ISDIR(run_path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"no such run: {given}{slashless_hint(given)}") from None
    except OSError as exc:  # a symlink loop, a name longer than the file system takes, ...
        raise InputError(f"cannot read {given}: {exc.strerror or exc}") from None
    if is_dir:
        return DirectoryRun(run_path, verify=verify)
    try:
        fh, _ = open_regular(run_path)  # a FIFO must not block the open
        with fh:
            signature = fh.read(len(HDF5_SIGNATURE))
    except NotRegularFile:
        raise NotARun(f"{given} is not a run (not a directory nor a regular file)") from None
    except OSError as exc:
        raise InputError(f"cannot read {given}: {exc.strerror or exc}") from None
    if signature == HDF5_SIGNATURE:
        from stabledrl_cli.dump._archive_reader import ArchiveRun

        return ArchiveRun(run_path, verify=verify)
    raise NotARun(f"{given} is not a run (expected a run directory or a .h5 archive)")


def packed_run(path: Path) -> str | None:
    """What `path` is when it is a regular file that opens as a run, `pack`'s archive, which a
    report written there would replace, and which may be the run's only copy: "a packed run",
    or "maybe a packed run this version cannot read" (newer, damaged, cut short: kept too).
    None for a replay report, an HDF5 file of another kind, a device, a link to nothing or
    any other file."""
    try:
        if not path.is_file():
            return None
        open_run(path).close()
    except (OSError, NotARun):
        return None
    except InputError:
        return "maybe a packed run this version cannot read"
    return "a packed run"


@contextmanager
def opened_run(run: str | os.PathLike[str] | Run) -> Iterator[Run]:
    """`run` opened for the block (a Run given is the caller's, left open); an archive opened
    here is closed at the block's end, whether the block succeeded or failed: the error a
    caller keeps holds the block's frames, which would keep the file open."""
    if isinstance(run, Run):
        yield run
        return
    if not isinstance(run, (str, os.PathLike)):
        raise UsageError(f"run must be a path, a URL or an opened Run, not {type(run).__name__}")
    opened = open_run(run)
    try:
        yield opened
    finally:
        opened.close()


def run_to_come(path: Path) -> bool:
    """Whether `path` is a directory or nothing yet, under a directory: a run that a watch
    waits for, its manifest landing later. Anything else (a packed archive, a FIFO or device
    that never becomes a run, a path under a regular file, a symlink loop) is opened as it
    is, so a non-run is refused, not waited on."""
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except FileNotFoundError:
        pass  # nothing there yet (a dangling symlink too: what it names may come)
    except OSError:
        return False
    existing = next((p for p in path.absolute().parents if p.exists()), None)
    return existing is not None and existing.is_dir()


def open_snapshot(given: str | os.PathLike[str]) -> Run:
    """The run `given`, read for the rest of the command as listed now (`Run.snapshot`): every
    figure of the command's output comes from the same steps."""
    opened = open_run(given)
    opened.hold_listing()
    return opened
