# ruff: noqa: E501  (the CASES table keeps one case a line)
"""The hostile-input corpus, built by code from a tiny good run (no committed binaries).

Each `Case` makes one broken or crafted input under a temporary directory and says what
`stabledrl COMMAND INPUT` must do with it: the exact exit code, and (for exit 0) the finding
kind `inspect --format json` reports. `tests/test_hostile_inputs.py` runs every case;
`benchmarks/fuzz_readers.py` starts from the same good files.

Step files are rewritten with valid checksums (`rewrite_step`) where a case tests what lies
behind the CRCs (a crafted file, not a corrupt one); archives are edited with h5py.
"""

from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import stabledrl_cli as sd
from stabledrl_cli.dump import open_run, pack_run
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc
from stabledrl_cli.dump._stfile import canonical_crc as _canonical_crc
from stabledrl_cli.importers._crc32c import masked_crc32c
from stabledrl_cli.importers._wandb import HEADER as WANDB_HEADER

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


_MADE: dict[tuple[str, int, int], Path] = {}
"""The good run (and its archive) of each (kind, steps, world_size), made once a process and
copied for each input: a Recorder's fsynced writes take about 0.1 s a run, and most cases
make one or two."""


def _made(kind: str, steps: int, world_size: int) -> Path:
    """The process's own copy of a good run ("run") or its archive ("archive"): made at the
    first call (removed at exit), never edited (callers copy it)."""
    key = (kind, steps, world_size)
    if key not in _MADE:
        home = Path(tempfile.mkdtemp(prefix="stabledrl-corpus-"))
        atexit.register(_remove, home, os.getpid())
        run = _record_tiny_run(home / "run", steps, world_size)
        if kind == "archive":
            pack_run(open_run(run), home / "run.h5")
        _MADE[key] = home / ("run.h5" if kind == "archive" else "run")
    return _MADE[key]


def _remove(home: Path, owner: int) -> None:
    """Removes `home` at the exit of the process that made it (not of a child forked since)."""
    if os.getpid() == owner:
        shutil.rmtree(home, ignore_errors=True)


def tiny_run(path: Path, *, steps: int = STEPS, world_size: int = 1) -> Path:
    """A good run: `steps` steps of 4 sequences x 3 tokens with reward, group_id, token_ids
    (a fresh copy of the one recorded per process: `_made`)."""
    shutil.copytree(_made("run", steps, world_size), path, copy_function=shutil.copy)
    return path


def _record_tiny_run(path: Path, steps: int, world_size: int) -> Path:
    """Records `tiny_run`'s run at `path`."""
    rng = np.random.default_rng(0)
    for rank in range(world_size):
        with sd.Recorder(
            path, policy="grpo", reward_range=(0.0, 1.0), world_size=world_size, rank=rank
        ) as rec:
            for step in range(steps):
                logp = -rng.random((4, 3)).astype(np.float32)
                rec.log_step(
                    step,
                    logp=logp,
                    logp_old=logp + 0.01,
                    advantages=rng.standard_normal(4).astype(np.float32),
                    mask=np.ones((4, 3)),
                    group_id=np.array([0, 0, 1, 1]),
                    reward=rng.random(4).astype(np.float32),
                    token_ids=rng.integers(0, 50, (4, 3)),
                    grad_norm=1.0 + step,
                    loss=0.1 * step,
                )
    return path


def step_path(run: Path, step: int) -> Path:
    return run / "steps" / f"step-{step:08d}.safetensors"


