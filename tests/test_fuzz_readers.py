"""Random step files, archives, manifests and status files through the readers: nothing but
InputError or findings comes out (the long-running version is benchmarks/fuzz_readers.py)."""

from __future__ import annotations

import json
import random
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from _corpus import IMPORT_LOGS, packed, proto_field, read_step, rewrite_step, step_path, tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_readers import CRAFTED, IMPORTS, MANIFEST_NOTES, Target, exercise, exercise_followed

from stabledrl_cli.capture._status import read_status
from stabledrl_cli.dump import RunIntegrityWarning, open_run
from stabledrl_cli.errors import StabledrlError
from stabledrl_cli.importers import import_log, read_log
from stabledrl_cli.replay.inspection import summarize

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A good 3-step run and a good archive, copied per example."""
    work = tmp_path_factory.mktemp("fuzz")
    run = tiny_run(work / "run", steps=3)
    return {"run": run, "header": read_step(step_path(run, 1)), "archive": packed(work / "a")}


def _through_the_reader(seeds: dict[str, Any], write: Any, *, archive: bool = False) -> None:
    with tempfile.TemporaryDirectory() as work:
        if archive:
            target = Path(work) / "run.h5"
            target.write_bytes(write)
            out: Path | None = Path(work) / "again.h5"
        else:
            target = Path(shutil.copytree(seeds["run"], Path(work) / "run"))
            write(step_path(target, 1))
            out = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            exercise(target, out)  # raises anything but InputError


@FAST
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_a_step_file(seeds: dict[str, Any], data: bytes) -> None:
    _through_the_reader(seeds, lambda path: path.write_bytes(data))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
TENSOR_ENTRIES = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F64", "U8", "I32", "I64", "F16", "STR"]) | JSON_VALUES,
    "shape": st.lists(st.integers(-2, 20), max_size=3) | JSON_VALUES,
    "data_offsets": st.lists(st.integers(-8, 400), min_size=2, max_size=2) | JSON_VALUES,
})  # fmt: skip


@FAST
@given(
    tensors=st.dictionaries(
        st.sampled_from(["logp", "logp_old", "advantages", "mask", "seq_id", "reward", "x"]),
        TENSOR_ENTRIES,
        max_size=4,
    ),
    metadata=st.dictionaries(
        st.sampled_from(["step", "loss", "_num_tokens", "_num_sequences", "_format_version", "x"]),
        st.text(max_size=6) | JSON_VALUES,
        max_size=4,
    ),
    data=st.binary(max_size=400),
)
def test_random_headers_with_valid_checksums(
    seeds: dict[str, Any], tensors: dict[str, Any], metadata: dict[str, Any], data: bytes
) -> None:
    """A crafted header passes the CRCs: the reader's own checks must hold."""
    good, _ = seeds["header"]

    def write(path: Path) -> None:
        header = {**{k: v for k, v in good.items() if k not in tensors}, **tensors}
        header["__metadata__"] = {**good["__metadata__"], **metadata}
        rewrite_step(path, header, data)

    _through_the_reader(seeds, write)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    edits=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.none() | st.floats(0.05, 1.0),
)
def test_random_edits_of_an_archive(
    seeds: dict[str, Any], edits: list[tuple[float, int]], cut: float | None
) -> None:
    raw = bytearray(seeds["archive"].read_bytes())
    for where, value in edits:
        raw[int(where * len(raw))] = value
    if cut is not None:
        del raw[int(cut * len(raw)) :]
    _through_the_reader(seeds, bytes(raw), archive=True)


NOTE_VALUES = st.recursive(
    st.sampled_from(CRAFTED) | JSON_VALUES,
    lambda inner: st.dictionaries(
        st.sampled_from(["step", "rank", "reason", "kind", "scale_rewards", "reward_weights"]),
        inner,
        max_size=3,
    ),
    max_leaves=6,
)


@FAST
@given(notes=st.dictionaries(st.sampled_from(MANIFEST_NOTES), NOTE_VALUES, min_size=1))
def test_crafted_recorder_notes_in_a_manifest(seeds: dict[str, Any], notes: dict[str, Any]) -> None:
    """recording_closed, recording_stopped, meta (TRL's scale_rewards, reward_weights ...) and
    source of any JSON value: read, summarized as `inspect` does, followed as `watch` does."""
    with tempfile.TemporaryDirectory() as work:
        run = Path(shutil.copytree(seeds["run"], Path(work) / "run"))
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, **notes}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            exercise(run, None)
            exercise_followed(run)


