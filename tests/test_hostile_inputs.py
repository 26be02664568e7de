"""The hostile-input corpus (tests/_corpus.py): every crafted or broken input gets its exact
exit code, one stderr line when it fails, the finding `inspect` reports when it does not, and
a bounded cost; a sample runs in a real child process under an address-space cap."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import struct
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _cli import cli_command
from _corpus import (
    CASES,
    ROOT,
    Case,
    Measured,
    edit_archive,
    edit_header,
    edit_manifest,
    filter_not_installed,
    measure,
    measure_each,
    packed,
    read_step,
    replace_dataset,
    retyped_index,
    rewrite_step,
    step_path,
    tiny_run,
    unwritten_tail,
    widened_shape,
)
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import _archive_probe, open_run
from stabledrl_cli.dump._archive_checks import CRC_ATTR, index_crc

runner = CliRunner()
CASE_SECONDS = 30.0
"""Wall-clock bound of one case under CliRunner (each is well under a second of work; the
bound leaves room for a loaded machine)."""


def _args(case: Case, target: Path) -> list[str]:
    if case.command == "pack":
        return ["pack", str(target), str(target.parent / "out.h5")]
    if case.command == "replay":
        return ["replay", str(target), "-p", "grpo"]
    if case.command == "watch":
        return ["watch", str(target), "--once"]
    return ["inspect", str(target)]


PROGRESS_LINE = re.compile(r"^[a-z]+: \d+/\d+ \(\d+%\)$")
"""What a command prints on stderr without a terminal to show life (`cli._output.progress`)."""


def _assert_clean_failure(code: int, stderr: str, expected: int) -> None:
    assert code == expected, stderr
    if expected:
        lines = [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr


PROBE_SECONDS = 5.0
"""The archive probe's limit in these tests (a hang costs this long, an honest read ms)."""
HANGS = {"archive_heap_that_hangs_libhdf5": 1.0}
"""The cases whose probe libhdf5 hangs, each case sitting out its probe's limit, and that
limit: the case asserts the probe is killed and the archive refused, whatever the limit."""


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_archive_probe, "PROBE_SECONDS", HANGS.get(case.name, PROBE_SECONDS))
    target = case.make(tmp_path)
    start = time.perf_counter()
    result = runner.invoke(app, _args(case, target))
    assert time.perf_counter() - start < CASE_SECONDS
    assert not isinstance(result.exception, AssertionError | RecursionError | MemoryError)
    _assert_clean_failure(result.exit_code, result.stderr, case.code)
    if case.command == "pack" and case.code:
        assert not (target.parent / "out.h5").exists()
    if case.finding is not None:
        shown = runner.invoke(app, ["inspect", str(target), "--format", "json"])
        assert shown.exit_code == 0, shown.stderr
        kinds = {f["kind"] for f in json.loads(shown.stdout)["integrity"]["findings"]}
        assert case.finding in kinds, kinds


SAMPLE = (
    "archive_huge_fill_step_index",
    "archive_huge_fill_data",
    "archive_external_storage_pack",
    "manifest_nested_deeply",
    "fifo_named_like_a_step_replay",
    "archive_attribute_error_then_a_heap_that_hangs",
    "archive_chunk_of_zero_bytes_replay",
    "archive_step_in_unwritten_chunks",
    "archive_unwritten_chunks_past_the_steps",
    "archive_unknown_dataset_of_unwritten_chunks",
)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Measured]:
    """Each SAMPLE case's command measured in a child process of its own under the cap, each
    forked from one that imported the modules once."""
    commands = {}
    for case in (c for c in CASES if c.name in SAMPLE):
        target = case.make(tmp_path_factory.mktemp(case.name))
        # inspect and pack refuse these before reading an array: only a replay loads torch
        preload = ("h5py", "torch") if case.command == "replay" else ("h5py",)
        commands[case.name] = (_args(case, target), preload)
    names = sorted(commands, key=lambda name: len(commands[name][1]))  # torch imported last
    measured = measure_each([commands[name] for name in names], tmp_path_factory.mktemp("cost"))
    return dict(zip(names, measured, strict=True))


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_in_a_child_process_is_fast_and_small(
    name: str, sampled: dict[str, Measured]
) -> None:
    """The crafted archive that made `inspect` allocate GBs exits 3 under an address-space cap,
    in < 300 MB (RSS above the interpreter's own) and refused by the checks up front: in well
    under the probe's time limit (about 0.25 s on a quiet machine; the bound leaves room for
    a machine loaded by the suite's other worker, where it took 1.05 s)."""
    case = next(c for c in CASES if c.name == name)
    measured = sampled[name]
    _assert_clean_failure(measured.code, measured.stderr, case.code)
    if case.code:
        assert measured.seconds < _archive_probe.PROBE_SECONDS / 4
    assert measured.extra_rss_mb < 300


def test_a_step_file_larger_than_memory_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """A step file whose data no buffer can hold (a sparse file: 8 GB that take 4 KB on disk,
    its header valid) made inspect, replay and pack exit 70 ("internal error: MemoryError")
    under a 3 GB address-space cap. It is now an unreadable step, named, the others read."""
    run = tiny_run(tmp_path / "run")
    path = step_path(run, 1)
    header, data = read_step(path)
    size = 8 << 30
    header["zzz"] = {"dtype": "U8", "shape": [size], "data_offsets": [len(data), len(data) + size]}
    rewrite_step(path, header, data)  # the data's CRC is checked once it is read: never
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size + size)
    measured = measure(["replay", str(run), "-p", "grpo"], tmp_path / "cost.json")
    assert measured.code == 0, measured.stderr
    assert "(step 1: unreadable: a read of 8,589,934," in measured.stderr, measured.stderr
    assert "does not fit in memory); replayed 3" in measured.stderr, measured.stderr


