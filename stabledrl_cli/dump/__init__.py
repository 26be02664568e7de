"""The on-disk run format (v1): `Recorder` writes a run directory, `pack_run` packs it into one
HDF5 file, `open_run` reads either."""

from __future__ import annotations

from stabledrl_cli.dump._integrity import Finding, IntegrityReport, RunIntegrityWarning
from stabledrl_cli.dump._open import open_run
from stabledrl_cli.dump._packer import PackSummary, pack_run
from stabledrl_cli.dump._run import Run, Step
from stabledrl_cli.dump._schema import FIELDS, FORMAT_VERSION, RUN_KIND
from stabledrl_cli.dump._writer import Recorder

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
