"""The on-disk run format (v1): `Recorder` writes a run directory, `pack_run` packs it into one
HDF5 file, `open_run` reads either. Each name is imported on first use (PEP 562), so a
recorded process, which needs only the `Recorder`, never imports the readers (h5py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stabledrl_cli._lazy import lazy_getattr

if TYPE_CHECKING:
    from stabledrl_cli.dump._integrity import Finding, IntegrityReport, RunIntegrityWarning
    from stabledrl_cli.dump._open import open_run
    from stabledrl_cli.dump._packer import PackSummary, pack_run
    from stabledrl_cli.dump._run import Run
    from stabledrl_cli.dump._schema import FIELDS
    from stabledrl_cli.dump._step import Step
    from stabledrl_cli.dump._versions import FORMAT_VERSION, RUN_KIND
    from stabledrl_cli.dump._writer import Recorder

# Public name -> the module that defines it.
_HOMES: dict[str, str] = {
    "FIELDS": "stabledrl_cli.dump._schema",
    "FORMAT_VERSION": "stabledrl_cli.dump._versions",
    "RUN_KIND": "stabledrl_cli.dump._versions",
    "Finding": "stabledrl_cli.dump._integrity",
    "IntegrityReport": "stabledrl_cli.dump._integrity",
    "PackSummary": "stabledrl_cli.dump._packer",
    "Recorder": "stabledrl_cli.dump._writer",
    "Run": "stabledrl_cli.dump._run",
    "RunIntegrityWarning": "stabledrl_cli.dump._integrity",
    "Step": "stabledrl_cli.dump._step",
    "open_run": "stabledrl_cli.dump._open",
    "pack_run": "stabledrl_cli.dump._packer",
}

__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "RUN_KIND",
    "Finding",
    "IntegrityReport",
    "PackSummary",
    "Recorder",
    "Run",
    "RunIntegrityWarning",
    "Step",
    "open_run",
    "pack_run",
]


__getattr__ = lazy_getattr(__name__, _HOMES, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
