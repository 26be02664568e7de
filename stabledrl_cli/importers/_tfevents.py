"""TensorBoard event files (`events.out.tfevents.*`): a file, or a directory's own files.

A file is a sequence of TFRecords: an 8-byte length, the masked CRC-32C of those 8 bytes, the
data, the masked CRC-32C of the data; both checksums are verified. Each record is an `Event`
protobuf (step = field 2, summary = field 5); each `Summary.Value` (tag = 1) holds a
`simple_value` (2, what torch's SummaryWriter.add_scalar writes) or a `tensor` (8, what
`tf.summary.scalar` writes), read when it is a numeric 0-d tensor of a tag whose plugin is
`scalars` or unnamed. Images, histograms, text and other plugins' tensors are left out.

Files are read in name order (their names start with the time they were created), records in
file order, so when two events give one tag at one step the later one wins, and, as TensorBoard
shows a run restarted from a checkpoint, an event that gives a tag an earlier step than the
tag's last one drops the tag's values at the steps after it, and a SessionLog START event
at step s (`SummaryWriter(purge_step=s)`: a run restarted there) drops every tag's values at s
and after, as TensorBoard does. A record longer
than RECORD_LIMIT, a checksum mismatch or a malformed protobuf is an InputError naming the file
and the record's offset; an unfinished last record (the writer was stopped mid-write) is
ignored with a warning.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from stabledrl_cli.errors import InputError
from stabledrl_cli.importers._crc32c import masked_crc32c
from stabledrl_cli.importers._files import checked_size, open_log, subdirectories
from stabledrl_cli.importers._names import listed
from stabledrl_cli.importers._proto import (
    FIXED32,
    FIXED64,
    LENGTH,
    VARINT,
    Field,
    ProtoError,
    fields,
    first_element,
    float32,
    float64,
    signed64,
    text,
)
from stabledrl_cli.importers._table import ROW_NAME_LIMIT, StepTable

TFEVENTS_LIMIT = 256 << 20
"""Most bytes of event files read in one import (checksums are computed in Python)."""
RECORD_LIMIT = 32 << 20
"""Longest record read (bytes; a scalar event takes tens)."""
FILE_LIMIT = 10_000
"""Most event files in one directory."""
EVENT_PATTERN = "events.out.tfevents.*"

# TensorFlow DataType -> (the TensorProto field holding it, its element wire type, the struct
# format of one element of tensor_content). Half and bfloat16 values travel as int bits.
_DTYPES: dict[int, tuple[int, int, str]] = {
    1: (5, FIXED32, "<f"),  # DT_FLOAT: float_val
    2: (6, FIXED64, "<d"),  # DT_DOUBLE: double_val
    3: (7, VARINT, "<i"),  # DT_INT32: int_val
    4: (7, VARINT, "<B"),  # DT_UINT8
    5: (7, VARINT, "<h"),  # DT_INT16
    6: (7, VARINT, "<b"),  # DT_INT8
    9: (10, VARINT, "<q"),  # DT_INT64: int64_val
    10: (11, VARINT, "<?"),  # DT_BOOL: bool_val
    14: (13, VARINT, "<H"),  # DT_BFLOAT16: half_val (bits)
    19: (13, VARINT, "<e"),  # DT_HALF: half_val (bits)
}
_BFLOAT16, _HALF, _FLOAT = 14, 19, 1
_SESSION_START = 1
"""SessionLog.status START: a run (re)started at the event's step."""


def event_files(path: Path) -> list[Path]:
    """The event files of `path` (a file, or a directory's own event files in name order). A
    name of the pattern that is no regular file (a FIFO, whose open would block) is kept, for
    `checked_size` to refuse before any is read."""
    if not path.is_dir():
        return [path]
    found = []
    for entry in path.iterdir():
        if entry.match(EVENT_PATTERN):
            found.append(entry)
            if len(found) > FILE_LIMIT:
                raise InputError(f"{path}: more than {FILE_LIMIT} event files")
    if not found:
        raise InputError(f"{path}: no {EVENT_PATTERN} file in it")
    return sorted(found)


def holds_events(path: Path) -> bool:
    """Whether directory `path` holds event files of its own (a TensorBoard run)."""
    return any(path.glob(EVENT_PATTERN))


def read_tfevents(path: Path) -> StepTable:
    """The scalar steps of a TensorBoard log (InputError when it is not one)."""
    files = event_files(path)
    total = sum(checked_size(f, TFEVENTS_LIMIT) for f in files)
    if total > TFEVENTS_LIMIT:
        raise InputError(f"{path}: {total} bytes of event files, over {TFEVENTS_LIMIT >> 20} MiB")
    table = StepTable(str(path), preempts=True)
    plugins: dict[str, str] = {}
    for file in files:
        with open_log(file, TFEVENTS_LIMIT) as handle:
            size = os.fstat(handle.fileno()).st_size
            for offset, record in _records(handle, file, table, size):
                where = f"{file}: record at byte {offset}"
                try:
                    _add_event(record, table, plugins, where)
                except ProtoError as exc:
                    raise InputError(f"{where} is not a TensorBoard event ({exc})") from None
    runs = subdirectories(path, holds_events) if path.is_dir() else []
    if runs:
        held = (
            "holds a TensorBoard run of its own" if len(runs) == 1
            else "hold TensorBoard runs of their own"
        )  # fmt: skip
        table.warnings.append(
            f"{path}: {listed(runs)} {held} (add_scalars writes one per key, add_hparams one "
            "per call), not imported: import each on its own"
        )
    return table


