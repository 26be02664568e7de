"""W&B's run file (`wandb/run-<date>-<id>/run-<id>.wandb`, written locally for every run,
online or offline): its history, read without wandb.

The file is W&B's datastore: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then
LevelDB's log format: 32 KiB blocks of fragments, each a 7-byte header (the CRC-32 (zlib's)
of its type byte and data, its length, its type: full, or first, middle and last of a record
split across blocks) and its data; a block's last 6 bytes or fewer, too few for a header, are
zeros. A record is a protobuf `wandb_internal_pb2.Record`. Its `history` (one `wandb.log`
call: items of a key, or nested keys joined with `.`, and a `value_json`) is one row, its step
under the step metric the run declared for every metric (a `metric` record:
`define_metric("*", step_metric=...)`, `train/global_step` in transformers' and so TRL's
callback) from its declaration on, else as JSON lines' rows are (`step_key_from`: W&B's
`_step`, where verl logs its step); a media value (an item group
with a `_type`: a table, an image, a histogram) is not a scalar. The `config` (in the `run`
record and in `config` records) gives transformers' `logging_steps`, the `run` record its
id, name and project (`StepTable.tracker_run`). System metrics, the
summary, console output and files are other records, not read.

The file is read as it was when opened. An unfinished last fragment or record (a run still
being written, or stopped mid-write) is ignored with a warning; a checksum mismatch, a
fragment that does not fit its block or its place, or a malformed protobuf is an InputError
naming the file and the byte offset.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from stabledrl_cli._json import parse_strict
from stabledrl_cli.errors import InputError, counted, quoted
from stabledrl_cli.importers._files import ENTRY_LIMIT, open_log, subdirectories
from stabledrl_cli.importers._names import NAME_LIMIT, listed, step_key_from
from stabledrl_cli.importers._proto import (
    FIXED64,
    LENGTH,
    VARINT,
    ProtoError,
    fields,
    float64,
    text,
)
from stabledrl_cli.importers._table import ROW_NAME_LIMIT, StepTable
from stabledrl_cli.importers._tfevents import RECORD_LIMIT
from stabledrl_cli.importers._trainer_state import whole_logging_steps

HEADER = b":W&B\xe1\xbe\x00"
"""The datastore's identifier, magic (0xBEE1, little-endian) and version (0)."""
WANDB_PATTERN = "run-*.wandb"
WANDB_LIMIT = 256 << 20
"""Largest run file read (its records are parsed in Python: 5 to 12 MB/s measured)."""
_BLOCK = 32 << 10
_FRAGMENT = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_HISTORY, _CONFIG, _METRIC, _RUN = 2, 5, 12, 17
"""Record fields read; RunRecord.config is field 4."""
_RUN_NAMES = {1: "id", 8: "name", 3: "project"}
"""RunRecord fields kept as the manifest's `source.tracker_run`."""
_NOT_JSON = object()
"""A value_json that is not JSON: not a number."""
_SHORT = 64
_Groups = dict[str | None, "_Groups"]
"""Media key groups as a tree of their keys (`_group`)."""
_DECODER = json.JSONDecoder()
"""JSON, NaN and Infinity read as such (as Python's writer and wandb write them)."""


def wandb_files(path: Path) -> list[str]:
    """The names of directory `path`'s own W&B run files (among its first ENTRY_LIMIT
    entries), sorted; none when it cannot be listed."""
    found = []
    try:
        for number, entry in enumerate(path.iterdir()):
            if number >= ENTRY_LIMIT:
                break
            if entry.match(WANDB_PATTERN):
                found.append(entry.name)
    except OSError:
        pass  # read, and refused, as a directory of no log
    return sorted(found)


