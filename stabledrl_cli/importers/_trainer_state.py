"""transformers' `trainer_state.json` (TRL writes the same file): its `log_history`, or that
list saved alone (`json.dump(trainer.state.log_history, f)`: a JSON array of its rows), or
any JSON array of rows (pandas' `to_json(orient="records")` of a W&B history).

Each entry of `log_history` is one logged row with its `step` (the optimizer step); an array's
rows have theirs under the key given, else as JSON lines' rows (`step_key_from`: the first of
`STEP_KEYS` its first row has, W&B's `_step` giving way to another; `step` in a
log_history).
An array's rows are JSON lines' in other framing: a row that goes back in steps is a restarted
run's, dropping its metrics' later steps (`StepTable.preempts`); a trainer_state.json's
log_history is restored from its checkpoint by a resumed run, so its later row of a step wins.
Evaluation rows (`eval_*` metrics) and the end-of-training summary (`train_runtime`,
`train_loss`, ...) are skipped; NaN and Infinity, which Python's JSON writer emits, are read
as such. The file's `logging_steps` (a whole number from 1 to STEP_LIMIT) says the rows were
written every k steps: the table keeps it (`StepTable.logging_steps`); the list saved alone
does not say.
"""

from __future__ import annotations

from pathlib import Path

from stabledrl_cli._json import parse_strict
from stabledrl_cli.dump._schema import STEP_LIMIT
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.importers._files import DOCUMENT_LIMIT, open_log
from stabledrl_cli.importers._names import WANDB_STEP, step_key_from
from stabledrl_cli.importers._table import CELL_LIMIT, StepTable

VALUE_LIMIT = 2 * CELL_LIMIT
"""Most JSON values (`json_items`, counted before parsing) a trainer_state.json may hold: it
is parsed whole, and the parsed values cost 30 to 100 times their bytes (an empty object 3
bytes, about 80 parsed). Twice the values an import holds leaves room for the rows'
bookkeeping."""


def bounded_json_document(path: Path, what: str = "trainer_state.json") -> object:
    """The parsed JSON document at `path` (`what` names it in messages: a trainer_state.json,
    or TensorBoard's per-tag JSON), read bounded (a regular file of at most DOCUMENT_LIMIT
    bytes and VALUE_LIMIT values) and strict (`parse_strict`, NaN and Infinity read as such);
    InputError, one line, when it is not JSON within those bounds."""
    with open_log(path, DOCUMENT_LIMIT) as handle:
        raw = handle.read(DOCUMENT_LIMIT + 1)
    return parse_strict(raw, str(path), what, allow_nan=True, max_items=VALUE_LIMIT)


def _rows(document: list[object]) -> bool:
    """Whether a JSON array is a log_history of its own (`json.dump(trainer.state.log_history,
    f)`): it begins with an object."""
    return bool(document) and isinstance(document[0], dict)


def whole_logging_steps(value: object) -> int | None:
    """transformers' `logging_steps` as a whole number >= 1 (TrainingArguments holds a float:
    2.0 is 2); None for anything else (a ratio of the run's steps is saved resolved; a number
    past the largest step, STEP_LIMIT, is no setting: no row ends such a span, and its digits,
    309 of 1e308, would be the summary's line)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not (1 <= value <= STEP_LIMIT and value == int(value)):  # NaN fails: no comparison holds
        return None
    return int(value)


def read_trainer_state(path: Path, step_key: str | None = None) -> StepTable:
    """The steps of a trainer_state.json, or of its `log_history` saved alone or another JSON
    array of rows (their step under `step_key`, default the first of `STEP_KEYS` the first row
    has); InputError when it is neither, UsageError for a `step_key` of a trainer_state.json
    (its rows' step is `step`)."""
    document = bounded_json_document(path)
    history = document.get("log_history") if isinstance(document, dict) else document
    if not isinstance(history, list) or (history is document and not _rows(history)):
        raise InputError(
            f"{path}: not a trainer_state.json (no log_history list, nor a list of its rows)"
        )
    table = StepTable(str(path), preempts=history is document)
    key: str | None = "step"
    if isinstance(document, dict):
        if step_key is not None:
            raise UsageError(
                f"{path}: a trainer_state.json's rows give their step as step: no step key applies"
            )
        table.logging_steps = whole_logging_steps(document.get("logging_steps"))
    else:
        key = step_key
    keyed_by_rows = key is None  # as JSON lines are
    for number, entry in enumerate(history, 1):
        if not isinstance(entry, dict):
            table.skipped_rows["not an object"] += 1
            continue
        table.typed |= WANDB_STEP in entry
        if keyed_by_rows:
            where = f"{path}: entry {number}"
            key = table.keyed_by(key, step_key_from(entry, key, where), where)
        table.add(entry.get(key), {k: v for k, v in entry.items() if k != key})
    return table