def test_a_text_of_a_huge_fixed_length_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """The manifest stored as a fixed-length string of 1.5 GB never written (its fill value:
    the file stays 0.7 MB) made `inspect` allocate it, twice, in the probe's child and in the
    reader: 3 GB peak RSS and 10 s, then "manifest checksum mismatch". A text is read whole,
    so it may not declare more than the file holds, as an index may not."""
    target = tmp_path / "run.h5"
    shutil.copy(packed(tmp_path / "good"), target)
    with h5py.File(target, "r+") as handle:
        attrs = dict(handle["manifest"].attrs)
        replace_dataset(handle, "manifest", shape=(), dtype="S1500000000").attrs.update(attrs)
    measured = measure(["inspect", str(target)], tmp_path / "cost.json", preload=("h5py",))
    _assert_clean_failure(measured.code, measured.stderr, 3)
    assert "refused: dataset manifest declares 1500000000 bytes" in measured.stderr
    assert measured.extra_rss_mb < 300 and measured.seconds < _archive_probe.PROBE_SECONDS / 4


def test_pack_never_copies_a_local_file(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "archive_external_storage_pack")
    target = case.make(tmp_path)
    result = runner.invoke(app, ["pack", str(target), str(tmp_path / "out.h5")])
    assert result.exit_code == 3 and "external storage" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["run.h5"]


@pytest.mark.parametrize("at", ["torn", "all"])
def test_truncation_at_every_boundary_is_a_finding(tmp_path: Path, at: str) -> None:
    from _corpus import step_path, truncations

    import stabledrl_cli as sd

    run = tiny_run(tmp_path / "run")
    good = step_path(run, 1).read_bytes()
    for size in truncations(run):
        step_path(run, 1).write_bytes(good[:size])
        opened = sd.open_run(run)
        kinds = {f.kind for f in opened.integrity.findings}
        assert opened.step_numbers == [0, 2, 3] and kinds & {"torn", "unreadable"}, size


def test_pack_on_a_full_disk_is_a_write_error_not_a_crash(tmp_path: Path) -> None:
    """A file-size limit makes the archive's writes fail as a full disk does: libhdf5 never
    sees the error (pack keeps it), so no segfault: exit 4, one line, no temporary file."""
    run = tiny_run(tmp_path / "run", steps=40)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [*cli_command(), "pack", str(run), str(out_dir / "run.h5")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
        cwd=ROOT,
    )
    _assert_clean_failure(proc.returncode, proc.stderr, 4)
    assert "run.h5: cannot write it" in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_an_archive_index_flip_never_changes_a_number_silently(tmp_path: Path) -> None:
    from _corpus import edit_archive, flip_index

    import stabledrl_cli as sd

    good = sd.open_run(packed(tmp_path / "good"))
    losses = good.scalar_series("grad_norm")[1].tolist()
    for name in ("steps/step", "scalars/grad_norm", "steps/num_tokens"):
        tmp = tmp_path / name.replace("/", "_")
        tmp.mkdir()
        run = sd.open_run(edit_archive(tmp, flip_index(name)))
        assert run.step_numbers == [] and not run.integrity.ok
        steps, values = run.scalar_series("grad_norm")
        assert steps.size == 0 and set(values.tolist()) <= set(losses)


def test_an_archive_of_the_other_byte_order_reads_the_same_values(tmp_path: Path) -> None:
    """An archive written on a machine of the other byte order (every data dataset stored
    big-endian here) hands out the same values, in the native order torch takes."""
    from _corpus import edit_archive, store_big_endian

    import stabledrl_cli as sd

    native = sd.open_run(packed(tmp_path / "native"))

    def swap(handle: Any) -> None:
        data = [f"{group}/{name}" for group in ("tokens", "sequences") for name in handle[group]]
        for name in [*data, "ragged/token_ids/data"]:
            if not name.endswith("step_offsets"):
                store_big_endian(handle, name)

    swapped = sd.open_run(edit_archive(tmp_path / "swapped", swap))
    assert swapped.step_numbers == native.step_numbers
    for mine, theirs in zip(swapped.steps(), native.steps(), strict=True):
        assert mine.fields == theirs.fields
        for name in mine.fields:
            assert mine[name].dtype == theirs[name].dtype, name
            assert np.array_equal(mine.array(name), theirs.array(name)), name


def _set_index(name: str, index: int, value: float) -> Callable[[h5py.File], None]:
    """Entry `index` of index dataset `name` set to `value`, its checksum attribute kept valid
    (an archive consistent to the byte, inconsistent in meaning)."""

    def change(handle: h5py.File) -> None:
        values = handle[name][()]
        values[index] = value
        handle[name][...] = values
        handle[name].attrs[CRC_ATTR] = index_crc(values)

    return change


def _both(*changes: Callable[[h5py.File], None]) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        for one in changes:
            one(handle)

    return change