def read_wandb(path: Path, step_key: str | None = None) -> StepTable:
    """The steps of a W&B run file's history (InputError when it is not one)."""
    table = StepTable(str(path), preempts=True, typed=True)
    declared = first = None
    rows = keyed = not_json = 0
    with open_log(path, WANDB_LIMIT) as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(HEADER)) != HEADER:
            raise InputError(f"{path}: not a W&B run file (no `:W&B` datastore header)")
        for offset, record in _records(handle, path, table, size):
            try:
                found = _history_or_config(record, table)
            except ProtoError as exc:
                raise InputError(
                    f"{path}: record at byte {offset} is not a W&B record ({exc})"
                ) from None
            if found is None:
                continue
            if isinstance(found, str):
                declared = found
                continue
            values, bad = found
            not_json += bad
            where = f"{path}: record at byte {offset}"
            if step_key is not None:
                key = step_key
            else:  # the rows before, keyed by `first`, may share numbers with the rows after
                found = declared or step_key_from(values, first, where)
                key = first = table.keyed_by(first, found, where)
            rows, keyed = rows + 1, keyed + (key in values)
            table.add(values.pop(key, None), values)
    if rows and not keyed:  # only a key given by --step-key can be missing from every row
        raise InputError(
            f"{path}: none of its {counted(rows, 'history row')} has the step key "
            f"{quoted(str(step_key))}"
        )
    if not_json:
        table.warnings.append(f"{path}: {counted(not_json, 'history value')} not JSON, dropped")
    others = other_parts(path)
    if others:
        held = "holds the other's" if len(others) == 1 else "hold the others'"
        table.warnings.append(
            f"{path}: W&B run {path.name[4:-6]} was resumed: this file holds one start's "
            f"history; {listed(others)} beside it {held}, not imported (import each on its own)"
        )
    return table


def run_id(directory: str) -> str:
    """The run id of a W&B run directory's name (`run-20261206_074646-<id>`,
    `offline-run-...`; an id may hold a `-`)."""
    return directory.partition("run-")[2].partition("-")[2]


def other_parts(path: Path) -> list[str]:
    """The run directories beside the one of run file `path` (`wandb/run-<date>-<id>/run-<id>
    .wandb`) that hold the same run's file: wandb writes each start of a resumed run
    (`wandb.init(id=..., resume=...)`) into a directory of its own, its history from that
    start on. Empty for a file outside such a folder."""
    if not (path.name.startswith("run-") and path.name.endswith(".wandb")):
        return []
    run = path.parent.resolve()  # wandb/latest-run is a link to one of them
    return subdirectories(
        run.parent,
        lambda d: (
            run_id(d.name) == path.name[4:-6] and (d / path.name).is_file() and d.resolve() != run
        ),
    )


def _records(
    handle: BinaryIO, path: Path, table: StepTable, size: int
) -> Iterator[tuple[int, memoryview]]:
    """(offset, data) of each whole record within the file's first `size` bytes, its
    fragments' checksums verified."""
    offset = len(HEADER)
    parts: list[bytes] = []
    start = held = 0
    while offset < size:
        room = _BLOCK - offset % _BLOCK
        if room < _FRAGMENT.size:
            handle.read(room)
            offset += room
            continue
        header = handle.read(min(_FRAGMENT.size, size - offset))
        if len(header) < _FRAGMENT.size:
            break
        checksum, length, kind = _FRAGMENT.unpack(header)
        if not (checksum or length or kind):  # zeros: the rest of the block is padding
            handle.read(min(room, size - offset) - _FRAGMENT.size)
            offset += min(room, size - offset)
            continue
        if length > room - _FRAGMENT.size or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise InputError(f"{path}: byte {offset}: not a W&B record fragment (corrupt?)")
        data = handle.read(min(length, size - offset - _FRAGMENT.size))
        if len(data) < length:
            break
        if zlib.crc32(data, zlib.crc32(bytes((kind,)))) != checksum:
            raise InputError(f"{path}: record at byte {offset}: checksum mismatch")
        if (kind in (_FULL, _FIRST)) == bool(parts):
            raise InputError(f"{path}: byte {offset}: a record fragment out of order (corrupt?)")
        if kind in (_FULL, _FIRST):
            start = offset
        held += length
        if held > RECORD_LIMIT:
            raise InputError(
                f"{path}: record at byte {start} is over the {RECORD_LIMIT >> 20} MiB record limit"
            )
        parts.append(data)
        offset += _FRAGMENT.size + length
        if kind in (_FULL, _LAST):
            yield start, memoryview(b"".join(parts))
            parts, held = [], 0
    if offset < size or parts:
        where = start if parts else offset
        table.warnings.append(f"{path}: unfinished last record ignored (byte {where})")


def _history_or_config(
    record: memoryview, table: StepTable
) -> tuple[dict[str, object], int] | str | None:
    """A history record's (row, values that are not JSON); the step metric a metric record
    declares for every metric (`define_metric("*", step_metric=...)`); a config's
    `logging_steps` noted in `table`; None for any other record."""
    for number, wire, value in fields(record):
        if wire != LENGTH:
            continue
        assert isinstance(value, memoryview)
        if number == _HISTORY:
            return _row(value, table)
        if number == _METRIC:
            return _step_metric(value, table)
        if number == _CONFIG:
            _config(value, table)
        elif number == _RUN:
            for inner, inner_wire, part in fields(value):
                if inner_wire != LENGTH:
                    continue
                assert isinstance(part, memoryview)
                if inner == 4:
                    _config(part, table)
                elif inner in _RUN_NAMES and len(part) <= NAME_LIMIT:
                    table.tracker_run[_RUN_NAMES[inner]] = text(part)
    return None


