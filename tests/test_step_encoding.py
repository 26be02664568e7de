"""The step file encoder: safetensors' own layout byte for byte (plus the two CRCs), read back
by safetensors itself, and a snapshot of the caller's arrays when the write comes later."""

from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli._atomic import write_atomic
from stabledrl_cli.dump import _step_encoding
from stabledrl_cli.dump._crc import crc32
from stabledrl_cli.dump._schema import (
    META_CRC_DATA,
    META_CRC_HEADER,
    META_NUM_SEQUENCES,
    META_NUM_TOKENS,
    META_SCORED_TOKENS,
)
from stabledrl_cli.dump._step_encoding import encode_step
from stabledrl_cli.dump._stfile import canonical_crc as _canonical_crc
from stabledrl_cli.dump._stfile import read_header
from stabledrl_cli.errors import UsageError


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "logp": rng.random(10).astype(np.float32),
        "mask": np.array([1, 0] * 5, dtype=np.uint8),
        "seq_id": np.repeat(np.arange(2, dtype=np.int32), 5),
        "reward": rng.random(2).astype(np.float32),
        "group_id": np.zeros(2, dtype=np.int32),
        "token_ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "unit_grad_sketch": rng.random((10, 3)).astype(np.float16),
        "param_grad_norm": np.zeros(0, dtype=np.float32),
        "no_rows": np.zeros((0, 3), dtype=np.float16),
    }


def _through_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors' own file of `tensors`, with the two CRCs added to its header."""
    raw = st_save(tensors, metadata=metadata)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    header["__metadata__"][META_CRC_DATA] = f"{zlib.crc32(data):08x}"
    header["__metadata__"][META_CRC_HEADER] = _canonical_crc(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def test_encoded_bytes_are_safetensors_own_plus_the_checksums(tmp_path):
    tensors, metadata = _tensors(), {"step": "3.0", "loss": "0.5"}
    encoded = b"".join(bytes(part) for part in encode_step(tensors, metadata))
    assert encoded == _through_safetensors(tensors, metadata)
    path = write_atomic(tmp_path / "step.safetensors", encode_step(tensors, metadata))
    with safe_open(str(path), framework="np") as handle:
        assert set(handle.keys()) == set(tensors)
        for name, array in tensors.items():
            assert np.array_equal(handle.get_tensor(name), array), name
        assert handle.metadata()["loss"] == "0.5"


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"A": "1", "0": "2", "z": "3", "~": "4"},  # keys sorting before and after the CRCs
        {"A": "1", "0": "2"},  # the CRCs last
        {"\u00e9": "\u00fc", 'a"b': 'c"d', "back\\slash": "\\", "_x": "\n"},
        {"loss": '"_crc32_data":"', "_crc32_e": "between the two CRC keys"},
        {"_crc32_zz": "not covered by the header CRC", "step": "1.0"},
        {META_CRC_DATA: "overwritten", META_CRC_HEADER: "overwritten"},
    ],
)
def test_the_header_crc_is_the_canonical_one_whatever_the_metadata(metadata):
    """The header CRC, computed from the header's own JSON text, is `_canonical_crc`'s: for
    empty metadata, keys on either side of the CRC keys, escapes, and other `_crc32` keys."""
    tensors = _tensors()
    encoded = b"".join(bytes(part) for part in encode_step(tensors, metadata))
    assert encoded == _through_safetensors(tensors, metadata)


def test_big_endian_and_strided_arrays_are_stored_as_their_little_endian_values():
    """safetensors stores little-endian, contiguous bytes: a big-endian or strided array is
    written as the same values, byte for byte what its little-endian copy gives."""
    tensors, metadata = _tensors(), {"step": "0.0"}
    odd = {
        name: array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
        for name, array in tensors.items()
    }
    odd["logp"] = np.repeat(odd["logp"], 2)[::2]  # big-endian and strided
    encoded = b"".join(bytes(part) for part in encode_step(odd, metadata))
    assert encoded == _through_safetensors(tensors, metadata)