@pytest.mark.parametrize(
    ("change", "step", "why"),
    [
        (
            _both(
                _set_index("steps/step", 2, 3),
                _set_index("steps/step", 3, 2),
                _set_index("scalars/step", 2, 3),
                _set_index("scalars/step", 3, 2),
            ),
            2,
            "below an earlier step's",
        ),
        (_set_index("steps/num_scored_tokens", 2, -1), 2, "-1 scored tokens of 12"),
        (_set_index("steps/num_scored_tokens", 2, 13), 2, "13 scored tokens of 12"),
        (_set_index("scalars/step", 2, 99), 2, "its step scalar says 99"),
        (_set_index("present/logp", 2, 0), 2, "required field logp is missing"),
    ],
    ids=["not_ascending", "scored_negative", "scored_past_tokens", "step_scalar", "no_logp"],
)
def test_an_archive_step_whose_index_entries_disagree_in_meaning_is_unreadable(
    tmp_path: Path, change: Callable[[h5py.File], None], step: int, why: str
) -> None:
    """A step directory reader refuses (a header step that is not its file's, scored tokens
    past the tokens, a batch without logp) was read from an archive whose index says so, its
    checksums valid: a scalar step with 12 tokens, -1 scored tokens, steps out of order. Each
    is an unreadable finding of that step, which is skipped."""
    archive = edit_archive(tmp_path, change)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = open_run(archive)
        steps = [s.step for s in run.steps()]
        findings = [f for f in run.integrity.findings if f.kind == "unreadable"]
    assert [(f.step, why in f.message) for f in findings] == [(step, True)], findings
    assert step not in steps and len(steps) == 3


@pytest.mark.parametrize("entry", ["manifest.json", "steps"])
def test_a_symlink_in_a_run_is_refused_at_its_path_and_its_url(tmp_path: Path, entry: str) -> None:
    """A run's manifest or steps folder that is a symlink (here to another good run's) is
    refused, exit 3 naming it, read from its path as from its file:// URL."""
    from _corpus import linked

    run = linked(entry)(tmp_path)
    for source in (str(run), run.as_uri()):
        result = runner.invoke(app, ["inspect", source])
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert f"{entry}: a symlink" in result.stderr, result.stderr


def test_a_steps_entry_that_is_no_directory_is_refused_at_its_path_and_its_url(
    tmp_path: Path,
) -> None:
    """A run whose `steps` is a regular file read as a run of no step: inspect said
    "Integrity: ok" and pack wrote an empty archive, both exit 0. It is refused, exit 3 naming
    it, as a symlinked steps folder is, from its path and its file:// URL."""
    run = tiny_run(tmp_path / "run")
    shutil.rmtree(run / "steps")
    (run / "steps").write_bytes(b"not a folder")
    for source in (str(run), run.as_uri()):
        for args in (["inspect", source], ["pack", source, str(tmp_path / "out.h5")]):
            result = runner.invoke(app, args)
            _assert_clean_failure(result.exit_code, result.stderr, 3)
            assert "steps: not a directory" in result.stderr, result.stderr
        assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    ("kind", "shown"),
    [
        (np.array([b"stabledrl-run", b"x"]), "HDF5 kind of type ndarray, not text"),
        (np.int64(7), "HDF5 kind of type int64, not text"),
        ("k" * 5000, "HDF5 kind 'kkkk"),
    ],
    ids=["array", "number", "long_text"],
)
def test_an_archive_kind_that_is_no_run_kind_is_named_in_one_short_line(
    tmp_path: Path, kind: Any, shown: str
) -> None:
    """An archive whose `kind` attribute is an array said "corrupt run archive (ValueError:
    The truth value of an array with more than one element is ambiguous...)", and a long
    text kind was quoted whole: it is "not a run", its kind shown in a few words."""

    def change(handle: h5py.File) -> None:
        handle.attrs["kind"] = kind

    archive = edit_archive(tmp_path, change)
    result = runner.invoke(app, ["inspect", str(archive)])
    _assert_clean_failure(result.exit_code, result.stderr, 3)
    assert "is not a run (" in result.stderr and shown in result.stderr, result.stderr
    assert "ValueError" not in result.stderr
    assert len(result.stderr) < 250 + len(str(archive)), result.stderr


def _as_group(name: str) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle[name]
        handle.create_group(name)

    return change


def _as_dataset(name: str) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle[name]
        handle.create_dataset(name, data=np.arange(3))

    return change


def _missing(name: str) -> Callable[[h5py.File], None]:
    def change(handle: h5py.File) -> None:
        del handle[name]

    return change


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (_as_group("manifest"), "no dataset manifest"),
        (_missing("integrity"), "no dataset integrity"),
        (_as_group("steps/step"), "no dataset steps/step"),
        (_missing("steps/num_tokens"), "no dataset steps/num_tokens"),
        (_as_dataset("tokens"), "no dataset tokens/step_offsets"),
        (_as_group("tokens/logp"), "no dataset tokens/logp"),
        (_as_group("scalars/loss"), "no dataset scalars/loss"),
        (_missing("scalars/loss"), "no dataset scalars/loss"),
        (_missing("scalars_recorded/grad_norm"), "no dataset scalars_recorded/grad_norm"),
        (_missing("present/reward"), "no dataset present/reward"),
        (_missing("present/token_ids"), "no dataset present/token_ids"),
        (_missing("ragged/token_ids/shape"), "no dataset ragged/token_ids/shape"),
        (_as_dataset("present"), "no group present"),
        (_missing("present"), "no group present"),
        (_as_dataset("scalars"), "no group scalars"),
    ],
    ids=[
        "manifest_a_group",
        "integrity_missing",
        "step_index_a_group",
        "counts_missing",
        "tokens_a_dataset",
        "data_a_group",
        "scalar_a_group",
        "scalar_missing",
        "scalar_recorded_missing",
        "present_missing_of_a_field_with_data",
        "present_missing_of_a_ragged_field",
        "ragged_shape_missing",
        "present_a_dataset",
        "present_missing",
        "scalars_a_dataset",
    ],
)
def test_an_object_of_the_other_kind_or_missing_is_named(
    tmp_path: Path, change: Callable[[h5py.File], None], said: str
) -> None:
    """A dataset of the layout missing or a group in its place, or a group a dataset: each
    reader said h5py's or Python's own text ("corrupt run archive (KeyError: 'Unable to
    synchronously open dataset (not a dataset)')", "(TypeError: Accessing a group is done with
    bytes or str, not <class 'tuple'>)", "(AttributeError: 'Group' object has no attribute
    'dtype')", "(TypeError: cannot use a string pattern on a bytes-like object)"), and a
    `present` that is a dataset made every step "a step without a batch" (inspect exit 0). A
    missing `scalars/NAME` or `present/NAME` of a field whose data the archive holds lost that
    series or field silently (inspect exit 0, no finding), and a missing
    `scalars_recorded/NAME` said "scalars without scalars_recorded". Each is now one line
    naming the dataset or group, exit 3."""
    good = packed(tmp_path / "good")
    archive = edit_archive(tmp_path / "bad", change)
    _every_reader_refuses(archive, good, tmp_path, f"{archive}: corrupt run archive ({said})")