def read_step(path: Path) -> tuple[dict[str, Any], bytes]:
    """A step file's header (parsed) and data buffer."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def rewrite_step(
    path: Path, header: dict[str, Any], data: bytes, *, valid_crc: bool = True
) -> None:
    """Writes a step file from a header and data, with checksums that match (a crafted file
    passes the CRCs, so the reader's other checks are what is tested)."""
    meta = header.setdefault("__metadata__", {})
    if valid_crc:
        meta["_crc32_data"] = f"{zlib.crc32(data):08x}"
        meta["_crc32_header"] = _canonical_crc(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(run: Path, step: int, change: Callable[[dict[str, Any]], None]) -> Path:
    path = step_path(run, step)
    header, data = read_step(path)
    change(header)
    rewrite_step(path, header, data)
    return run


def edit_manifest(run: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    replaced = change(manifest)
    text = replaced if isinstance(replaced, str) else json.dumps(manifest)
    (run / "manifest.json").write_text(text)
    return run


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


# -- Logs for `stabledrl import`, and a baseline ---------------------------------------------
IMPORT_LOGS = {
    "trainer_state.json": '{"log_history": [{"step": 1, "loss": 0.5, "grad_norm": NaN}], '
    '"logging_steps": 1}',
    "log.jsonl": '{"step": 1, "reward": 0.5}\n{"step": 2, "data": {"actor/loss": null}}\n',
    "log.csv": "step,reward,Unnamed: 0\n1,0.5,0\n2,nan,1\nstep,loss\n1,3\n",
    "run-x-tag-train_loss.json": "[[1.0, 1, 0.5], [2.0, 2, 0.25]]",
    "slurm.out": "(TaskRunner pid=3) step:1 - critic/score/mean:np.float64(0.5) - a:nan "
    "[repeated 2x across cluster]\nstep:2 - actor/loss:0.1\n",
}
"""A small log of each text format `import` reads, by a file name it detects (a restart, a NaN,
a nested verl row, a second CSV header, Ray's prefix and suffix among them)."""


def varint(value: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes((*out, value))


def proto_field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def tfrecord(data: bytes) -> bytes:
    """A TFRecord of `data`: its length, the masked CRC-32C of the length, the data, its masked
    CRC-32C (test_import_readers checks the CRC against TensorBoard's)."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


WANDB_BLOCK = 32 << 10
"""The block of W&B's LevelDB log."""


def wandb_fragment(kind: int, data: bytes) -> bytes:
    """A LevelDB log fragment as wandb frames it: CRC-32 of its type and data, length, type."""
    return struct.pack("<IHB", zlib.crc32(data, zlib.crc32(bytes((kind,)))), len(data), kind)


def wandb_blocks(*records: bytes) -> bytes:
    """A run file of `records` in 32 KiB blocks, as wandb writes one: a record split across
    blocks, a block's last bytes too few for a header zeros."""
    raw = bytearray(WANDB_HEADER)
    for record in records:
        first = True
        while first or record:
            room = WANDB_BLOCK - len(raw) % WANDB_BLOCK - 7
            if room < 0:
                raw += bytes(room + 7)
                continue
            part, record = record[:room], record[room:]
            kind = (
                (2 if record else 1) if first else (3 if record else 4)
            )  # first/full, middle/last
            raw += wandb_fragment(kind, part) + part
            first = False
    return bytes(raw)


def wandb_history(*items: tuple[str, str]) -> bytes:
    """A Record whose history holds `items` (key, value_json; a key with `.` given as its
    parts, nested_key, as wandb writes a nested dict's)."""
    body = b"".join(
        proto_field(
            1,
            b"".join(proto_field(2, part.encode()) for part in k.split("."))
            + proto_field(16, v.encode()),
        )
        for k, v in items
    )
    return proto_field(2, body)


def number_field(number: int, value: int) -> bytes:
    """A protobuf varint field (`value` as its 64 bits: -1 is 2**64 - 1)."""
    return varint(number << 3) + varint(value & (2**64 - 1))


def tf_value(tag: bytes, *, simple: float | None = None, tensor: bytes = b"") -> bytes:
    """A TensorBoard Summary.Value: `tag` and a simple_value, or a tensor (`tf_tensor`) of the
    `scalars` plugin."""
    body = proto_field(1, tag)
    if simple is not None:
        body += varint(2 << 3 | 5) + struct.pack("<f", simple)
    if tensor:
        body += proto_field(8, tensor) + proto_field(9, proto_field(1, proto_field(1, b"scalars")))
    return proto_field(1, body)


def tf_tensor(dtype: int, content: bytes) -> bytes:
    """A 0-d TensorProto of TensorFlow DataType `dtype`, its value as tensor_content."""
    return number_field(1, dtype) + proto_field(2, b"") + proto_field(4, content)


def tf_event(step: int, *values: bytes, restart: bool = False) -> bytes:
    """A TensorBoard Event at `step` with Summary.Values `values` (`tf_value`), or a SessionLog
    START (`restart`: a run restarted at `step`)."""
    event = number_field(2, step)
    if restart:
        event += proto_field(7, number_field(1, 1))
    return event + (proto_field(5, b"".join(values)) if values else b"")


def tfevents_records() -> list[bytes]:
    """The events of a small TensorBoard log: simple and tensor values (float, double, int64,
    a NaN), a tag that is no scalar's, a restart and a step written again."""
    return [
        tf_event(0, restart=True),
        tf_event(1, tf_value(b"train/loss", simple=0.5), tf_value(b"train/reward", simple=1.0)),
        tf_event(2, tf_value(b"train/loss", tensor=tf_tensor(1, struct.pack("<f", 0.25)))),
        tf_event(2, tf_value(b"grad_norm", tensor=tf_tensor(2, struct.pack("<d", math.nan)))),
        tf_event(3, tf_value(b"steps", tensor=tf_tensor(9, struct.pack("<q", 3)))),
        tf_event(3, proto_field(1, proto_field(1, b"image") + proto_field(4, b"png"))),
        tf_event(2, restart=True),
        tf_event(2, tf_value(b"train/loss", simple=0.75)),
    ]


def baseline_data() -> dict[str, Any]:
    """A minimal valid baseline (a fresh copy): a gate of each kind."""
    return {
        "schema": "stabledrl-baseline",
        "version": 1,
        "replay": {"spike_factor": 10.0, "window": 50, "drift_threshold": -0.15},
        "observed": {"spike_steps": {"value": 0, "worse": "higher"}},
        "recorded": {"grad_norm": {"max": {"value": 1.0, "abs_tol": 0.0}}},
        "policies": {"grpo": {"discard_frac": {"value": 0.1, "abs_tol": 0.0, "rel_tol": 0.1}}},
    }


def packed(tmp: Path) -> Path:
    """`tiny_run` at tmp/run, and its archive at tmp/run.h5 (a fresh copy of the one packed
    per process: `_made`)."""
    tiny_run(tmp / "run")
    out = tmp / "run.h5"
    shutil.copy(_made("archive", STEPS, 1), out)
    return out


def edit_archive(tmp: Path, change: Callable[[h5py.File], None]) -> Path:
    out = packed(tmp)
    with h5py.File(out, "r+") as handle:
        change(handle)
    return out


def replace_dataset(handle: h5py.File, name: str, **create: Any) -> h5py.Dataset:
    del handle[name]
    return handle.create_dataset(name, **create)


def flip_index(name: str, *, keep_crc: bool = True) -> Callable[[h5py.File], None]:
    """Flips one bit of index dataset `name` (its stored CRC left as it was)."""

    def change(handle: h5py.File) -> None:
        dataset = handle[name]
        values = dataset[()]
        raw = bytearray(values.tobytes())
        raw[min(len(raw) - 1, 9)] ^= 1
        dataset[...] = np.frombuffer(bytes(raw), dtype=values.dtype).reshape(values.shape)
        if not keep_crc:
            dataset.attrs[CRC_ATTR] = index_crc(dataset[()])

    return change


def flip_data_chunk(field: str) -> Callable[[Path], Path]:
    """One bit of data dataset `field`'s first chunk flipped on disk: in the middle of a
    compressed chunk (Fletcher32 sees it), in the first step's values of an uncompressed one
    (the step's CRC-32 in `checksums/` sees it; the rest of its chunk is unused)."""

    def make(tmp: Path) -> Path:
        out = packed(tmp)
        with h5py.File(out, "r") as handle:
            info = handle[field].id.get_chunk_info(0)
            middle = handle[field].compression is not None
        flip_bit(out, info.byte_offset + (info.size // 2 if middle else 1))
        return out

    return make


def step_offsets(handle: h5py.File, name: str) -> np.ndarray:
    """The step offsets into data dataset `name` (`tokens/X`, `sequences/X`, `ragged/X/data`)."""
    group = name.split("/")[0]
    owner = group if group in ("tokens", "sequences") else name.rsplit("/", 1)[0]
    return handle[f"{owner}/step_offsets"][()]


def store_big_endian(handle: h5py.File, name: str) -> None:
    """Data dataset `name` stored big-endian, as `pack` writes it on such a machine: Fletcher32
    if it had it, else its `checksums/` CRC-32s of each step's bytes as stored."""
    values = handle[name][()]
    fletcher32 = handle[name].fletcher32
    swapped = values.astype(values.dtype.newbyteorder(">"))
    replace_dataset(
        handle, name, data=swapped, chunks=True if fletcher32 else None, fletcher32=fletcher32
    )
    if f"checksums/{name}" in handle:
        bounds = step_offsets(handle, name)
        crcs = np.array(
            [zlib.crc32(swapped[a:b].tobytes()) for a, b in itertools.pairwise(bounds)],
            dtype=np.uint32,
        )
        replace_dataset(handle, f"checksums/{name}", data=crcs).attrs[CRC_ATTR] = index_crc(crcs)


def _without(name: str) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle[name]

    return change


def _shortened(name: str) -> Callable[[h5py.File], None]:
    """Index dataset `name` without its last entry, with a CRC that matches."""

    def change(handle: h5py.File) -> None:
        values = handle[name][:-1]
        replace_dataset(handle, name, data=values).attrs[CRC_ATTR] = index_crc(values)

    return change


def _name_not_utf8(tmp: Path) -> Path:
    """A link name with a byte that is not UTF-8 (found by benchmarks/fuzz_readers.py: h5py
    raised it out of the link visit as a SystemError)."""
    out = packed(tmp)
    out.write_bytes(out.read_bytes().replace(b"logp_old", b"\xffogp_old"))
    return out


def _break_btree(field: str | None) -> Callable[[Path], Path]:
    """The signature of a B-tree node of the archive broken (found by the fuzzer: a corrupt
    chunk index raised out of the integrity check's walk): the first node, which indexes the
    root group (field None: the archive cannot be listed, exit 3), or the node indexing the
    chunks of data dataset `field` (its steps are findings)."""

    def make(tmp: Path) -> Path:
        out = packed(tmp)
        raw = out.read_bytes()
        at = raw.index(b"TREE")
        if field is not None:
            with h5py.File(out, "r") as handle:
                chunk = handle[field].id.get_chunk_info(0).byte_offset
            # A chunk node (type 1) of a 1-D dataset: its first child's address follows the
            # 24-byte header and a 24-byte key (size, filter mask, two offsets).
            while raw[at + 4] != 1 or struct.unpack("<Q", raw[at + 48 : at + 56])[0] != chunk:
                at = raw.index(b"TREE", at + 1)
        out.write_bytes(raw[:at] + b"XREE" + raw[at + 4 :])
        return out

    return make


def _heap_free_space_zero(tmp: Path) -> Path:
    """The global heap's free-space object given size 0 (found by the fuzzer): libhdf5 then
    spins forever, GIL held, reading any string attribute."""
    out = packed(tmp)
    raw = bytearray(out.read_bytes())
    at = raw.index(b"GCOL") + 16
    while struct.unpack("<H", raw[at : at + 2])[0] != 0:
        at += 16 + (struct.unpack("<Q", raw[at + 8 : at + 16])[0] + 7) // 8 * 8
    raw[at + 8 : at + 16] = struct.pack("<Q", 0)
    out.write_bytes(bytes(raw))
    return out


def _attribute_error_then_a_heap_that_hangs(tmp: Path) -> Path:
    """Two faults (found by the fuzzer): the `source` attribute's string type claims 37889
    bytes a character, so iterating the root's attributes raises; and a global heap object
    after the attributes' strings is marked free with size 0, so reading an attribute by
    name spins in libhdf5 forever, GIL held. The probe's child meets the first and must
    refuse the archive: the reader's own read by name would meet the second."""
    out = packed(tmp)
    raw = bytearray(out.read_bytes())
    marker = b"source\x00\x00\x19\x01\x01\x00\x10\x00\x00\x00\x10\x00\x00\x00\x01\x00\x00\x00"
    at = raw.index(marker) + len(marker) - 4
    raw[at : at + 4] = struct.pack("<I", 37889)
    at = raw.index(b"GCOL") + 16
    while struct.unpack("<H", raw[at : at + 2])[0] != 5:  # past the attributes' strings
        at += 16 + (struct.unpack("<Q", raw[at + 8 : at + 16])[0] + 7) // 8 * 8
    raw[at : at + 2] = b"\x00\x00"
    raw[at + 8 : at + 16] = struct.pack("<Q", 0)
    out.write_bytes(bytes(raw))
    return out


def _one_heap_object(write: Callable[[h5py.File, list[str]], None]) -> Callable[[Path], Path]:
    """An archive where `write` stored 65 variable-length strings, one of 1 MiB then 64 short
    ones, whose references (16 bytes each) are then all rewritten to point at the long one's
    object in the global heap: 1.8 MB on disk, 65 MiB once read (many more references, and a
    longer object, make it any size: 1000 made the probe's child take 2 GB)."""

    def make(tmp: Path) -> Path:
        out = packed(tmp)
        with h5py.File(out, "r+") as handle:
            write(handle, ["B" * (1 << 20)] + [f"s{i:05d}" for i in range(64)])
        raw = bytearray(out.read_bytes())
        long = struct.pack("<I", 1 << 20)
        at = raw.index(long)
        while struct.unpack("<I", raw[at + 16 : at + 20])[0] != 6:
            at = raw.index(long, at + 1)
        for short in range(1, 65):
            raw[at + 16 * short : at + 16 * (short + 1)] = raw[at : at + 16]
        out.write_bytes(bytes(raw))
        return out

    return make


def _strings_attribute(owner: str, name: str) -> Callable[[h5py.File, list[str]], None]:
    def write(handle: h5py.File, strings: list[str]) -> None:
        target = handle[owner]
        if name in target.attrs:
            del target.attrs[name]
        target.attrs.create(name, data=strings, dtype=h5py.string_dtype())

    return write


def _manifest_of_strings(handle: h5py.File, strings: list[str]) -> None:
    """The manifest text a scalar of a variable-length sequence of variable-length strings."""
    of_strings = h5py.vlen_dtype(h5py.string_dtype())
    replace_dataset(handle, "manifest", shape=(), dtype=of_strings)[()] = np.array(strings, object)


def _stored_chunk(
    field: str, *, size: int | None = None, address: int | None = None
) -> Callable[[Path], Path]:
    """The first chunk of `field` given another stored size or address in the chunk index
    (a version-1 B-tree key: size, filter mask and offsets, 24 bytes before the address). A
    chunk of 0 bytes made libhdf5 crash reading it (found by the fuzzer)."""

    def make(tmp: Path) -> Path:
        out = packed(tmp)
        with h5py.File(out, "r") as handle:
            info = handle[field].id.get_chunk_info(0)
        raw = bytearray(out.read_bytes())
        at = raw.index(struct.pack("<Q", info.byte_offset))
        assert raw[at - 24 : at - 20] == struct.pack("<I", info.size)
        if size is not None:
            raw[at - 24 : at - 20] = struct.pack("<I", size)
        if address is not None:
            raw[at : at + 8] = struct.pack("<Q", address)
        out.write_bytes(bytes(raw))
        return out

    return make


def filter_not_installed(name: str, skipped: tuple[bool, ...] = (False,)) -> Callable[[Path], Path]:
    """Dataset `name` stored through an HDF5 filter no libhdf5 has: written through LZF, then
    its filter id made 511 (reserved for testing): an archive recompressed with a plugin's
    filter (Blosc's, zstd's) read where that plugin is not installed. LZF's pipeline entry
    is its id, its name's length, flags and values count (2 bytes each), then its name; h5py
    flags it optional. `skipped`: for each of its chunks (split along the first axis),
    whether it is written unfiltered, the filter's bit set in its filter mask, as libhdf5
    stores a chunk an optional filter failed on."""

    def make(tmp: Path) -> Path:
        def recompress(handle: h5py.File) -> None:
            values = handle[name][()]
            width = -(-len(values) // len(skipped))
            dataset = replace_dataset(
                handle,
                name,
                shape=values.shape,
                dtype=values.dtype,
                chunks=(width, *values.shape[1:]),
                compression="lzf",
                fletcher32=True,
            )
            # A chunk LZF skipped is its values and their Fletcher32 sum: as stored by a
            # dataset through Fletcher32 alone.
            plain = handle.create_dataset(
                "plain", data=values, chunks=dataset.chunks, fletcher32=True
            )
            for index, skip in enumerate(skipped):
                start = index * width
                offset = (start,) + (0,) * (values.ndim - 1)
                if skip:
                    _, stored = plain.id.read_direct_chunk(offset)
                    dataset.id.write_direct_chunk(offset, stored, filter_mask=1)
                else:
                    dataset[start : start + width] = values[start : start + width]
                assert dataset.id.get_chunk_info(index).filter_mask == int(skip)
            del handle["plain"]

        out = edit_archive(tmp, recompress)
        raw = bytearray(out.read_bytes())
        at = raw.index(b"lzf\0") - 8
        assert raw[at : at + 2] == struct.pack("<H", 32000)
        assert raw[at + 4 : at + 6] == struct.pack("<H", h5py.h5z.FLAG_OPTIONAL)
        raw[at : at + 2] = struct.pack("<H", 511)
        out.write_bytes(bytes(raw))
        return out

    return make


def _named_datatype(handle: h5py.File) -> None:
    """A committed datatype where a data dataset belongs (found by the fuzzer)."""
    handle["tokens/loss_weight"] = np.dtype("f4")


def _group_for_dataset(handle: h5py.File) -> None:
    del handle["steps/num_tokens"]
    handle.create_group("steps/num_tokens")


def _strip_checksums(handle: h5py.File) -> None:
    def strip(_name: str, obj: Any) -> None:
        if CRC_ATTR in obj.attrs:
            del obj.attrs[CRC_ATTR]

    handle.visititems(strip)


def _ragged_mismatch(handle: h5py.File) -> None:
    shapes = handle["ragged/token_ids/shape"]
    table = shapes[()]
    table[1, 1] += 1
    shapes[...] = table
    shapes.attrs[CRC_ATTR] = index_crc(table)


def checksum_an_array(name: str) -> Callable[[h5py.File], None]:
    """`name`'s checksum attribute stored as an array of its own checksum, twice: a value
    that is no text. Fixed-length strings: an array of variable-length ones refuses the
    archive whatever it holds (`_one_heap_object`)."""

    def change(handle: h5py.File) -> None:
        crc = handle[name].attrs[CRC_ATTR].encode()
        handle[name].attrs[CRC_ATTR] = np.array([crc, crc])

    return change


def _nan_manifest(handle: h5py.File) -> None:
    manifest = json.loads(handle["manifest"][()].decode())
    text = json.dumps(manifest).replace('"meta": {}', '"meta": {"x": NaN}')
    replace_dataset(handle, "manifest", data=text, dtype=h5py.string_dtype())


def _text_with_lone_surrogate(name: str) -> Callable[[h5py.File], None]:
    """The archive's JSON text `name` given a string with an unpaired `\\ud800` escape."""

    def change(handle: h5py.File) -> None:
        document = json.loads(handle[name][()].decode())
        if name == "manifest":
            document["meta"] = {"reward": "\ud800fraction"}
        else:
            document.append({"kind": "gap", "step": None, "path": None, "message": "\ud800"})
        replace_dataset(handle, name, data=json.dumps(document), dtype=h5py.string_dtype())

    return change


# -- step files ----------------------------------------------------------------------------------
def truncations(run: Path) -> list[int]:
    """Every boundary of a step file: 0, inside the length, the length, inside and at the end
    of the header, inside the data, one byte short."""
    header_len = 8 + struct.unpack("<Q", step_path(run, 1).read_bytes()[:8])[0]
    size = step_path(run, 1).stat().st_size
    return [
        0,
        4,
        8,
        9,
        header_len - 1,
        header_len,
        header_len + 1,
        (header_len + size) // 2,
        size - 1,
    ]


def _truncate(at: int) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        run = tiny_run(tmp / "run")
        with open(step_path(run, 1), "r+b") as fh:
            fh.truncate(at)
        return run

    return make


def _flip_step(where: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        run = tiny_run(tmp / "run")
        path = step_path(run, 1)
        header_len = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
        flip_bit(path, 20 if where == "header" else header_len + 5, 3)
        return run

    return make


def _in_steps(make_entry: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        run = tiny_run(tmp / "run")
        make_entry(run / "steps")
        return run

    return make


def _set_meta(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header["__metadata__"][key] = value

    return change


def _tensor(name: str, **entry: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header[name].update(entry)

    return change


def _zero_tokens(run: Path) -> Path:
    """Step 1 rewritten as a well-formed file with no tokens (what the Recorder refuses)."""
    path = step_path(run, 1)
    header, _ = read_step(path)
    for name in [k for k in header if k != "__metadata__"]:
        shape = header[name]["shape"]
        header[name] = {
            "dtype": header[name]["dtype"],
            "shape": [0, *shape[1:]],
            "data_offsets": [0, 0],
        }
    header["__metadata__"].update(_num_tokens="0", _num_sequences="0", _scored_tokens="0")
    rewrite_step(path, header, b"")
    return run


SEQ_ID_PAST_INT32 = 2**31 - 1
"""A seq_id no batch of a step can hold: the step's data is bad, its file well-formed."""


def seq_id_past_int32(path: Path) -> None:
    """A step file (of any rank) rewritten with its first seq_id entry 2**31 - 1, checksums
    valid: the reader reads it, a replay cannot prepare it."""
    header, data = read_step(path)
    start, stop = header["seq_id"]["data_offsets"]
    seq_id = np.frombuffer(data[start:stop], dtype=np.int32).copy()
    seq_id[0] = SEQ_ID_PAST_INT32
    rewrite_step(path, header, data[:start] + seq_id.tobytes() + data[stop:])


def bad_seq_id(run: Path, *steps: int) -> Path:
    """Each step of `steps` (every step when none) given a seq_id past int32
    (`seq_id_past_int32`)."""
    for number in steps or tuple(open_run(run).step_numbers):
        seq_id_past_int32(step_path(run, number))
    return run


def float16_sketch_without_scale(run: Path, step: int = 1) -> Path:
    """Step `step` given a float16 unit_grad_sketch (one row a token) without its
    unit_grad_sketch_scale scalar, checksums valid."""
    path = step_path(run, step)
    header, data = read_step(path)
    rows = header["logp"]["shape"]
    sketch = np.ones((int(np.prod(rows)), 4), dtype=np.float16).tobytes()
    header["unit_grad_sketch"] = {
        "dtype": "F16",
        "shape": [int(np.prod(rows)), 4],
        "data_offsets": [len(data), len(data) + len(sketch)],
    }
    rewrite_step(path, header, data + sketch)
    return run


def archive_bad_seq_id(step: int) -> Callable[[h5py.File], None]:
    """The archive's tokens/seq_id entry at the start of step index `step` set to 2**31 - 1
    (h5py keeps the chunk's checksum valid)."""

    def change(handle: h5py.File) -> None:
        start = int(handle["tokens/step_offsets"][step])
        handle["tokens/seq_id"][start] = SEQ_ID_PAST_INT32

    return change


def _nested_header(run: Path) -> Path:
    text = b"[" * 100_000 + b"]" * 100_000
    step_path(run, 1).write_bytes(struct.pack("<Q", len(text)) + text)
    return run


def _duplicate_spelling(run: Path) -> Path:
    path = step_path(run, 1)
    (path.parent / "step-000000001.safetensors").write_bytes(path.read_bytes())
    return run


def _surrogate_bytes_in_manifest(run: Path) -> Path:
    """A meta key of the three bytes a lone surrogate would encode to (not UTF-8; Python's
    JSON parser lets them through)."""
    path = run / "manifest.json"
    raw = path.read_bytes()
    assert b'"meta": {}' in raw
    path.write_bytes(raw.replace(b'"meta": {}', b'"meta": {"\xed\xa0\x80": 1}'))
    return run


def linked(entry: str, target: str | None = "other") -> Callable[[Path], Path]:
    """A run whose `entry` (manifest.json or steps) is a symlink to the same entry of another
    good run beside it (`target` "other"), or to a path that does not exist (None)."""

    def make(tmp: Path) -> Path:
        run = tiny_run(tmp / "run")
        pointed = tmp / "nowhere" if target is None else tiny_run(tmp / target) / entry
        os.rename(run / entry, tmp / "moved")
        (run / entry).symlink_to(pointed)
        return run

    return make


def _mkfifo(steps: Path) -> None:
    os.mkfifo(steps / "step-00000009.safetensors")


def _symlink(target: str) -> Callable[[Path], None]:
    def make(steps: Path) -> None:
        (steps / "step-00000009.safetensors").symlink_to(target)

    return make


def _junk(steps: Path) -> None:
    (steps / "notes.txt").write_text("hello")
    (steps / "step-00000009.safetensors.bak").write_bytes(b"\0" * 100)
    (steps / "step-x.safetensors").write_bytes(b"junk")


@dataclass(frozen=True)
class Case:
    """One input and what a command must do with it."""

    name: str
    make: Callable[[Path], Path]
    """Builds the input under a temporary directory; returns the path given to the command."""
    command: str
    """inspect, replay, pack (pack writes OUT beside the input) or watch (`--once`)."""
    code: int
    finding: str | None = None
    """The finding kind `inspect` must report (exit 0 cases)."""


def _run_case(change: Callable[[Path], Path]) -> Callable[[Path], Path]:
    return lambda tmp: change(tiny_run(tmp / "run"))


def _archive_case(change: Callable[[h5py.File], None]) -> Callable[[Path], Path]:
    return lambda tmp: edit_archive(tmp, change)


def _huge_fill(name: str, elements: int) -> Callable[[h5py.File], None]:
    """`name` replaced by a chunked, compressed dataset of `elements` never written: a few KB on
    disk, `elements` x 8 bytes if read whole."""

    def change(handle: h5py.File) -> None:
        replace_dataset(
            handle, name, shape=(elements,), dtype="i8", chunks=(1 << 15,), compression="gzip"
        )

    return change


def _chunk_never_written(name: str, entry: int) -> Callable[[h5py.File], None]:
    """`name` rewritten in 1-entry chunks (a data dataset compressed with Fletcher32), every
    one written but entry `entry`'s, which reads as the fill value (0); an index keeps a CRC
    of what reads back, so only the chunk index tells."""

    def change(handle: h5py.File) -> None:
        values = handle[name][()]
        index = name.startswith("steps/")
        filters = {} if index else {"compression": "gzip", "fletcher32": True}
        dataset = replace_dataset(
            handle, name, shape=values.shape, dtype=values.dtype, chunks=(1,), **filters
        )
        dataset[:entry] = values[:entry]
        dataset[entry + 1 :] = values[entry + 1 :]
        if index:
            dataset.attrs[CRC_ATTR] = index_crc(dataset[()])

    return change


def _step_in_unwritten_chunks(width: int) -> Callable[[h5py.File], None]:
    """The last step's token_ids made [4, width] (its index entries and CRCs agree), its data
    in 1-entry chunks never written: a read of it spans `4 * width` of them, which cost
    libhdf5 about 7 KB each (a 50 KB archive, 2.8 GB read at width 100,000)."""

    def change(handle: h5py.File) -> None:
        data = handle["ragged/token_ids/data"][()]
        shapes = handle["ragged/token_ids/shape"][()]
        offsets = handle["ragged/token_ids/step_offsets"][()]
        shapes[-1] = [4, width]
        offsets[-1] = offsets[-2] + 4 * width
        for index, values in (("shape", shapes), ("step_offsets", offsets)):
            name = f"ragged/token_ids/{index}"
            replace_dataset(handle, name, data=values).attrs[CRC_ATTR] = index_crc(values)
        dataset = replace_dataset(
            handle,
            "ragged/token_ids/data",
            shape=(int(offsets[-1]),),
            dtype=data.dtype,
            chunks=(1,),
            compression="gzip",
            fletcher32=True,
        )
        dataset[: offsets[-2]] = data[: offsets[-2]]

    return change


def unwritten_tail(name: str, entries: int) -> Callable[[h5py.File], None]:
    """Data dataset `name` (1-byte values) in 1-entry chunks, followed by `entries` more that
    no step holds and were never written: an integrity check that read every chunk took 33 s
    and 350 MB at 2**21 of them, in a 48 KB archive."""

    def change(handle: h5py.File) -> None:
        values = handle[name][()]
        dataset = replace_dataset(
            handle,
            name,
            shape=(len(values) + entries,),
            dtype=values.dtype,
            chunks=(1,),
            compression="gzip",
            fletcher32=True,
        )
        dataset[: len(values)] = values

    return change


def _unknown_grid_of_unwritten_chunks(handle: h5py.File) -> None:
    """A dataset no format names (a newer version's, say), 2000 x 1000 1-byte entries in
    1-entry chunks, one written: an integrity check that read every chunk took 18 s and
    +580 MB, in a 52 KB archive."""
    grid = handle.create_dataset(
        "later/grid", shape=(2000, 1000), dtype="u1", chunks=(1, 1), compression="gzip"
    )
    grid[0, 0] = 1


def _retyped(name: str, dtype: str, *, columns: int = 0) -> Callable[[h5py.File], None]:
    """Data dataset `name` rewritten with its values in `dtype` (another width, kind or byte
    order), or with `columns`, each value repeated in that many columns of a 2-D array."""

    def change(handle: h5py.File) -> None:
        values = handle[name][()].astype(dtype)
        if columns:
            values = np.repeat(values[:, None], columns, axis=1)
        replace_dataset(handle, name, data=values)

    return change


def retyped_index(
    name: str, dtype: str, *, shift: float = 0, columns: int = 0, first_column: bool = False
) -> Callable[[h5py.File], None]:
    """Index dataset `name` rewritten in `dtype` (its values plus `shift`; each repeated in
    `columns` columns; or only its first column), with a CRC that matches: only its type
    tells it from pack's."""

    def change(handle: h5py.File) -> None:
        values = handle[name][()]
        values = (values[:, 0] if first_column else values).astype(dtype)
        if shift:
            values = values + np.array(shift, dtype=dtype)
        if columns:
            values = np.repeat(values[:, None], columns, axis=1)
        replace_dataset(handle, name, data=values).attrs[CRC_ATTR] = index_crc(values)

    return change


def widened_shape(field: str, columns: int) -> Callable[[h5py.File], None]:
    """ragged/FIELD/shape given `columns` columns (its own, then 1s: the sizes still match the
    data), with a CRC that matches: steps of a field of `columns` dimensions."""

    def change(handle: h5py.File) -> None:
        name = f"ragged/{field}/shape"
        shapes = handle[name][()]
        wide = np.ones((shapes.shape[0], columns), dtype=shapes.dtype)
        wide[:, : shapes.shape[1]] = shapes
        replace_dataset(handle, name, data=wide).attrs[CRC_ATTR] = index_crc(wide)

    return change


def _external_reward(handle: h5py.File) -> None:
    count = handle["sequences/reward"].shape[0]
    del handle["sequences/reward"]
    handle.create_dataset(
        "sequences/reward", shape=(count,), dtype="f4", external=[("/etc/passwd", 0, count * 4)]
    )


def _virtual_reward(source: str) -> Callable[[Path], Path]:
    """sequences/reward made a virtual dataset mapping dataset x of another HDF5 file
    (`source` "other"), or the archive's own tokens/logp (`source` "."): its values would be
    read from elsewhere."""

    def make(tmp: Path) -> Path:
        other = tmp / "other.h5"
        with h5py.File(other, "w") as handle:
            handle["x"] = np.arange(16, dtype="f4")

        def change(handle: h5py.File) -> None:
            count = handle["sequences/reward"].shape[0]
            layout = h5py.VirtualLayout(shape=(count,), dtype="f4")
            if source == ".":
                layout[:] = h5py.VirtualSource(".", "tokens/logp", shape=(48,))[:count]
            else:
                layout[:] = h5py.VirtualSource(str(other), "x", shape=(16,))[:count]
            del handle["sequences/reward"]
            handle.create_virtual_dataset("sequences/reward", layout)

        return edit_archive(tmp, change)

    return make


def _link(kind: str) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle["sequences/reward"]
        handle["sequences/reward"] = (
            h5py.SoftLink("/tokens/logp")
            if kind == "soft"
            else h5py.ExternalLink("/etc/passwd", "/reward")
        )

    return change


CASES: list[Case] = [
    # Step files: the already-passing ones.
    *(Case(f"torn_at_{i}", _truncate(i), "inspect", 0, "torn") for i in (0, 4, 8)),
    Case("flip_in_header", _flip_step("header"), "inspect", 0, "unreadable"),
    Case("flip_in_data", _flip_step("data"), "inspect", 0, "unreadable"),
    Case("flip_in_data_replay", _flip_step("data"), "replay", 0),
    Case("symlink_to_file", _in_steps(_symlink("/etc/passwd")), "inspect", 0, "unknown_file"),
    Case("symlink_to_directory", _in_steps(_symlink("/tmp")), "inspect", 0, "unknown_file"),
    Case("symlink_to_device", _in_steps(_symlink("/dev/zero")), "inspect", 0, "unknown_file"),
    Case("symlink_to_device_replay", _in_steps(_symlink("/dev/zero")), "replay", 0),
    Case("junk_files", _in_steps(_junk), "inspect", 0, "unknown_file"),
    Case("manifest_a_symlink", linked("manifest.json"), "inspect", 3),
    Case("manifest_a_dangling_symlink", linked("manifest.json", None), "inspect", 3),
    Case("steps_a_symlink", linked("steps"), "inspect", 3),
    Case("steps_a_symlink_replay", linked("steps"), "replay", 3),
    Case("steps_a_symlink_pack", linked("steps"), "pack", 3),
    Case("manifest_world_size_string", _run_case(lambda r: edit_manifest(r, lambda m: m.update(world_size="2"))), "inspect", 3),
    Case("manifest_unit_number", _run_case(lambda r: edit_manifest(r, lambda m: m.update(unit=5))), "inspect", 3),
    Case("manifest_a_list", _run_case(lambda r: edit_manifest(r, lambda m: "[1, 2]")), "inspect", 3),
    Case("manifest_not_json", _run_case(lambda r: edit_manifest(r, lambda m: "{nope")), "replay", 3),
    # Step files: issue 13's rows.
    Case("fifo_named_like_a_step", _in_steps(_mkfifo), "inspect", 0, "unknown_file"),
    Case("fifo_named_like_a_step_replay", _in_steps(_mkfifo), "replay", 0),
    Case("fifo_named_like_a_step_pack", _in_steps(_mkfifo), "pack", 0),
    Case("step_number_of_20_digits", _in_steps(lambda s: (s / f"step-{'9' * 20}.safetensors").write_bytes(b"x")), "inspect", 0, "unknown_file"),
    Case("step_in_two_spellings", _run_case(_duplicate_spelling), "inspect", 0, "unknown_file"),
    Case("header_step_disagrees_with_name", _run_case(lambda r: edit_header(r, 1, _set_meta("step", "7.0"))), "inspect", 0, "unreadable"),
    Case("non_string_metadata", _run_case(lambda r: edit_header(r, 1, _set_meta("loss", 1.5))), "inspect", 0, "unreadable"),
    Case("non_string_metadata_replay", _run_case(lambda r: edit_header(r, 1, _set_meta("loss", {"a": 1}))), "replay", 0),
    Case("dtype_disagrees_with_bytes", _run_case(lambda r: edit_header(r, 1, _tensor("logp", dtype="F64"))), "inspect", 0, "unreadable"),
    Case("dtype_disagrees_with_bytes_replay", _run_case(lambda r: edit_header(r, 1, _tensor("logp", dtype="F64"))), "replay", 0),
    Case("shape_disagrees_with_bytes", _run_case(lambda r: edit_header(r, 1, _tensor("logp", shape=[13]))), "inspect", 0, "unreadable"),
    Case("shape_disagrees_with_counts_replay", _run_case(lambda r: edit_header(r, 1, _set_meta("_num_tokens", "11"))), "replay", 0),
    Case("byte_string_dtype", _run_case(lambda r: edit_header(r, 1, _tensor("logp", dtype="STR"))), "inspect", 0, "unreadable"),
    Case("field_of_the_wrong_dtype", _run_case(lambda r: edit_header(r, 1, _tensor("mask", dtype="I8"))), "replay", 0),
    Case("zero_tokens", _run_case(_zero_tokens), "inspect", 0, "unreadable"),
    Case("zero_tokens_replay", _run_case(_zero_tokens), "replay", 0),
    Case("header_nested_deeply", _run_case(_nested_header), "inspect", 0, "unreadable"),
    Case("manifest_nested_deeply", _run_case(lambda r: edit_manifest(r, lambda m: "[" * 100_000 + "]" * 100_000)), "inspect", 3),
    Case("manifest_over_1_mb", _run_case(lambda r: edit_manifest(r, lambda m: m["meta"].update(x="y" * (1 << 20)))), "inspect", 3),
    Case("manifest_with_nan_pack", _run_case(lambda r: edit_manifest(r, lambda m: json.dumps(m).replace('"meta": {}', '"meta": {"x": NaN}'))), "pack", 3),
    Case("world_size_above_cap", _run_case(lambda r: edit_manifest(r, lambda m: m.update(world_size=10**9))), "replay", 3),
    Case("step_version_of_5000_digits", _run_case(lambda r: edit_header(r, 1, _set_meta("_format_version", "1." + "9" * 5000))), "inspect", 0, "unreadable"),
    Case("step_version_of_5000_digits_replay", _run_case(lambda r: edit_header(r, 1, _set_meta("_format_version", "1." + "9" * 5000))), "replay", 0),
    Case("manifest_version_of_5000_digits", _run_case(lambda r: edit_manifest(r, lambda m: m.update(format_version="1." + "9" * 5000))), "inspect", 3),
    Case("manifest_version_a_number", _run_case(lambda r: edit_manifest(r, lambda m: m.update(format_version=1.0))), "inspect", 3),
    Case("manifest_version_arabic_digits", _run_case(lambda r: edit_manifest(r, lambda m: m.update(format_version="\u0661.\u0660"))), "inspect", 3),
    Case("reward_range_past_float", _run_case(lambda r: edit_manifest(r, lambda m: m.update(reward_range=[-(10**400), 10**400]))), "inspect", 3),
    Case("reward_range_past_float_watch", _run_case(lambda r: edit_manifest(r, lambda m: m.update(reward_range=[-(10**400), 10**400]))), "watch", 3),
    Case("reward_range_overflowing_to_inf", _run_case(lambda r: edit_manifest(r, lambda m: json.dumps(m).replace('"reward_range": [0.0, 1.0]', '"reward_range": [0, 1e999]'))), "inspect", 3),
    Case("meta_overflowing_to_inf", _run_case(lambda r: edit_manifest(r, lambda m: json.dumps(m).replace('"meta": {}', '"meta": {"lr": 1e999}'))), "inspect", 3),
    Case("meta_overflowing_to_inf_watch", _run_case(lambda r: edit_manifest(r, lambda m: json.dumps(m).replace('"meta": {}', '"meta": {"lr": -1e999}'))), "watch", 3),
    Case("manifest_with_a_lone_surrogate", _run_case(lambda r: edit_manifest(r, lambda m: m.update(meta={"reward": "\ud800fraction"}))), "inspect", 3),
    Case("manifest_with_a_lone_surrogate_in_bytes", _run_case(_surrogate_bytes_in_manifest), "inspect", 3),
    Case("header_with_a_lone_surrogate", _run_case(lambda r: edit_header(r, 1, _set_meta("\ud800x", "1.0"))), "inspect", 0, "unreadable"),
    Case("seq_id_past_int32_replay", _run_case(lambda r: bad_seq_id(r, 1)), "replay", 0),
    Case("seq_id_past_int32_watch", _run_case(lambda r: bad_seq_id(r, 1)), "watch", 0),
    Case("seq_id_past_int32_every_step_replay", _run_case(bad_seq_id), "replay", 3),
    Case("seq_id_past_int32_every_step_watch", _run_case(bad_seq_id), "watch", 3),
    Case("float16_sketch_without_scale_replay", _run_case(float16_sketch_without_scale), "replay", 0),
    Case("world_size_above_rank_files", lambda tmp: edit_manifest(tiny_run(tmp / "run", world_size=2), lambda m: m.update(world_size=4000)), "inspect", 0, "missing_rank"),
    # Archives.
    Case("archive_huge_fill_step_index", _archive_case(_huge_fill("steps/step", 1 << 34)), "inspect", 3),
    Case("archive_huge_fill_data", _archive_case(_huge_fill("tokens/logp", 1 << 34)), "inspect", 3),
    Case("archive_external_storage_pack", _archive_case(_external_reward), "pack", 3),
    Case("archive_external_storage", _archive_case(_external_reward), "replay", 3),
    Case("archive_external_link", _archive_case(_link("external")), "pack", 3),
    Case("archive_soft_link", _archive_case(_link("soft")), "inspect", 3),
    Case("archive_virtual_dataset_of_another_file", _virtual_reward("other"), "inspect", 3),
    Case("archive_virtual_dataset_of_itself_pack", _virtual_reward("."), "pack", 3),
    Case("archive_flip_steps", _archive_case(flip_index("steps/step")), "inspect", 0, "unreadable"),
    Case("archive_flip_counts", _archive_case(flip_index("steps/num_tokens")), "inspect", 0, "unreadable"),
    Case("archive_flip_scalar", _archive_case(flip_index("scalars/grad_norm")), "inspect", 0, "unreadable"),
    Case("archive_flip_recorded", _archive_case(flip_index("scalars_recorded/loss")), "inspect", 0, "unreadable"),
    Case("archive_flip_offsets", _archive_case(flip_index("sequences/step_offsets")), "inspect", 0, "unreadable"),
    Case("archive_flip_present", _archive_case(flip_index("present/reward")), "inspect", 0, "unreadable"),
    Case("archive_flip_ragged_shape", _archive_case(flip_index("ragged/token_ids/shape")), "inspect", 0, "unreadable"),
    Case("archive_ragged_shape_mismatch", _archive_case(_ragged_mismatch), "inspect", 0, "unreadable"),
    Case("archive_seq_id_past_int32_replay", _archive_case(archive_bad_seq_id(1)), "replay", 0),
    Case("archive_ragged_shape_mismatch_replay", _archive_case(_ragged_mismatch), "replay", 0),
    Case("archive_offsets_with_valid_crc", _archive_case(flip_index("tokens/step_offsets", keep_crc=False)), "inspect", 0, "unreadable"),
    Case("archive_without_checksums", _archive_case(_strip_checksums), "inspect", 0, "unchecked"),
    Case("archive_step_index_checksum_an_array", _archive_case(checksum_an_array("steps/step")), "inspect", 0, "unreadable"),
    Case("archive_step_checksums_checksum_an_array", _archive_case(checksum_an_array("checksums/tokens/logp")), "inspect", 0, "unreadable"),
    Case("archive_data_chunk_flip", flip_data_chunk("tokens/mask"), "inspect", 0, "unreadable"),
    Case("archive_data_step_flip", flip_data_chunk("tokens/logp"), "inspect", 0, "unreadable"),
    Case("archive_data_step_flip_replay", flip_data_chunk("tokens/logp"), "replay", 0),
    Case("archive_data_without_any_checksum", _archive_case(_without("checksums/tokens/logp")), "inspect", 3),
    Case("archive_data_without_any_checksum_replay", _archive_case(_without("checksums/sequences/reward")), "replay", 3),
    Case("archive_step_checksums_float", _archive_case(retyped_index("checksums/tokens/logp", "f8")), "inspect", 3),
    Case("archive_step_checksums_int64", _archive_case(retyped_index("checksums/tokens/logp", "i8")), "replay", 3),
    Case("archive_step_checksums_of_two_dimensions", _archive_case(retyped_index("checksums/tokens/logp", "u4", columns=2)), "inspect", 3),
    Case("archive_step_checksums_short", _archive_case(_shortened("checksums/sequences/reward")), "replay", 3),
    Case("archive_step_checksums_other_byte_order", _archive_case(retyped_index("checksums/tokens/logp", ">u4")), "replay", 0),
    Case("archive_huge_fill_step_checksums", _archive_case(_huge_fill("checksums/tokens/logp", 1 << 34)), "inspect", 3),
    Case("archive_flip_step_checksums", _archive_case(flip_index("checksums/tokens/logp")), "inspect", 0, "unreadable"),
    Case("archive_step_checksums_flip_with_valid_crc", _archive_case(flip_index("checksums/tokens/logp", keep_crc=False)), "inspect", 0, "unreadable"),
    Case("archive_data_other_byte_order", _archive_case(lambda h: store_big_endian(h, "tokens/logp")), "replay", 0),
    Case("archive_data_other_byte_order_pack", _archive_case(lambda h: store_big_endian(h, "sequences/group_id")), "pack", 0),
    Case("archive_data_int64", _archive_case(_retyped("tokens/logp", "i8")), "inspect", 3),
    Case("archive_data_float16", _archive_case(_retyped("tokens/logp", "f2")), "replay", 3),
    Case("archive_data_of_two_dimensions", _archive_case(_retyped("tokens/logp", "f4", columns=2)), "inspect", 3),
    Case("archive_ragged_data_of_two_dimensions", _archive_case(_retyped("ragged/token_ids/data", "i8", columns=2)), "replay", 3),
    Case("archive_step_index_float", _archive_case(retyped_index("steps/step", "f8", shift=0.5)), "inspect", 3),
    Case("archive_step_index_string", _archive_case(retyped_index("steps/step", "S8")), "replay", 3),
    Case("archive_step_index_other_byte_order", _archive_case(retyped_index("steps/step", ">i8")), "replay", 0),
    Case("archive_step_index_of_two_dimensions", _archive_case(retyped_index("steps/step", "i8", columns=2)), "inspect", 3),
    Case("archive_step_index_uint64_past_int64", _archive_case(retyped_index("steps/step", "u8", shift=2**63)), "replay", 3),
    Case("archive_counts_uint64", _archive_case(retyped_index("steps/num_tokens", "u8")), "inspect", 3),
    Case("archive_offsets_int16", _archive_case(retyped_index("tokens/step_offsets", "i2")), "replay", 3),
    Case("archive_offsets_float", _archive_case(retyped_index("sequences/step_offsets", "f8", shift=0.5)), "pack", 3),
    Case("archive_offsets_other_byte_order_pack", _archive_case(retyped_index("tokens/step_offsets", ">i8")), "pack", 0),
    Case("archive_scalar_float32", _archive_case(retyped_index("scalars/grad_norm", "f4")), "inspect", 3),
    Case("archive_scalar_other_byte_order", _archive_case(retyped_index("scalars/grad_norm", ">f8")), "replay", 0),
    Case("archive_present_float", _archive_case(retyped_index("present/reward", "f8", shift=0.5)), "replay", 3),
    Case("archive_recorded_int64", _archive_case(retyped_index("scalars_recorded/loss", "i8")), "watch", 3),
    Case("archive_ragged_shape_float", _archive_case(retyped_index("ragged/token_ids/shape", "f8")), "inspect", 3),
    Case("archive_ragged_shape_of_one_dimension", _archive_case(retyped_index("ragged/token_ids/shape", "i8", first_column=True)), "replay", 3),
    Case("archive_ragged_shape_of_too_many_dimensions", _archive_case(widened_shape("token_ids", 100)), "inspect", 3),
    Case("archive_manifest_with_nan", _archive_case(_nan_manifest), "pack", 3),
    Case("archive_manifest_with_a_lone_surrogate", _archive_case(_text_with_lone_surrogate("manifest")), "inspect", 3),
    Case("archive_integrity_with_a_lone_surrogate", _archive_case(_text_with_lone_surrogate("integrity")), "inspect", 3),
    Case("archive_path_is_a_fifo", lambda tmp: (os.mkfifo(tmp / "run.h5"), tmp / "run.h5")[1], "inspect", 3),
    Case("archive_link_name_not_utf8", _name_not_utf8, "inspect", 3),
    Case("archive_named_datatype", _archive_case(_named_datatype), "inspect", 3),
    Case("archive_data_chunk_never_written", _archive_case(_chunk_never_written("tokens/seq_id", 16)), "inspect", 0, "unreadable"),
    Case("archive_data_chunk_never_written_replay", _archive_case(_chunk_never_written("ragged/token_ids/data", 16)), "replay", 0),
    Case("archive_index_chunk_never_written", _archive_case(_chunk_never_written("steps/num_tokens", 3)), "replay", 3),
    Case("archive_step_in_unwritten_chunks", _archive_case(_step_in_unwritten_chunks(100_000)), "inspect", 0, "unreadable"),
    Case("archive_unwritten_chunks_past_the_steps", _archive_case(unwritten_tail("tokens/mask", 1 << 22)), "inspect", 0),
    Case("archive_contiguous_dataset_past_the_file", _archive_case(lambda h: h.create_dataset("later/values", shape=(6_000_000,), dtype="f8")), "inspect", 3),
    Case("archive_unknown_dataset_of_unwritten_chunks", _archive_case(_unknown_grid_of_unwritten_chunks), "inspect", 0),
    Case("archive_data_filter_not_installed", filter_not_installed("tokens/mask"), "inspect", 3),
    Case("archive_index_filter_not_installed", filter_not_installed("steps/num_tokens"), "replay", 3),
    Case("archive_group_where_a_dataset_belongs", _archive_case(_group_for_dataset), "replay", 3),
    Case("archive_heap_that_hangs_libhdf5", _heap_free_space_zero, "inspect", 3),
    Case("archive_attribute_error_then_a_heap_that_hangs", _attribute_error_then_a_heap_that_hangs, "inspect", 3),
    Case("archive_chunk_of_zero_bytes", _stored_chunk("sequences/reward", size=0), "inspect", 3),
    Case("archive_chunk_of_zero_bytes_replay", _stored_chunk("tokens/logp", size=0), "replay", 3),
    Case("archive_chunk_larger_than_it_can_be", _stored_chunk("tokens/mask", size=1 << 30), "inspect", 3),
    Case("archive_chunk_past_the_end", _stored_chunk("tokens/logp", address=1 << 40), "inspect", 3),
    Case("archive_attribute_of_strings_at_one_heap_object", _one_heap_object(_strings_attribute("/", "x")), "inspect", 3),
    Case("archive_kind_of_strings_at_one_heap_object", _one_heap_object(_strings_attribute("/", "kind")), "replay", 3),
    Case("archive_index_attribute_of_strings_at_one_heap_object", _one_heap_object(_strings_attribute("steps/step", "crc32")), "pack", 3),
    Case("archive_manifest_of_strings_at_one_heap_object", _one_heap_object(_manifest_of_strings), "inspect", 3),
    Case("archive_group_btree_broken", _break_btree(None), "inspect", 3),
    Case("archive_chunk_btree_broken", _break_btree("tokens/logp"), "inspect", 0, "unreadable"),
    Case("archive_chunk_btree_broken_pack", _break_btree("tokens/logp"), "pack", 3),  # no step readable
]  # fmt: skip


@dataclass(frozen=True)
class Measured:
    """A command run in a child process: exit code, stderr, and the command's own cost (the
    interpreter's imports excluded)."""

    code: int
    stderr: str
    seconds: float
    extra_rss_mb: float
    read_mb: float | None
    """Bytes the command read through read(2) (Linux's /proc/self/io), in MiB; None elsewhere."""


_CHILD = """
import importlib, json, os, resource, signal, sys, time
def bytes_read():
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("rchar:"))
    except OSError:
        return None
def command(args, cost_file):
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    read_before = bytes_read()
    start = time.perf_counter()
    code = 0
    try:
        app_module.app(args, prog_name="stabledrl")
    except SystemExit as exc:
        code = exc.code or 0
    cost = {"seconds": time.perf_counter() - start,
            "extra_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
    read_after = bytes_read()
    if read_before is not None and read_after is not None:
        cost["read_mb"] = (read_after - read_before) / (1 << 20)
    with open(cost_file, "w") as fh:
        json.dump(cost, fh)
    return code
ADDRESS_SPACE = int(os.environ["CORPUS_ADDRESS_SPACE"])
codes = []
for each in json.loads(os.environ["CORPUS_COMMANDS"]):
    for module in each["preload"]:
        importlib.import_module(module)
    from stabledrl_cli.cli import app as app_module
    for name in ("inspect", "pack", "replay"):
        app_module.load_command(name)
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(os.environ["CORPUS_TIMEOUT"]))  # its default action ends the process
        os.dup2(os.open(each["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 1
        try:
            code = command(each["args"], each["cost"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""

ADDRESS_SPACE = 3 << 30
"""Each command's address-space cap: enough for the interpreter with torch (~1.2 GB mapped), far
below what an unbounded read of a crafted archive asks for (tens of GB)."""


def measure(
    args: list[str],
    cost_file: Path,
    *,
    timeout: float = 120,
    preload: tuple[str, ...] = ("h5py", "torch"),
) -> Measured:
    """Runs `stabledrl ARGS` in a child under an address-space cap (RLIMIT_AS) and a timeout.
    The modules of `preload` are imported before the command's time and memory are measured
    (a command that never loads torch, like `import`, needs none)."""
    return measure_each([(args, preload)], cost_file.parent / f"{cost_file.name}.d", timeout)[0]


def measure_each(
    commands: list[tuple[list[str], tuple[str, ...]]], folder: Path, timeout: float = 120
) -> list[Measured]:
    """`measure` of each (ARGS, PRELOAD) of `commands`, in turn, in one child process that
    imports each module once: each command runs in a process forked from it once its modules
    are imported, under the cap, its stderr and costs kept in `folder`. Each command's stderr
    begins with what that process printed as it imported the modules (a line a command's own
    process would print first). `timeout` is each command's: one that outlives it is killed
    (SIGALRM, code -14)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [(folder / f"{n}.stderr", folder / f"{n}.json") for n in range(len(commands))]
    listed = [
        {"args": args, "preload": preload, "stderr": str(stderr), "cost": str(cost)}
        for (args, preload), (stderr, cost) in zip(commands, files, strict=True)
    ]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    env["CORPUS_COMMANDS"] = json.dumps(listed)
    env["CORPUS_ADDRESS_SPACE"] = str(ADDRESS_SPACE)
    env["CORPUS_TIMEOUT"] = str(math.ceil(timeout))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        timeout=timeout * len(commands),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return [
        _measured(code, proc.stderr, stderr, cost)
        for code, (stderr, cost) in zip(json.loads(proc.stdout), files, strict=True)
    ]


def _measured(code: int, imported: str, stderr: Path, cost_file: Path) -> Measured:
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else {}
    return Measured(
        code=code,
        stderr=imported + (stderr.read_text() if stderr.exists() else ""),
        seconds=float(cost.get("seconds", float("inf"))),
        extra_rss_mb=float(cost.get("extra_rss_mb", float("inf"))),
        read_mb=None if cost.get("read_mb") is None else float(cost["read_mb"]),
    )
