"""`open_run`: a run directory or a packed archive, behind the one Run API."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stabledrl_cli.dump._archive_reader import ArchiveRun
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.dump._run import Run
from stabledrl_cli.errors import InputError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def open_run(path: str | os.PathLike[str], *, verify: bool = True) -> Run:
    """Opens a run directory or a packed .h5 archive (`stabledrl pack`) for lazy reading.

    Raises InputError (exit 3) for a missing path, a non-run (a replay report included), or a
    newer major format version. `verify=False` skips the data checksum when arrays are read
    (headers are always checked).
    """
    run_path = Path(path)
    if not run_path.exists():
        raise InputError(f"no such run: {run_path}")
    if run_path.is_dir():
        return DirectoryRun(run_path, verify=verify)
    try:
        fd = os.open(run_path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise InputError(f"{run_path} is not a run (not a directory nor a regular file)")
            signature = fh.read(len(_HDF5_SIGNATURE))
    except OSError as exc:
        raise InputError(f"cannot read {run_path}: {exc.strerror or exc}") from None
    if signature == _HDF5_SIGNATURE:
        return ArchiveRun(run_path, verify=verify)
    raise InputError(f"{run_path} is not a run (expected a run directory or a .h5 archive)")