@pytest.mark.parametrize(
    ("version", "shown"),
    [
        (np.int64(2), "int64"),
        (np.array([b"2.0", b"2.0"]), "ndarray"),
        (h5py.Empty("f"), "Empty"),
        (1.5, "float64"),
    ],
    ids=["number", "array", "empty", "float"],
)
def test_an_archive_version_that_is_no_text_is_named_in_one_short_line(
    tmp_path: Path, version: Any, shown: str
) -> None:
    """An archive whose `format_version` attribute is an integer, an array or h5py.Empty said
    "corrupt run archive (TypeError: Object of type int64 is not JSON serializable)" in every
    command: Python's text, from printing the value. It is a malformed version, its type
    named, as a `kind` of another type is."""

    def change(handle: h5py.File) -> None:
        handle.attrs["format_version"] = version

    good = packed(tmp_path / "good")
    archive = edit_archive(tmp_path / "bad", change)
    said = f"malformed format version (HDF5 format_version of type {shown}, not text)"
    _every_reader_refuses(archive, good, tmp_path, f"{archive}: {said}")


def test_a_run_given_as_a_symlink_is_read(tmp_path: Path) -> None:
    """The path on the command line is the user's own: a symlink to a run directory is read
    (from its path and its URL) as the run itself."""
    run = tiny_run(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run)
    expected = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--format", "json"])
    for source in (str(link), link.as_uri()):
        result = runner.invoke(app, ["replay", source, "-p", "grpo", "--format", "json"])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["steps"] == json.loads(expected.stdout)["steps"]


EVERY_READER = {
    "inspect": lambda run, good, tmp: ["inspect", run],
    "replay": lambda run, good, tmp: ["replay", run, "-p", "grpo", "--device", "cpu"],
    "check": lambda run, good, tmp: ["check", run, "-p", "grpo", "--max-nonfinite", "100"],
    "pack": lambda run, good, tmp: ["pack", run, str(tmp / "out.h5")],
    "diff": lambda run, good, tmp: ["diff", good, run],
}
"""Every command that reads an archive, as argument lists (`diff` against the honest archive)."""


def _every_reader_refuses(archive: Path, good: Path, tmp: Path, said: str) -> None:
    """Every command that reads an archive exits 3 on `archive` with the one line
    "error: SAID" (`diff` against the honest archive `good`)."""
    for command, args in EVERY_READER.items():
        result = runner.invoke(app, args(str(archive), str(good), tmp))
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert result.stderr == f"error: {said}\n", (command, result.stderr)


INDEX_CRAFTS = [
    ("steps/step", "f8", {"shift": 0.5}),
    ("steps/step", "u8", {"shift": 2**63}),
    ("steps/num_scored_tokens", "i4", {}),
    ("tokens/step_offsets", "i2", {}),
    ("sequences/step_offsets", "f8", {"shift": 0.5}),
    ("scalars/reward_mean", "f4", {}),
    ("scalars_recorded/grad_norm", "f8", {}),
    ("present/group_id", "i8", {}),
    ("ragged/token_ids/shape", "f8", {}),
    ("steps/step", "i8", {"columns": 2}),
]
"""(index dataset, dtype, `retyped_index`'s other arguments) of archives whose index is not
pack's type."""


@pytest.mark.parametrize(
    ("name", "change"),
    [(name, retyped_index(name, dtype, **extra)) for name, dtype, extra in INDEX_CRAFTS]
    + [("ragged/token_ids/shape", widened_shape("token_ids", 100))],
    ids=[f"{n}-{d}-{e}".replace("/", ".") for n, d, e in INDEX_CRAFTS] + ["shape_of_100_columns"],
)
def test_an_index_of_another_type_refuses_the_archive_in_every_command(
    tmp_path: Path, name: str, change: Callable[[Any], None]
) -> None:
    """An index dataset of another dtype or rank than pack's (its CRC valid), or ragged shapes
    of another number of dimensions than the field's, is exit 3 with one line naming it and
    the expected type, in every command that reads archives: never a crash, never values
    converted on the way (1.5 read as step 1, 2**63 as a negative step), never steps that
    vanish (a token_ids of 100 dimensions made replay say "the run has no steps")."""
    good = packed(tmp_path / "good")
    bad = edit_archive(tmp_path / "bad", change)
    for command, args in EVERY_READER.items():
        result = runner.invoke(app, args(str(bad), str(good), tmp_path))
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert f"({name} is " in result.stderr and "expected a" in result.stderr, (
            command,
            result.stderr,
        )
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("name", ["tokens/mask", "steps/num_tokens"])
def test_a_dataset_stored_through_a_filter_not_installed_is_refused_naming_it(
    tmp_path: Path, name: str
) -> None:
    """An archive recompressed through a plugin's filter (Blosc's, zstd's), read where that
    plugin is not installed: each step of a data dataset was "a corrupt chunk: Can't
    synchronously read data (can't open directory (/usr/local/lib/plugin). Please verify its
    existence)" (inspect exit 0, replay exit 3, no step read), an index "corrupt run archive
    (OSError: ...)". Every reader now refuses it naming the dataset and its filter."""
    good = packed(tmp_path / "good")
    bad = filter_not_installed(name)(tmp_path / "bad")
    said = (
        f"{bad}: refused: dataset {name} is stored through HDF5 filter 511, which this libhdf5 "
        "does not have (a compression plugin not installed here; pack writes gzip only)"
    )
    _every_reader_refuses(bad, good, tmp_path, said)