@FAST
@given(data=st.binary(max_size=512) | st.text(max_size=64).map(str.encode))
def test_random_bytes_as_records_status_file(tmp_path_factory: Any, data: bytes) -> None:
    """What a command may leave in `record`'s status file: read_status raises nothing, and
    keeps only exit codes a process can end with."""
    path = tmp_path_factory.mktemp("status") / "status"
    path.write_bytes(b"2\treason\nE3\tx\n" + data)
    failures, fatal = read_status(path)
    assert failures[0] == (2, "reason") and fatal[0] == 3
    assert all(0 < code < 256 for code in [*fatal, *(code for code, _ in failures)])


@FAST
@given(
    name=st.sampled_from(sorted(IMPORT_LOGS)),
    at=st.floats(0, 1),
    cut=st.integers(0, 8),
    text=st.text(alphabet='{}[]",:;\t\n -0123456789.eEnaNstp/\x1b', max_size=24),
)
def test_edited_logs_through_import(
    tmp_path_factory: Any, name: str, at: float, cut: int, text: str
) -> None:
    """A log of each format with a few characters replaced by log syntax: imported (and the
    run it writes read back as `inspect` reads it), or refused as a StabledrlError."""
    work = tmp_path_factory.mktemp("log")
    log = IMPORT_LOGS[name]
    where = int(at * len(log))
    (work / name).write_text(log[:where] + text + log[where + cut :])
    try:
        import_log(work / name, work / "run")
        summarize(open_run(work / "run")).to_dict()
    except StabledrlError:
        pass


WANDB_RUN = Path(__file__).resolve().parents[1] / "fixtures/imports/wandb-verl/run-verltiny.wandb"


@FAST
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
    cut=st.floats(0.0, 1.0),
    items=st.lists(
        st.tuples(
            st.lists(st.sampled_from(["_step", "loss", "a", "_type", "", "train/global_step"]),
                     min_size=1, max_size=3),
            st.text(alphabet='{}[]",:0123456789.eE-NaInfity', max_size=12).map(str.encode),
        ),
        max_size=5,
    ),
)  # fmt: skip
def test_edited_wandb_run_files_through_import(
    tmp_path_factory: Any,
    edits: list[tuple[float, int]],
    cut: float,
    items: list[tuple[list[str], bytes]],
) -> None:
    """A real W&B run file with bytes replaced and cut short (read), and a history record of
    crafted keys and value_json whose checksum holds (imported, and read back): nothing but a
    StabledrlError."""
    raw = bytearray(WANDB_RUN.read_bytes())
    for where, value in edits:
        raw[int(where * len(raw))] = value
    del raw[max(7, int(cut * len(raw))) :]
    work = tmp_path_factory.mktemp("wandb")
    (work / "run-a.wandb").write_bytes(raw)
    with suppress(StabledrlError):
        read_log(work / "run-a.wandb")
    history = b"".join(
        proto_field(1, b"".join(proto_field(2, k.encode()) for k in keys) + proto_field(16, v))
        for keys, v in items
    )
    record, kind = proto_field(2, history), bytes((1,))
    framed = struct.pack("<IH", zlib.crc32(record, zlib.crc32(kind)), len(record)) + kind
    (work / "run-b.wandb").write_bytes(raw[:7] + framed + record)
    with suppress(StabledrlError):
        import_log(work / "run-b.wandb", work / "run")
        summarize(open_run(work / "run")).to_dict()


SEEDED_INPUTS = {"wandb": 8, "verl_console": 8, "tfevents": 12, "csv": 12, "baseline": 200}
"""Inputs a format's seeded case tries (15 unless said): a few seconds in all, the slowest
(a mutation may repeat a row 2,000 times: as many steps written) tried least."""


@pytest.mark.parametrize("kind", [*IMPORTS, "baseline"])
def test_seeded_mutations_of_each_log_format_and_a_baseline(tmp_path: Path, kind: str) -> None:
    """benchmarks/fuzz_readers.py's own mutations of a log of each format `import` reads and
    of a baseline, a few of each, seeded: imported and read back, or refused with an
    InputError of one short message (the target raises anything else)."""
    target = Target(kind, tmp_path)
    rng = random.Random(kind)
    for _ in range(SEEDED_INPUTS.get(kind, 15)):
        target(target.mutate(rng))
