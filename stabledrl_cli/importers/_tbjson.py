"""TensorBoard's per-tag JSON export (the JSON download of a scalar chart): one JSON array of
`[wall time, step, value]` entries, named as the per-tag CSV export (`run-X-tag-TAG.json`),
whose metric it names the same way. Read bounded as trainer_state.json is (one document)."""

from __future__ import annotations

from pathlib import Path

from stabledrl_cli.errors import InputError
from stabledrl_cli.importers._csvlog import per_tag_metric
from stabledrl_cli.importers._table import StepTable
from stabledrl_cli.importers._trainer_state import bounded_json_document

_WHAT = "TensorBoard's per-tag JSON"


def read_tensorboard_json(path: Path) -> StepTable:
    """The steps of a TensorBoard per-tag JSON export (InputError when it is not one)."""
    document = bounded_json_document(path, _WHAT)
    if not isinstance(document, list):
        raise InputError(f"{path}: not {_WHAT} (a list of [wall time, step, value])")
    metric = per_tag_metric(path)
    table = StepTable(str(path), preempts=True)
    for number, entry in enumerate(document, 1):
        if not isinstance(entry, list) or len(entry) != 3:
            raise InputError(f"{path}: entry {number} is not [wall time, step, value]")
        table.add(entry[1], {metric: entry[2]})
    return table