def test_a_dataset_whose_missing_optional_filter_every_chunk_skipped_is_read(
    tmp_path: Path,
) -> None:
    """A filter flagged optional that failed on every chunk (libhdf5 stored them unfiltered,
    the filter's bit set in each chunk's mask) is not needed to read them: h5py reads all
    the values without the plugin, but the archive was refused as "stored through HDF5
    filter 511, which this libhdf5 does not have". It reads as the packed run does."""
    import stabledrl_cli as sd

    native = sd.open_run(packed(tmp_path / "native"))
    skipped = sd.open_run(filter_not_installed("tokens/mask", (True, True))(tmp_path / "bad"))
    assert skipped.step_numbers == native.step_numbers
    for mine, theirs in zip(skipped.steps(), native.steps(), strict=True):
        assert np.array_equal(mine.array("mask"), theirs.array("mask"))


def test_a_missing_optional_filter_one_chunk_went_through_is_refused(tmp_path: Path) -> None:
    """A filter flagged optional that one chunk skipped but another went through: that one
    cannot be read without the plugin, so the dataset is refused as a required one is."""
    good = packed(tmp_path / "good")
    bad = filter_not_installed("tokens/mask", (True, False))(tmp_path / "bad")
    said = (
        f"{bad}: refused: dataset tokens/mask is stored through HDF5 filter 511, which this "
        "libhdf5 does not have (a compression plugin not installed here; pack writes gzip only)"
    )
    _every_reader_refuses(bad, good, tmp_path, said)


def _broken_chunk_index(archive: Path, name: str, *, last: bool = False) -> None:
    """Breaks the signature of the first (else the `last`) B-tree node of dataset `name`'s
    chunk index (a node of type 1: chunks) that leaves it uncountable."""
    raw = archive.read_bytes()
    nodes = [at.start() for at in re.finditer(b"TREE\x01", raw)]
    for at in reversed(nodes) if last else nodes:
        archive.write_bytes(raw[:at] + b"XREE" + raw[at + 4 :])
        with h5py.File(archive) as handle:
            try:
                handle[name].id.get_num_chunks()
            except RuntimeError:
                return
    raise AssertionError(f"no B-tree node of {name} found")


