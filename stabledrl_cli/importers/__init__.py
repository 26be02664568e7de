"""Runs that were only logged, as scalar runs: `import_log(SRC, OUT)`.

Readers, one per kind of log, gather the log's rows into a `StepTable` (`_table`, bounded);
`_names` maps the logged names to the run's scalars; `_build` writes one scalar step per logged
step with the Recorder. docs/importing.md describes the formats, the name map and every rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.importers._build import ImportSummary, write_scalar_run
from stabledrl_cli.importers._csvlog import read_csv
from stabledrl_cli.importers._detect import detect_format, directory_refused, log_path
from stabledrl_cli.importers._jsonl import read_jsonl
from stabledrl_cli.importers._names import STANDARD_SOURCES
from stabledrl_cli.importers._table import StepTable, dropped_text, skipped_text
from stabledrl_cli.importers._tbjson import read_tensorboard_json
from stabledrl_cli.importers._tfevents import read_tfevents
from stabledrl_cli.importers._trainer_state import read_trainer_state
from stabledrl_cli.importers._verl_console import read_verl_console
from stabledrl_cli.importers._wandb import read_wandb
from stabledrl_cli.vocab import IMPORT_FORMATS, ImportFormat

__all__ = [
    "IMPORT_FORMATS",
    "STANDARD_SOURCES",
    "ImportSummary",
    "StepTable",
    "detect_format",
    "import_log",
    "read_log",
]

_READERS: dict[ImportFormat, Callable[[Path, str | None], StepTable]] = {
    "trainer_state": read_trainer_state,
    "jsonl": read_jsonl,
    "csv": read_csv,
    "tfevents": lambda path, _key: read_tfevents(path),
    "tensorboard_json": lambda path, _key: read_tensorboard_json(path),
    "verl_console": lambda path, _key: read_verl_console(path),
    "wandb": read_wandb,
}


def read_log(
    source: str | os.PathLike[str],
    log_format: ImportFormat | None = None,
    step_key: str | None = None,
) -> tuple[Path, ImportFormat, StepTable]:
    """(the file or directory read, its format, its steps). `log_format` None: detected.
    step_key: the JSON-lines or JSON array rows' key or CSV column holding the step (default:
    detected)."""
    if log_format is not None and log_format not in IMPORT_FORMATS:
        raise UsageError(f"format {log_format!r} is not one of: {', '.join(IMPORT_FORMATS)}")
    if step_key == "":  # an unset variable: the defaults were not asked for
        raise UsageError("a step key must name a key or column; got an empty one")
    path = log_path(Path(source), log_format)
    found = log_format or detect_format(path)
    if found != "tfevents" and path.is_dir():
        raise directory_refused(path, found)
    if step_key is not None and found not in ("jsonl", "csv", "trainer_state", "wandb"):
        raise UsageError(
            f"a step key applies to jsonl, csv and W&B logs and JSON arrays of rows, not to {found}"
        )
    return path, found, _READERS[found](path, step_key)


def import_log(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    log_format: ImportFormat | None = None,
    step_key: str | None = None,
    overwrite: bool = False,
    reward_range: tuple[float, float] | None = None,
) -> ImportSummary:
    """Reads the log at `source` and writes its training steps as a scalar run at `out`,
    whose reward spans `reward_range` (low, high) when given (the collapse rule's floor).

    InputError (exit 3) for an unreadable log or one with no training step; the Recorder's
    errors for `out` (UsageError when it holds a run and not `overwrite`; WriteError).
    """
    path, found, table = read_log(source, log_format, step_key)
    if not table.steps:
        skipped = [skipped_text(table.skipped_rows)] if table.skipped_rows else []
        dropped = [dropped_text(table.non_numeric)] if table.non_numeric else []
        notes = "; ".join([*skipped, *dropped, *table.warnings])
        notes = f" ({notes})" if notes else ""
        raise InputError(f"{path}: no training step in this log{notes}")
    return write_scalar_run(
        table, out, log_format=found, source=path, overwrite=overwrite, reward_range=reward_range
    )
