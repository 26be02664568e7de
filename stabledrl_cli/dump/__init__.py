"""The on-disk run format (v1): `Recorder` writes a run directory, `open_run` reads it."""

from __future__ import annotations

from stabledrl_cli.dump._integrity import Finding, IntegrityReport, RunIntegrityWarning
from stabledrl_cli.dump._reader import Run, Step, open_run
from stabledrl_cli.dump._schema import FIELDS, FORMAT_VERSION, RUN_KIND
from stabledrl_cli.dump._writer import Recorder

__all__ = [
    "FIELDS",
    "FORMAT_VERSION",
    "RUN_KIND",
    "Finding",
    "IntegrityReport",
    "Recorder",
    "Run",
    "RunIntegrityWarning",
    "Step",
    "open_run",
]