def test_strided_inputs_are_recorded_with_their_values(tmp_path):
    """A view with strides (every other entry) is written as its values, not as the memory
    under it."""
    base = -np.arange(8, dtype=np.float32)
    with sd.Recorder(tmp_path / "run", unit="sequence") as rec:
        rec.log_step(0, logp=base[::2], logp_old=base[1::2], advantages=np.ones(4, np.float32))
    step = sd.open_run(tmp_path / "run").step(0)
    assert step["logp"].tolist() == [0.0, -2.0, -4.0, -6.0]
    assert step["logp_old"].tolist() == [-1.0, -3.0, -5.0, -7.0]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_an_array_of_a_numpy_subclass_is_recorded_as_its_values(tmp_path):
    """An np.matrix [B, L] (it stays 2-D when flattened) raised numpy's TypeError ('only
    0-dimensional arrays can be converted to Python scalars') from deep in log_step; it is
    recorded as the plain array of its values, as a list would be."""
    logp = np.matrix([[-1.0, -2.0], [-3.0, -4.0]], dtype=np.float32)
    with sd.Recorder(tmp_path / "run") as rec:
        rec.log_step(0, logp=logp, logp_old=logp, advantages=np.matrix([[1.0], [-1.0]]))
    step = sd.open_run(tmp_path / "run").step(0)
    assert step["logp"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert step["advantages"].tolist() == [1.0, 1.0, -1.0, -1.0]
    assert step["seq_id"].tolist() == [0, 0, 1, 1]


def test_async_log_step_writes_the_arrays_as_they_were_at_the_call(tmp_path):
    """The caller's float arrays and its bool mask (stored through a view of its bytes) may
    change as soon as log_step returns: each step holds them as they were at the call."""
    logp = np.full(4, -1.0, dtype=np.float32)
    mask = np.ones(4, dtype=bool)
    with sd.Recorder(tmp_path / "run", unit="sequence", async_writes=True) as rec:
        for step in range(3):
            rec.log_step(
                step, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32), mask=mask
            )
            logp -= 1.0  # the caller reuses its buffers at once
            mask[step] = False
    run = sd.open_run(tmp_path / "run")
    assert [float(s["logp"][0]) for s in run.steps()] == [-1.0, -2.0, -3.0]
    assert torch.equal(run.step(2)["logp_old"], torch.full((4,), -3.0))
    assert [s["mask"].tolist() for s in run.steps()] == [
        [1, 1, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 1, 1],
    ]


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it():
    """`_crc.crc32` (ISA-L's when the isal extra is installed) gives zlib's values, chained."""
    data = np.random.default_rng(1).random(100_003).astype(np.float32).tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[777:], crc32(data[:777])) == zlib.crc32(data)
    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert crc32 is isal_zlib.crc32


def test_write_atomic_writes_short_and_long_parts_in_order(tmp_path):
    """Every part, in order, empty ones included, handed over in one writev."""
    long = np.arange(40_000, dtype=np.float32)
    parts = [
        b"ab",
        memoryview(long),
        b"",
        np.arange(5, dtype=np.int64).data,
        long[::-1].copy().data,
        b"z",
    ]
    path = write_atomic(tmp_path / "parts.bin", parts)
    assert path.read_bytes() == b"".join(bytes(part) for part in parts)


