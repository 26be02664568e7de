"""A log's steps written as a scalar run, and the summary of what went where."""

from __future__ import annotations

import math
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabledrl_cli._json import unicode_text
from stabledrl_cli.dump._file_names import MANIFEST_NAME, STEPS_DIR, step_file_name
from stabledrl_cli.dump._schema import SERIES_SCALARS, STANDARD_SCALARS
from stabledrl_cli.dump._writer import Recorder
from stabledrl_cli.importers._names import LOGGED_AFTER_THE_STEP, NameMap, lookup_name, map_names
from stabledrl_cli.importers._table import StepTable
from stabledrl_cli.vocab import ImportFormat


@dataclass
class ImportSummary:
    """What `import_log` read and wrote."""

    source: str
    format: ImportFormat
    out: str
    steps: int
    first_step: int
    last_step: int
    mapped: dict[str, str]
    """Standard scalar -> the logged name it was read from."""
    extra: dict[str, str]
    """Logged name -> the extra scalar it was kept as."""
    counts: dict[str, int]
    """Scalar of the run -> steps that have it."""
    nonfinite: dict[str, int]
    """Scalar of the run -> steps where it is NaN or infinite (only those with any)."""
    skipped_rows: dict[str, int]
    """Why rows were skipped -> how many."""
    not_imported: dict[str, str]
    """Logged name left out -> why (bookkeeping, eval, summary, not a scalar)."""
    non_numeric: dict[str, int]
    """Logged name -> values dropped because they are not numbers."""
    replaced: int
    """Values replaced by a later row of the same step."""
    preempted: int
    """Values at steps after the one a restarted run logged again, dropped (and, in
    TensorBoard, every value from the step a SessionLog START gives on)."""
    warnings: list[str] = field(default_factory=list)
    logging_steps: int | None = None
    """k of a log that says it was written every k steps (trainer_state.json's
    `logging_steps`, kept in the manifest's `source`); None where it does not say."""

    def to_dict(self) -> dict[str, Any]:
        """The `import --format json` object."""
        return dict(self.__dict__)


def write_scalar_run(
    table: StepTable,
    out: str | os.PathLike[str],
    *,
    log_format: ImportFormat,
    source: Path,
    overwrite: bool,
    reward_range: tuple[float, float] | None = None,
) -> ImportSummary:
    """Writes `table`'s steps to a new run at `out` (a scalar step each, policy unknown).
    Stopped midway (Ctrl-C, a failed write), it leaves no run there (`_discard`)."""
    mapping = map_names(table.names, (*STANDARD_SCALARS, *SERIES_SCALARS))
    mapped = {standard: name for name, standard in mapping.standard.items()}
    name = unicode_text(source.name)  # a lone surrogate would make the manifest unreadable
    origin: dict[str, object] = {
        "kind": "import",
        "format": log_format,
        "file": name,
        "mapped": mapped,
    }
    if table.logging_steps is not None:  # its rows are means over that many steps
        origin["logging_steps"] = table.logging_steps
    if table.nonfinite_null:  # its NaN may have been an infinity
        origin["nonfinite_null"] = True
    if table.tracker_run:
        origin["tracker_run"] = table.tracker_run
    counts: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    ordered = sorted(table.steps)
    warnings = list(table.warnings)
    shifted = _shift_to_the_step_that_used_it(table, mapping)
    if shifted:
        warnings.append(shifted)
    existed = os.path.lexists(out)
    recorder = Recorder(
        out,
        policy=None,
        source=origin,
        overwrite=overwrite,
        reward_range=reward_range,
        async_writes=True,
    )
    try:
        with recorder:
            for step in ordered:
                standard, extra = _split(table.steps[step], mapping)
                for name, value in (*standard.items(), *extra.items()):
                    counts[name] = counts.get(name, 0) + 1
                    if not math.isfinite(value):
                        nonfinite[name] = nonfinite.get(name, 0) + 1
                recorder.log_step(step, **standard, scalars=extra or None)
    except BaseException:
        _discard(recorder.path, ordered, existed)
        raise
    return ImportSummary(
        source=str(source),
        format=log_format,
        out=str(out),
        steps=len(ordered),
        first_step=ordered[0],
        last_step=ordered[-1],
        mapped=mapped,
        extra=dict(mapping.extra),
        counts=counts,
        nonfinite=nonfinite,
        skipped_rows=dict(table.skipped_rows),
        not_imported=dict(table.not_imported),
        non_numeric=dict(table.non_numeric),
        replaced=table.replaced,
        preempted=table.preempted,
        warnings=warnings,
        logging_steps=table.logging_steps,
    )


def _shift_to_the_step_that_used_it(table: StepTable, mapping: NameMap) -> str | None:
    """Moves each value of a LOGGED_AFTER_THE_STEP source mapped to a standard scalar from
    the step that logged it to the next step (s + 1), the step whose update used it: the
    first step is left without one, and a value logged at a step whose next one the log
    lacks (its last) is dropped. A step keeps its place with no value left. Returns the note
    for the summary's warnings (None when nothing moved)."""
    names = [n for n in mapping.standard if lookup_name(n) in LOGGED_AFTER_THE_STEP]
    if not names:
        return None
    for name in names:
        values = {s: row.pop(name) for s, row in table.steps.items() if name in row}
        for step, value in values.items():
            if step + 1 in table.steps:
                table.steps[step + 1][name] = value
    shown = ", ".join(names)
    return (
        f"{shown} logged at step s is the learning rate set after step s's update: imported "
        "as step s + 1's (the one its update used), so the first step has none"
    )


def _discard(run: Path, steps: list[int], existed: bool) -> None:
    """Removes an unfinished import's manifest first (`run` is no run from then on), then the
    step files it wrote, then the directories it made (best effort: each removal on its own).
    The Recorder marked the run closed as its block ended: left, it would read as a whole
    import of part of the log."""
    with suppress(OSError):
        (run / MANIFEST_NAME).unlink(missing_ok=True)
    for step in steps:
        with suppress(OSError):
            (run / STEPS_DIR / step_file_name(step, 0, 1)).unlink(missing_ok=True)
    if not existed:
        for directory in (run / STEPS_DIR, run):
            with suppress(OSError):
                directory.rmdir()


def _split(row: dict[str, float], mapping: NameMap) -> tuple[dict[str, float], dict[str, float]]:
    """A step's values as (standard scalars, extra scalars), under their run names."""
    standard = {mapping.standard[n]: v for n, v in row.items() if n in mapping.standard}
    extra = {mapping.extra[n]: v for n, v in row.items() if n in mapping.extra}
    return standard, extra