def test_a_data_chunk_index_that_cannot_be_read_skips_its_steps_reading_no_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data dataset whose chunk index cannot be counted read as if every chunk its shape
    declares were written: opening listed them all (8 bytes a chunk) and the integrity check
    read each, a finding a chunk. A 48 KB archive declaring 40 million 1-byte chunks took
    over 300 s and 11 GB to inspect; now its steps are skipped at opening, and no chunk of it
    is read."""
    archive = edit_archive(tmp_path, unwritten_tail("tokens/mask", 500_000))
    _broken_chunk_index(archive, "tokens/mask")
    reads: list[object] = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda self, key: reads.append(key) or real(self, key)
    )
    with open_run(archive) as run:
        findings = run.integrity.findings
    assert len(reads) < 100, len(reads)
    assert [f.message for f in findings if f.kind == "unreadable"] == [
        f"step {step}: its mask lies in tokens/mask, whose chunk index cannot be read "
        "(Can't get number of chunks (wrong B-tree signature))"
        for step in range(4)
    ]


def _written_tail(handle: h5py.File) -> None:
    """tokens/mask in 1-entry chunks, 2,000 more after the steps' written too: its chunk
    index a B-tree of several nodes."""
    values = handle["tokens/mask"][()]
    replace_dataset(
        handle,
        "tokens/mask",
        data=np.concatenate([values, np.ones(2000, values.dtype)]),
        chunks=(1,),
        compression="gzip",
        fletcher32=True,
    )


def test_a_damaged_node_of_an_honest_chunk_index_loses_only_the_chunks_it_held(
    tmp_path: Path,
) -> None:
    """One damaged node of a data dataset's chunk index, in a file that can hold every chunk
    the dataset declares, skipped every step holding data there (4 of 4 here, each of whose
    chunks reads): the chunks it held are the findings, the steps read."""
    archive = edit_archive(tmp_path, _written_tail)
    _broken_chunk_index(archive, "tokens/mask", last=True)
    with open_run(archive) as run:
        assert run.step_numbers == [0, 1, 2, 3]
        findings = run.integrity.findings
    assert findings
    assert all(
        f.step is None and f.message.startswith("archive dataset tokens/mask (a corrupt chunk")
        for f in findings
    ), findings[0]


@pytest.mark.parametrize(
    "name", ["manifest", "steps/step", "tokens/logp", "checksums/tokens/logp", "scalars/loss"]
)
def test_an_empty_dataset_refuses_the_archive_naming_it(tmp_path: Path, name: str) -> None:
    """A dataset replaced by h5py.Empty (no dataspace) said "corrupt run archive (NAME: int()
    argument must be a string, a bytes-like object or a real number, not 'NoneType')" in every
    command: Python's text, not what is wrong. At a path and at its URL, every reader now
    names the dataset and says it is empty."""

    def change(handle: h5py.File) -> None:
        attrs = dict(handle[name].attrs)
        replace_dataset(handle, name, data=h5py.Empty("f")).attrs.update(attrs)

    good = packed(tmp_path / "good")
    bad = edit_archive(tmp_path / "bad", change)
    said = f"corrupt run archive (dataset {name} is h5py.Empty: no shape, no values)"
    for command, args in EVERY_READER.items():
        for source in (str(bad), bad.as_uri()):
            result = runner.invoke(app, args(source, str(good), tmp_path))
            _assert_clean_failure(result.exit_code, result.stderr, 3)
            assert result.stderr == f"error: {source}: {said}\n", (command, result.stderr)
    assert not (tmp_path / "out.h5").exists()


def test_an_index_in_the_other_byte_order_reads_as_packed(tmp_path: Path) -> None:
    """Every index dataset rewritten big-endian (as on a machine of that order): each command
    prints what it prints for the archive as packed (read so before the type checks too: this
    guards that the checks accept either byte order, as they do for data datasets)."""

    def big_endian(handle: Any) -> None:
        names: list[str] = []
        handle.visititems(lambda n, obj: names.append(n) if hasattr(obj, "dtype") else None)
        for name in names:
            if name.startswith(("steps/", "scalars", "present/", "checksums/")) or name.endswith(
                ("step_offsets", "/shape")
            ):
                retyped_index(name, handle[name].dtype.newbyteorder(">").str)(handle)

    good = packed(tmp_path / "good")
    bad = tmp_path / "bad.h5"  # the same archive, rewritten: pack's timestamp is the same
    shutil.copyfile(good, bad)
    with h5py.File(bad, "r+") as handle:
        big_endian(handle)
    for command, args in EVERY_READER.items():
        if command == "pack":
            continue
        ran = [runner.invoke(app, args(str(run), str(good), tmp_path)) for run in (good, bad)]
        assert [r.exit_code for r in ran] == [0, 0], ran[1].stderr
        shown = [r.stdout.replace(str(bad), "RUN").replace(str(good), "RUN") for r in ran]
        # h5py appends each rewritten dataset, so the file's size (shown in MB) may differ
        shown = [re.sub(r"\d+\.\d+ MB", "SIZE", text) for text in shown]
        assert shown[1] == shown[0], command


def test_a_ragged_shape_that_disagrees_with_its_step_counts_is_an_unreadable_step(
    tmp_path: Path,
) -> None:
    """A step's token_ids reshaped to another shape of the same size (its CRC valid) is what a
    step file of that shape is in a run directory: an unreadable step, named, the others read
    (it was read silently: step 1's token_ids became (6, 2) with 4 sequences)."""

    def reshaped(handle: Any) -> None:
        name = "ragged/token_ids/shape"
        shapes = handle[name][()].copy()
        rows, columns = (int(d) for d in shapes[1])
        assert rows * columns % (rows + 2) == 0
        shapes[1] = [rows + 2, rows * columns // (rows + 2)]
        replace_dataset(handle, name, data=shapes).attrs[CRC_ATTR] = index_crc(shapes)

    bad = edit_archive(tmp_path / "bad", reshaped)
    result = runner.invoke(app, ["inspect", str(bad), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert [(f["kind"], f["step"]) for f in findings] == [("unreadable", 1)]
    assert "token_ids shape disagrees with its sequences count" in findings[0]["message"]
    runs = [packed(tmp_path / "good"), bad]
    replayed = [
        runner.invoke(app, ["replay", str(r), "-p", "grpo", "--format", "json"]) for r in runs
    ]
    assert [r.exit_code for r in replayed] == [0, 0], replayed[1].stderr
    steps = [json.loads(r.stdout)["steps"] for r in replayed]
    assert steps[1] == steps[0] - 1
    assert "step 1" in replayed[1].stderr


def test_a_run_path_with_brackets_prints_as_written(tmp_path: Path) -> None:
    """Paths are text, never rich markup: a run under `z[/x]` (an unmatched closing tag) made
    replay and inspect die with an internal error (exit 70), and `q[bold]` vanished from
    their titles."""
    source = ROOT / "fixtures" / "grpo"
    for parts in (("z[", "x]"), ("q[bold]",)):
        run = tmp_path.joinpath(*parts, "run")
        shutil.copytree(source, run)
        for args in (
            ["replay", str(run), "-p", "grpo", "--device", "cpu"],
            ["inspect", str(run)],
            ["check", str(run), "-p", "grpo", "--max-spikes", "1000"],
        ):
            result = runner.invoke(app, args, env={"COLUMNS": "400"})
            assert result.exit_code == 0, (args, result.stderr)
            assert str(run) in result.stdout + result.stderr, args


def test_a_key_given_twice_in_a_json_input_is_refused(tmp_path: Path) -> None:
    """`{"format": "other", ..., "format": "stabledrl-run"}`: Python's parser kept the last
    value and read the run; other parsers keep the first. A manifest, a baseline and an
    imported JSON line with a repeated key are each refused, exit 3 naming the key."""
    run = tiny_run(tmp_path / "run")
    manifest = run / "manifest.json"
    manifest.write_text('{"format": "other", ' + manifest.read_text()[1:])
    baseline = tmp_path / "baseline.json"
    baseline.write_text('{"schema": "x", "schema": "y"}')
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5, "loss": 0.25}\n')
    for args, key in (
        (["inspect", str(run)], "format"),
        (["check", str(tiny_run(tmp_path / "good")), "-b", str(baseline)], "schema"),
        (["import", str(log), "--out", str(tmp_path / "imported")], "loss"),
    ):
        result = runner.invoke(app, args)
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert f"the key '{key}' appears twice in one object" in result.stderr, result.stderr


def test_a_run_path_with_an_emoji_code_prints_as_written(tmp_path: Path) -> None:
    """Paths are text, never rich emoji codes: a run under `a:x:b` was named `a❌b` in
    inspect's and replay's tables and in the error line of a missing run."""
    run = tmp_path / "a:x:b" / "run"
    shutil.copytree(ROOT / "fixtures" / "grpo", run)
    for args in (["replay", str(run), "-p", "grpo", "--device", "cpu"], ["inspect", str(run)]):
        result = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 0, (args, result.stderr)
        assert str(run) in result.stdout + result.stderr, args
        assert "\N{CROSS MARK}" not in result.stdout + result.stderr, args
    missing = runner.invoke(app, ["inspect", str(tmp_path / "b:x:c")])
    assert missing.exit_code == 3
    assert missing.stderr.strip() == f"error: no such run: {tmp_path / 'b:x:c'}"


@pytest.mark.parametrize(
    ("note", "field"),
    [
        ({"recording_stopped": {"step": "abc", "rank": -1, "reason": 5}}, "recording_stopped"),
        ({"recording_stopped": {"step": 2, "rank": 0}}, "recording_stopped"),
        ({"recording_stopped": "disk full"}, "recording_stopped"),
        ({"recording_closed": "yes"}, "recording_closed"),
        ({"recording_closed_ranks": [0, "1"]}, "recording_closed_ranks"),
        ({"recording_closed_ranks": True}, "recording_closed_ranks"),
    ],
)
def test_a_recording_note_of_another_shape_is_a_corrupt_manifest(
    tmp_path: Path, note: dict[str, Any], field: str
) -> None:
    """`watch` printed 'recording stopped at step abc (rank -1) after a failed write: 5': the
    notes a Recorder writes are checked as the manifest's other fields are (exit 3, naming
    the field); a note as the Recorder writes it still reads."""
    run = tiny_run(tmp_path / "run")
    good = {"recording_stopped": {"step": None, "rank": 0, "reason": "disk full"}}
    edit_manifest(run, lambda m: m.update(good, recording_closed=False))
    assert runner.invoke(app, ["inspect", str(run)]).exit_code == 0
    edit_manifest(run, lambda m: m.update(note))
    for args in (["inspect", str(run)], ["watch", str(run), "--once"]):
        result = runner.invoke(app, args)
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert f"corrupt manifest: {field} must be" in result.stderr, result.stderr


def test_step_metadata_numbers_are_read_as_the_writer_spells_them(tmp_path: Path) -> None:
    """Python's float() and int() also read '1_0', ' 0.5 ' and other scripts' digits
    ('３２'): a count so spelled made no step unreadable, and such a scalar read as a value
    no writer wrote. A count is now ASCII digits or the step is unreadable; a scalar that is
    no number as a writer spells one is left out, as a newer minor's text metadata is."""
    run = tiny_run(tmp_path / "run")

    def odd(header: dict[str, Any]) -> None:
        header["__metadata__"].update(loss="1_0", grad_norm=" 0.5 ", reward_mean="０.５")

    edit_header(run, 0, odd)
    scalars = open_run(run).step(0).scalars
    assert not {"loss", "grad_norm", "reward_mean"} & set(scalars), scalars

    def odd_count(header: dict[str, Any]) -> None:
        meta = header["__metadata__"]
        meta["_num_tokens"] = "".join(chr(ord(c) + 0xFEE0) for c in meta["_num_tokens"])

    edit_header(run, 1, odd_count)
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert any(f["step"] == 1 and "is not an integer" in f["message"] for f in findings), findings


@pytest.mark.parametrize("name", ["manifest", "integrity"])
def test_a_text_checksum_that_is_no_text_is_a_mismatch(tmp_path: Path, name: str) -> None:
    """The checksum attribute of the archive's manifest (or integrity) text stored as an array:
    the line was Python's own 'corrupt run archive (ValueError: The truth value of an array
    with more than one element is ambiguous...)'. A checksum that is no text is a mismatch."""
    from _corpus import checksum_an_array

    target = edit_archive(tmp_path, checksum_an_array(name))
    result = runner.invoke(app, ["inspect", str(target), "--format", "json"])
    if name == "manifest":
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert "manifest checksum mismatch" in result.stderr, result.stderr
    else:
        assert result.exit_code == 0, result.stderr
        findings = json.loads(result.stdout)["integrity"]["findings"]
        assert [f["message"] for f in findings if f["kind"] == "unchecked"] == [
            "integrity: checksum mismatch (the findings it carries are read unchecked)"
        ], findings


def test_an_integrity_text_checksum_mismatch_skips_no_step(tmp_path: Path) -> None:
    """The archive's integrity text (the source's findings) with a checksum that does not
    match was an `unreadable` finding, which a replay counts as a skipped step: "warning:
    skipped 1 unreadable, incomplete or invalid step of RUN.h5 (integrity: checksum
    mismatch); replayed 4" of 4 steps. It holds no step: the replay skips none, says none."""

    def change(handle: h5py.File) -> None:
        handle["integrity"].attrs[CRC_ATTR] = "00000000"

    archive = edit_archive(tmp_path, change)
    result = runner.invoke(app, ["replay", str(archive), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert "skipped" not in result.stderr, result.stderr
    assert json.loads(result.stdout)["steps"] == 4


NOT_UTF8 = {
    "utf16_bom_then_utf8": lambda text: b"\xff\xfe" + text.encode() + b"x",
    "utf16": lambda text: text.encode("utf-16"),
    "utf16_le_without_bom": lambda text: text.encode("utf-16-le"),
    "utf32": lambda text: text.encode("utf-32"),
}
"""JSON text in bytes that are not UTF-8 (Python's JSON parser guesses UTF-16 or UTF-32 from
the first bytes and reads them)."""


@pytest.mark.parametrize("encode", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_a_manifest_that_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path, encode: Callable[[str], bytes]
) -> None:
    """The manifest is JSON in UTF-8. One in UTF-16 or UTF-32 was read as a good run (exit 0),
    and one starting with a UTF-16 byte-order mark was refused with Python's codec text
    ("not valid JSON ('utf-16-le' codec can't decode byte 0x78 in position 1822: truncated
    data)"). Each is one line naming the file, exit 3; a UTF-8 byte-order mark is still read."""
    run = tiny_run(tmp_path / "run")
    manifest = run / "manifest.json"
    text = manifest.read_text()
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert runner.invoke(app, ["inspect", str(run)]).exit_code == 0
    manifest.write_bytes(encode(text))
    for args in (
        ["inspect", str(run)],
        ["replay", str(run), "-p", "grpo"],
        ["watch", str(run), "--once"],
        ["pack", str(run), str(tmp_path / "out.h5")],
    ):
        result = runner.invoke(app, args)
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert result.stderr.endswith(
            f"error: {manifest}: unreadable manifest: not UTF-8 JSON\n"
        ), (args, result.stderr)


@pytest.mark.parametrize("encode", NOT_UTF8.values(), ids=NOT_UTF8.keys())
def test_a_user_json_file_that_is_not_utf8_is_refused_in_one_line(
    tmp_path: Path, encode: Callable[[str], bytes]
) -> None:
    """A baseline or a trainer_state.json in UTF-16 or UTF-32 was read as UTF-8 would be; they
    go through the manifest's reader, and are refused as it is, in one line naming the file."""
    run = tiny_run(tmp_path / "run")
    baseline = tmp_path / "baseline.json"
    written = runner.invoke(
        app, ["check", str(run), "-p", "grpo", "--write-baseline", str(baseline)]
    )
    assert written.exit_code == 0, written.stderr
    baseline.write_bytes(encode(baseline.read_text()))
    state = tmp_path / "trainer_state.json"
    state.write_bytes(encode('{"log_history": [{"step": 1, "loss": 0.5}]}'))
    for args, path, what in (
        (["check", str(run), "--baseline", str(baseline)], baseline, "baseline"),
        (["import", str(state), "--out", str(tmp_path / "imported")], state, "trainer_state.json"),
    ):
        result = runner.invoke(app, args)
        _assert_clean_failure(result.exit_code, result.stderr, 3)
        assert result.stderr.endswith(f"error: {path}: unreadable {what}: not UTF-8 JSON\n"), (
            args,
            result.stderr,
        )


def test_a_step_header_that_is_not_utf8_is_unreadable(tmp_path: Path) -> None:
    """A step file whose header JSON is UTF-16 (its checksums valid: the CRC covers the parsed
    header) was read as a good step, though safetensors reads headers as UTF-8 only: it is an
    `unreadable` finding, and a replay skips it."""
    run = tiny_run(tmp_path / "run")
    path = step_path(run, 1)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + length].decode().rstrip(" ")
    header = (text + " " * ((3 - len(text)) % 4)).encode("utf-16")  # 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length :])
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    findings = json.loads(result.stdout)["integrity"]["findings"]
    assert [(f["kind"], f["step"], f["message"]) for f in findings] == [
        ("unreadable", 1, "step 1: unreadable: header is not UTF-8 JSON")
    ]
    result = runner.invoke(app, ["replay", str(run), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["steps"] == 3, result.stderr


def _latin1_text(name: str) -> Callable[[h5py.File], None]:
    """The archive's text dataset `name` as Latin-1 bytes (one byte \\xe9 that is not UTF-8),
    without a checksum (as an archive of a stabledrl that wrote none)."""

    def change(handle: h5py.File) -> None:
        text = handle[name][()].decode()
        if name == "manifest":
            text = text.replace('"meta": {}', '"meta": {"x": "\\u00e9"}')
        else:
            text = '[{"kind": "unknown_file", "step": null, "path": "\\u00e9", "message": "m"}]'
        raw = json.dumps(json.loads(text), ensure_ascii=False).encode("latin-1")
        replace_dataset(handle, name, data=raw, dtype=h5py.string_dtype())

    return change


@pytest.mark.parametrize("name", ["manifest", "integrity"])
def test_an_archive_text_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    """An archive's manifest or integrity text holding a byte that is not UTF-8 was read with
    it replaced by U+FFFD (meta.x read as '\\ufffd', inspect exit 0): it is refused as a
    manifest.json that is not UTF-8 is, one line, exit 3, by every reader."""
    good = packed(tmp_path / "good")
    archive = edit_archive(tmp_path / "bad", _latin1_text(name))
    _every_reader_refuses(
        archive, good, tmp_path, f"{archive} ({name}): unreadable {name}: not UTF-8 JSON"
    )


def test_a_step_file_at_a_url_larger_than_memory_is_named_as_a_local_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read through fsspec (file://), a step file no buffer could hold was named 'cannot
    read: MemoryError' (measured under a 3.5 GB address-space cap on an 8 GB sparse step),
    where its local path says how large it is."""
    import fsspec.implementations.local as local

    run = tiny_run(tmp_path / "run")
    whole = local.LocalFileSystem.cat_file

    def cat_file(self: Any, path: str, start: Any = None, end: Any = None, **kw: Any) -> Any:
        if path.endswith("step-00000001.safetensors") and start is None:
            raise MemoryError
        return whole(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", cat_file)
    size = step_path(run, 1).stat().st_size
    result = CliRunner().invoke(app, ["replay", f"file://{run}", "-p", "grpo"])
    assert result.exit_code == 0, result.output
    said = f"(step 1: unreadable: a read of {size:,} bytes of it does not fit in memory)"
    assert said in result.stderr