def test_write_atomic_resumes_short_writes_and_splits_long_lists_of_parts(tmp_path, monkeypatch):
    """A writev that takes fewer bytes than given (the kernel may) or fewer buffers than the
    list holds (IOV_MAX) is continued where it stopped: the file is still every part."""
    real_writev, calls = os.writev, []

    def stingy_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append(len(buffers))
        return real_writev(fd, [bytes(b"".join(buffers)[:7])])

    monkeypatch.setattr(_atomic, "_IOV_MAX", 3)
    monkeypatch.setattr(_atomic.os, "writev", stingy_writev)
    parts = [bytes([n]) * n for n in range(12)]
    path = write_atomic(tmp_path / "parts.bin", parts)
    assert path.read_bytes() == b"".join(parts)
    assert max(calls) == 3 and len(calls) == -(-sum(range(12)) // 7)


def test_write_atomic_batches_short_parts_and_writes_a_long_one_alone(tmp_path, monkeypatch):
    """Parts go to the kernel together up to `_BATCH` bytes a call; a longer part by itself."""
    real_writev, calls = os.writev, []

    def recording_writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append([len(buffer) for buffer in buffers])
        return real_writev(fd, buffers)

    monkeypatch.setattr(_atomic, "_BATCH", 8)
    monkeypatch.setattr(_atomic.os, "writev", recording_writev)
    parts = [b"a" * 3, b"b" * 5, b"c" * 20, b"d" * 2, b"e" * 2]
    path = write_atomic(tmp_path / "parts.bin", parts)
    assert path.read_bytes() == b"".join(parts)
    assert calls == [[3, 5], [20], [2, 2]]


def test_the_recorded_counts_match_the_arrays(tmp_path):
    """_num_tokens, _num_sequences (max(seq_id) + 1) and _scored_tokens, for each way of giving
    a step: [B, L] arrays (ids are the rows), flat arrays with ids, unit sequence, a scalar
    step, and a rank's step without tokens."""
    logp = np.full((4, 3), -1.0, np.float32)
    with sd.Recorder(tmp_path / "token", unit="token", world_size=2, rank=0) as rec:
        rec.log_step(0, logp=logp, logp_old=logp, advantages=np.ones(4, np.float32),
                     mask=np.tri(4, 3, dtype=bool))  # fmt: skip
        rec.log_step(1, logp=logp[0], logp_old=logp[0], advantages=logp[0],
                     seq_id=np.array([0, 2, 2]))  # fmt: skip
        rec.log_step(2, loss=0.5)
        empty = np.zeros((2, 0), np.float32)
        rec.log_step(3, logp=empty, logp_old=empty, advantages=np.ones(2, np.float32))
    with sd.Recorder(tmp_path / "sequence", unit="sequence") as rec:
        rec.log_step(0, logp=logp[:, 0], logp_old=logp[:, 0], advantages=logp[:, 0])
    counts = []
    for run in ("token", "sequence"):
        for path in sorted((tmp_path / run / "steps").iterdir()):
            meta = read_header(path, deep=True).metadata
            counts.append(tuple(int(meta[k]) for k in (META_NUM_TOKENS, META_NUM_SEQUENCES,
                                                       META_SCORED_TOKENS)))  # fmt: skip
    assert counts == [(12, 4, 9), (3, 3, 3), (0, 0, 0), (0, 0, 0), (4, 4, 4)]


def test_steps_that_share_a_layout_are_each_encoded_as_safetensors_own():
    """Steps of one layout (names, dtypes, shapes) reuse its header text: each step's bytes
    are still safetensors' own plus its CRCs, with its own values and metadata, also after
    other layouts came in between and after the kept layouts were cleared."""
    rng = np.random.default_rng(2)
    tensors = _tensors()
    shapes = (
        [(10,), (12,), (10,)] + [(n,) for n in range(1, _step_encoding._LAYOUTS_KEPT + 2)] + [(10,)]
    )
    for step, (length,) in enumerate(shapes):
        tensors = dict(tensors, logp=rng.random(length).astype(np.float32))
        metadata = {"step": f"{step}.0", "loss": repr(rng.random()), "Zz": "before the CRCs"}
        encoded = b"".join(bytes(part) for part in encode_step(tensors, metadata))
        assert encoded == _through_safetensors(tensors, metadata), step
    assert len(_step_encoding._LAYOUTS) <= _step_encoding._LAYOUTS_KEPT


def test_a_tensor_named_like_the_metadata_is_refused():
    with pytest.raises(ValueError, match="__metadata__"):
        encode_step({"__metadata__": np.zeros(2, np.float32)}, {})


@pytest.mark.parametrize(
    ("field", "ids", "message"),
    [
        ("seq_id", np.array([0, 2**31], np.int64), "id 2147483648 does not fit int32"),
        ("seq_id", np.array([0, 2**31], np.uint32), "id 2147483648 does not fit int32"),
        ("seq_id", np.array([0, -1], np.int8), "ids must be >= 0, got -1"),
        ("seq_id", np.array([0, -1], np.int32), "ids must be >= 0, got -1"),
        ("token_ids", np.array([[2**63]], np.uint64), "does not fit int64"),
    ],
)
def test_ids_are_checked_whatever_their_integer_dtype(tmp_path, field, ids, message):
    """An id below 0 or past the stored dtype is refused, from any integer dtype (an unsigned
    dtype is not checked for negatives, a narrower one not for the top: they cannot hold
    them)."""
    logp = np.zeros(2, np.float32)
    arrays = {"seq_id": np.array([0, 0])} if field == "token_ids" else {}
    with sd.Recorder(tmp_path / "run") as rec, pytest.raises(UsageError, match=message):
        rec.log_step(0, logp=logp, logp_old=logp, advantages=logp, **arrays, **{field: ids})


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.int64, np.uint64])
def test_ids_of_any_integer_dtype_are_stored_as_int32(tmp_path, dtype):
    logp = np.zeros(3, np.float32)
    with sd.Recorder(tmp_path / "run") as rec:
        ids = {"seq_id": np.array([0, 1, 1], dtype), "group_id": np.array([0, 0], dtype)}
        rec.log_step(0, logp=logp, logp_old=logp, advantages=logp, **ids)
    step = sd.open_run(tmp_path / "run").step(0)
    assert step["seq_id"].tolist() == [0, 1, 1] and step["group_id"].tolist() == [0, 0]