def _row(history: memoryview, table: StepTable) -> tuple[dict[str, object], int]:
    """A HistoryRecord's items by name (nested keys joined with `.`), its media left out."""
    items: list[tuple[tuple[str, ...], object]] = []
    for number, wire, body in fields(history):
        if number == 1 and wire == LENGTH:
            assert isinstance(body, memoryview)
            items.append(_item(body))
            if len(items) > ROW_NAME_LIMIT:
                raise InputError(
                    f"{table.where}: a history row of more than {ROW_NAME_LIMIT:,} values, more "
                    "than a log holds"
                )
    media: _Groups = {}
    for keys, _ in items:
        if len(keys) > 1 and keys[-1] == "_type":
            node = media
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[None] = {}
    values: dict[str, object] = {}
    not_json = 0
    for keys, value in items:
        group = _group(keys, media)
        if group is not None:
            values[".".join(group)] = {}  # a JSON object: not a scalar (StepTable.add)
            continue
        not_json += value is _NOT_JSON
        values[".".join(keys)] = value
    return values, not_json


def _group(keys: tuple[str, ...], media: _Groups) -> tuple[str, ...] | None:
    """The media group `keys` is in (its shortest proper prefix that is one), else None;
    `media` holds the groups as a tree of their keys, None marking a group's end, so a row is
    read in time linear in its keys however deep they nest."""
    node = media
    for n, key in enumerate(keys[:-1], 1):
        found = node.get(key)
        if found is None:
            return None
        if None in found:
            return keys[:n]
        node = found
    return None


def _item(item: memoryview) -> tuple[tuple[str, ...], object]:
    """A HistoryItem's keys and value: its value_json (or json) parsed, NaN and Infinity read
    as such, or its typed number (wandb 0.31 writes value_json alone)."""
    key: list[str] = []
    nested: list[str] = []
    value: object = None
    for number, wire, raw in fields(item):
        if number == 1:
            key = [text(raw)]
        elif number == 2:
            nested.append(text(raw))
        elif number in (8, 16):
            value = _json(raw)
        elif number == 6 and wire == FIXED64:
            assert isinstance(raw, int)
            value = float64(raw)
        elif number == 5 and wire == VARINT:  # sint64, zigzag
            assert isinstance(raw, int)
            value = (raw >> 1) ^ -(raw & 1)
    return tuple(nested or key), value


def _json(raw: int | memoryview) -> object:
    """A value_json's value, _NOT_JSON when it is not JSON (a number's, up to 64 bytes, by
    a decoder made once: a row holds tens of them)."""
    if isinstance(raw, int):
        raise ProtoError("a string field with a numeric wire type")
    try:
        if len(raw) <= _SHORT:
            return _DECODER.decode(bytes(raw).decode())
        return parse_strict(bytes(raw), "", "value", allow_nan=True)
    except (InputError, ValueError):  # UnicodeDecodeError and JSONDecodeError too
        return _NOT_JSON


def _step_metric(metric: memoryview, table: StepTable) -> str | None:
    """A MetricRecord's step_metric when its glob_name is `*` (every metric), else None;
    InputError for one longer than a metric name (each warning naming the step key would be
    as long)."""
    found = {n: text(v) for n, w, v in fields(metric) if n in (2, 4) and w == LENGTH}
    step_metric = found.get(4) or None if found.get(2) == "*" else None
    if step_metric is not None and len(step_metric) > NAME_LIMIT:
        raise InputError(f"{table.where}: a step metric name longer than {NAME_LIMIT} characters")
    return step_metric


def _config(config: memoryview, table: StepTable) -> None:
    """A ConfigRecord's `logging_steps` (transformers') into `table`."""
    for number, wire, update in fields(config):
        if number != 1 or wire != LENGTH:
            continue
        assert isinstance(update, memoryview)
        pairs = list(fields(update))
        if any(n == 1 and text(v) == "logging_steps" for n, w, v in pairs if w == LENGTH):
            raw = next((v for n, w, v in pairs if n == 16), None)
            if raw is not None and not isinstance(raw, int):
                table.logging_steps = whole_logging_steps(_json(raw))