def _records(
    handle: BinaryIO, file: Path, table: StepTable, size: int
) -> Iterator[tuple[int, memoryview]]:
    """(offset, data) of each record within the file's first `size` bytes (its size when it was
    opened: records a live writer appends later are not read, or the import of a log written
    faster than its checksums are computed would never end), both checksums verified."""
    offset = 0
    while True:
        header = handle.read(min(12, size - offset))
        if not header:
            return
        if len(header) < 12:
            table.warnings.append(f"{file}: unfinished last record ignored (byte {offset})")
            return
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc32c(header[:8]) != length_crc:
            raise InputError(f"{file}: record at byte {offset}: length checksum mismatch")
        if length > RECORD_LIMIT:
            raise InputError(
                f"{file}: record at byte {offset} claims {length} bytes, over the "
                f"{RECORD_LIMIT >> 20} MiB record limit"
            )
        body = handle.read(min(length + 4, size - offset - 12))
        if len(body) < length + 4:
            table.warnings.append(f"{file}: unfinished last record ignored (byte {offset})")
            return
        data = memoryview(body)[:length]
        if masked_crc32c(data) != int.from_bytes(body[length:], "little"):
            raise InputError(f"{file}: record at byte {offset}: data checksum mismatch")
        yield offset, data
        offset += 16 + length


def _add_event(record: memoryview, table: StepTable, plugins: dict[str, str], where: str) -> None:
    """Adds an Event's scalar summary values to `table` as one row (`where` names the record:
    an event of more tags than a log holds is refused as they are read)."""
    step: int | None = 0
    values: dict[str, object] = {}
    restarted = False
    for number, wire, value in fields(record):
        if number == 2 and wire == VARINT:
            assert isinstance(value, int)
            step = signed64(value)
        elif number == 7 and wire == LENGTH:  # session_log
            assert isinstance(value, memoryview)
            restarted = any(
                n == 1 and w == VARINT and v == _SESSION_START for n, w, v in fields(value)
            )
        elif number == 5 and wire == LENGTH:
            assert isinstance(value, memoryview)
            for summary_field in fields(value):
                if summary_field[0] == 1 and summary_field[1] == LENGTH:
                    _add_value(summary_field, values, plugins, table)
                    if len(values) > ROW_NAME_LIMIT:
                        raise InputError(
                            f"{where}: an event of more than {ROW_NAME_LIMIT:,} scalar tags, "
                            "more than a log holds"
                        )
    if restarted and step is not None and step >= 0:
        table.restart(step)
    if values:
        table.add(step, values)


def _add_value(
    field: Field, values: dict[str, object], plugins: dict[str, str], table: StepTable
) -> None:
    """One Summary.Value: its tag's scalar into `values`, or the tag noted as not a scalar."""
    _, _, body = field
    assert isinstance(body, memoryview)
    tag = ""
    simple: float | None = None
    tensor: memoryview | None = None
    plugin: str | None = None
    other = False
    for number, wire, value in fields(body):
        if number == 1 and wire == LENGTH:
            tag = text(value)
        elif number == 2 and wire == FIXED32:
            assert isinstance(value, int)
            simple = float32(value)
        elif number == 8 and wire == LENGTH:
            assert isinstance(value, memoryview)
            tensor = value
        elif number == 9 and wire == LENGTH:
            assert isinstance(value, memoryview)
            plugin = _plugin_name(value)
        elif number in (3, 4, 5, 6):  # old-style histogram, image, histo, audio
            other = True
    if not tag:
        return
    if plugin is not None:
        plugins.setdefault(tag, plugin)
    scalar = simple
    if scalar is None and tensor is not None and plugins.get(tag, "scalars") == "scalars":
        scalar = _scalar_tensor(tensor)
    if scalar is None or other:
        table.leave_out(tag, "not a scalar")
        return
    values[tag] = scalar


def _plugin_name(metadata: memoryview) -> str | None:
    """SummaryMetadata.plugin_data.plugin_name."""
    for number, wire, value in fields(metadata):
        if number == 1 and wire == LENGTH:
            assert isinstance(value, memoryview)
            for inner, inner_wire, name in fields(value):
                if inner == 1 and inner_wire == LENGTH:
                    return text(name)
    return None


def _scalar_tensor(tensor: memoryview) -> float | None:
    """The value of a numeric 0-d TensorProto, None for any other tensor."""
    dtype = 0
    is_scalar = True
    content: memoryview | None = None
    raw: dict[int, tuple[int, int | memoryview]] = {}
    for number, wire, value in fields(tensor):
        if number == 1 and wire == VARINT:
            assert isinstance(value, int)
            dtype = value
        elif number == 2 and wire == LENGTH:
            assert isinstance(value, memoryview)
            is_scalar = not any(n in (2, 3) for n, _, _ in fields(value))
        elif number == 4 and wire == LENGTH:
            assert isinstance(value, memoryview)
            content = value
        else:
            raw.setdefault(number, (wire, value))
    if dtype not in _DTYPES or not is_scalar:
        return None
    val_field, element, fmt = _DTYPES[dtype]
    if content is not None and len(content):
        if len(content) != struct.calcsize(fmt):
            return None
        (number,) = struct.unpack(fmt, content)
        return _from_bits(dtype, number) if dtype == _BFLOAT16 else float(number)
    if val_field not in raw:
        return None
    bits = first_element(*raw[val_field], element)
    if bits is None:
        return None
    if element == VARINT and dtype not in (_BFLOAT16, _HALF):
        return float(signed64(bits))
    return _from_bits(dtype, bits)


def _from_bits(dtype: int, bits: int) -> float:
    """A value from its bits as a TensorProto carries them."""
    if dtype == _BFLOAT16:
        return float32((bits & 0xFFFF) << 16)
    if dtype == _HALF:
        return float(struct.unpack("<e", (bits & 0xFFFF).to_bytes(2, "little"))[0])
    if dtype == _FLOAT:
        return float32(bits)
    return float64(bits)
