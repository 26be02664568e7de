"""JSON lines: one object per line, each a logged row with a step key.

The step key is the first of `STEP_KEYS` the first row has (or the one given); W&B's `_step`
gives way to another from the row that first holds it on (`step_key_from`: a W&B export's
`train/global_step`). A row may hold
its metrics at the top level or, as verl's file logger writes them, under `data`
(`{"step": 3, "data": {...}}`); there a `null` value is NaN: verl's metrics are numbers (its
TensorBoard logger takes no other), and the orjson it writes them with spells NaN and the
infinities `null`, so a non-finite grad norm or loss stays one. Blank lines are ignored; a
line that is not a JSON object is an InputError naming it, except an unfinished last line (no
newline: a writer was stopped), which is ignored with a warning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stabledrl_cli._json import parse_strict
from stabledrl_cli.errors import InputError, counted, quoted
from stabledrl_cli.importers._files import text_lines
from stabledrl_cli.importers._names import WANDB_STEP, step_key_from
from stabledrl_cli.importers._table import StepTable


def read_jsonl(path: Path, step_key: str | None = None) -> StepTable:
    """The steps of a JSON-lines log (InputError when it is not one)."""
    table = StepTable(str(path), preempts=True)
    key = step_key
    rows = keyed = 0
    for number, text, ended in text_lines(path):
        if not text.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = parse_strict(text, where, "JSON line", allow_nan=True)
        except InputError:
            if ended:
                raise
            table.warnings.append(f"{where}: unfinished last line ignored")
            break
        if not isinstance(row, dict):
            raise InputError(f"{where}: not a JSON object")
        values, verl = _flattened(row)
        table.nonfinite_null |= verl
        table.typed |= WANDB_STEP in values
        if step_key is None:
            key = table.keyed_by(key, step_key_from(values, key, where), where)
        else:
            key = step_key
        rows, keyed = rows + 1, keyed + (key in values)
        table.add(values.pop(key, None), values)
    if rows and not keyed:  # only a key given by --step-key can be missing from every row
        raise InputError(
            f"{path}: no row of {counted(rows, 'row')} has the step key {quoted(str(step_key))}"
        )
    return table


def _flattened(row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(verl's `{"step": s, "data": {...}}` as one flat row, a null value read as NaN (what
    orjson wrote so), True); any other row as it is, False."""
    data = row.get("data")
    if isinstance(data, dict) and all(k in ("step", "data") for k in row):
        values = {k: math.nan if v is None else v for k, v in data.items()}
        return {**values, **{k: v for k, v in row.items() if k != "data"}}, True
    return row, False
