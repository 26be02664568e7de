"""`stabledrl pack`: the HDF5 archive holds the whole run, and every reader sees the same run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from _corpus import edit_header, flip_bit, step_path, tiny_run
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.cli.app import app
from stabledrl_cli.cli.pack import _size_change
from stabledrl_cli.dump import (
    RunIntegrityWarning,
    _archive_chunks,
    _layout,
    _pack_column,
    _pack_steps,
    _packer,
    open_run,
    pack_run,
)
from stabledrl_cli.dump._versions import check_readable_version
from stabledrl_cli.errors import InputError, UsageError, WriteError

ROOT = Path(__file__).resolve().parents[1]
# Named, not globbed: a checkout that lost a committed fixture fails instead of collecting less.
FIXTURE_RUNS = [ROOT / "fixtures" / "grpo", ROOT / "fixtures" / "stabledrl"]
runner = CliRunner()
STEPS = 24


@pytest.fixture(scope="module")
def rich_run(tmp_path_factory) -> Path:
    """24 steps with every kind of field, some only on some steps (seeded, deterministic).

    Token counts vary by step; logp_ref on every step, loss_weight on even steps only; gram on
    steps < 8, a float16 sketch with its scale on 8..15, none after; token_ids [N, k] with k
    varying; param_grad_norm; a NaN loss at step 5, a grad-norm spike at 12, a user scalar
    only on odd steps.
    """
    path = tmp_path_factory.mktemp("pack") / "run"
    gen = torch.Generator().manual_seed(7)
    names = [f"layer{i}.weight" for i in range(5)]
    with sd.Recorder(
        path,
        policy="grpo",
        policy_params={"eps_low": 0.2},
        reward_range=(0.0, 1.0),
        param_names=names,
        geometry={"kind": "mixed", "note": "test"},
    ) as rec:
        for step in range(STEPS):
            rows, cols = 4, 6 + step % 3
            logp = -torch.rand(rows, cols, generator=gen)
            mask = torch.ones(rows, cols)
            mask[:, -1] = step % 2
            units = rows * cols
            extra = {}
            if step % 2 == 0:
                extra["loss_weight"] = torch.rand(rows, cols, generator=gen)
            if step < 8:
                grads = torch.randn(units, 5, generator=gen)
                extra["unit_grad_gram"] = grads @ grads.T
            elif step < 16:
                extra["unit_grad_sketch"] = torch.randn(units, 4, generator=gen).half()
                extra["unit_grad_sketch_scale"] = 0.5 + step / 10
            rec.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.05 * torch.randn(rows, cols, generator=gen),
                logp_ref=logp - 0.01,
                advantages=torch.randn(rows, generator=gen),
                mask=mask,
                group_id=np.array([0, 0, 1, 1]),
                reward=torch.rand(rows, generator=gen),
                token_ids=torch.randint(0, 50, (rows, 3 + step % 4), generator=gen),
                param_grad_norm=torch.rand(5, generator=gen),
                grad_norm=30.0 if step == 12 else 1.0 + step / 100,
                grad_norm_covered=1.0,
                loss=float("nan") if step == 5 else 0.1 * step,
                inner_step=step % 2,
                scalars={"kl": 0.01 * step} if step % 2 else None,
                **extra,
            )
    return path


@pytest.fixture(scope="module")
def rich_archive(rich_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archive") / "run.h5"
    pack_run(open_run(rich_run), out)
    return out


def _same_scalars(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def test_archive_reads_back_every_array_and_scalar(rich_run, rich_archive):
    source, archive = open_run(rich_run), open_run(rich_archive)
    assert type(archive).__name__ == "ArchiveRun"
    assert archive.manifest == source.manifest
    assert archive.unit == source.unit and archive.policy_spec == source.policy_spec
    assert archive.geometry == source.geometry and archive.reward_range == source.reward_range
    assert archive.step_numbers == source.step_numbers == list(range(STEPS))
    assert archive.integrity.ok
    for a, b in zip(source.steps(), archive.steps(), strict=True):
        assert (a.step, a.fields, a.num_tokens) == (b.step, b.fields, b.num_tokens)
        assert (a.num_sequences, a.num_scored_tokens) == (b.num_sequences, b.num_scored_tokens)
        assert _same_scalars(a.scalars, b.scalars)
        for name in a.fields:
            x, y = a[name], b[name]
            assert x.dtype == y.dtype and x.shape == y.shape, name
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    step = archive.step(9)
    assert step["unit_grad_sketch"].dtype == torch.float16
    assert "loss_weight" not in step and "unit_grad_gram" not in step
    assert step["token_ids"].shape == (4, 3 + 9 % 4)
    with pytest.raises(KeyError, match="no field 'loss_weight'"):
        step["loss_weight"]
    with pytest.raises(InputError, match="no step 99"):
        archive.step(99)
    for name in ("loss", "kl", "grad_norm"):
        (s1, v1), (s2, v2) = source.scalar_series(name), archive.scalar_series(name)
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(v1, v2)  # NaN == NaN for assert_array_equal


def test_archive_layout(rich_archive):
    with h5py.File(rich_archive, "r") as handle:
        assert handle.attrs["kind"] == "stabledrl-run"
        assert "manifest" in handle and "manifest" not in handle.attrs
        assert json.loads(handle["manifest"][()])["policy"]["spec"] == "grpo:eps_low=0.2"
        offsets = handle["tokens/step_offsets"][()]
        assert offsets.shape == (STEPS + 1,) and offsets[0] == 0
        assert (
            offsets[-1]
            == handle["tokens/logp"].shape[0]
            == sum(4 * (6 + s % 3) for s in range(STEPS))
        )
        assert handle["sequences/step_offsets"][-1] == 4 * STEPS
        # pack's default, "fast": a field that deflate halves (a mask of runs) is compressed,
        # with Fletcher32; high-entropy floats are stored as they are, without Fletcher32, and
        # checked by the CRC-32 of each step's slice (a step without the field: its fill)
        for name, offsets_name in (
            ("tokens/logp", "tokens/step_offsets"),
            ("sequences/reward", "sequences/step_offsets"),
            ("ragged/unit_grad_sketch/data", "ragged/unit_grad_sketch/step_offsets"),
        ):
            dataset, bounds = handle[name], handle[offsets_name][()]
            assert dataset.chunks is not None and not dataset.fletcher32
            crcs = handle[f"checksums/{name}"]
            assert crcs.dtype == np.uint32 and crcs.shape == (STEPS,)
            assert crcs.attrs["crc32"]
            values = dataset[()]
            assert crcs[()].tolist() == [
                zlib.crc32(values[bounds[i] : bounds[i + 1]].tobytes()) for i in range(STEPS)
            ]
        assert handle.attrs["format_version"] == "2.0"
        assert handle["tokens/mask"].compression == "gzip" and not handle["tokens/mask"].shuffle
        assert handle["tokens/mask"].fletcher32 and "checksums/tokens/mask" not in handle
        assert handle["tokens/logp"].compression is None
        assert handle["ragged/unit_grad_sketch/data"].dtype == np.float16
        assert handle["ragged/unit_grad_gram/shape"][3].tolist() == [4 * 6, 4 * 6]
        assert handle["present/loss_weight"][()].tolist() == [1, 0] * (STEPS // 2)
        assert handle["scalars_recorded/kl"][()].tolist() == [0, 1] * (STEPS // 2)
        assert math.isnan(handle["scalars/loss"][5]) and handle["scalars_recorded/loss"][5]


def _chunked(handle: h5py.File) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each data dataset's length and chunk shape."""
    return {d.name.lstrip("/"): (d.shape[0], d.chunks) for d in _data_datasets(handle)}


def test_a_small_run_packs_into_chunks_of_its_own_size(tmp_path, monkeypatch):
    """A 4-step run of 12 tokens a step (6.6 kB of step files) packed into 704 kB: every data
    dataset was chunked at 32 Ki entries, and an uncompressed chunk takes its whole 128 KiB
    on disk. A column shorter than a chunk is now one chunk of its length; a longer one keeps
    CHUNK_ELEMENTS (here lowered to 16) if compressed, CHUNK_ELEMENTS x 8 bytes if not (32
    float32 entries here: 131,072 float16 sketch entries at the real size), and reads back
    the same."""
    run = tiny_run(tmp_path / "run")
    summary = pack_run(run, tmp_path / "run.h5")
    assert summary.archive_bytes < summary.source_bytes + 64_000
    with h5py.File(tmp_path / "run.h5", "r") as handle:
        chunked = _chunked(handle)
    assert chunked and all(chunks == (length,) for length, chunks in chunked.values())
    monkeypatch.setattr(_pack_column, "CHUNK_ELEMENTS", 16)
    pack_run(run, tmp_path / "small-chunks.h5")
    with h5py.File(tmp_path / "small-chunks.h5", "r") as handle:
        chunked = _chunked(handle)
        widths = {d.name.lstrip("/"): 16 * 8 // d.dtype.itemsize for d in _data_datasets(handle)}
        plain = {d.name.lstrip("/") for d in _data_datasets(handle) if d.compression is None}
    assert chunked["tokens/logp"] == (48, (32,)) and chunked["sequences/reward"] == (16, (16,))
    assert plain and all(
        chunks == (min(length, max(16, widths[name]) if name in plain else 16),)
        for name, (length, chunks) in chunked.items()
    )
    assert _replay_json(tmp_path / "small-chunks.h5") == _replay_json(run)


def test_a_reader_of_format_1_refuses_an_archive_with_step_checksums(rich_archive):
    """A tool of major version 1 checks an archive's version as `check_readable_version`
    does with its default, and would read the datasets without Fletcher32 unchecked: the
    archive's 2.0 makes it refuse them instead ("upgrade stabledrl")."""
    with h5py.File(rich_archive, "r") as handle:
        version = handle.attrs["format_version"]
    with pytest.raises(InputError, match=r"run format 2\.0 is newer .*upgrade stabledrl"):
        check_readable_version(version, "run.h5")
    assert check_readable_version(version, "run.h5", _layout.ARCHIVE_MAJOR) == (2, 0)


def _replay_json(run) -> dict:
    data = json.loads(sd.replay(run, device="cpu").to_json())
    data.pop("run")
    return data


@pytest.fixture(scope="module")
def rich_replay(rich_run) -> dict:
    """The rich run's replay as JSON, which each archive of it replays to."""
    return _replay_json(rich_run)


def test_replay_of_archive_is_identical(rich_replay, rich_archive):
    assert rich_replay["geometry"] == "mixed"
    assert _replay_json(rich_archive) == rich_replay


def _data_datasets(handle: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    for group in ("tokens", "sequences", "ragged"):
        handle[group].visititems(
            lambda name, obj: (
                found.append(obj) if isinstance(obj, h5py.Dataset) and obj.chunks else None
            )
        )
    return found


def test_small_compression_gzips_every_field_and_replays_identically(
    rich_run, rich_replay, tmp_path
):
    out = tmp_path / "small.h5"
    result = runner.invoke(app, ["pack", str(rich_run), str(out), "--compression", "small"])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as handle:
        datasets = _data_datasets(handle)
        assert len(datasets) > 10
        for dataset in datasets:
            assert dataset.compression == "gzip" and dataset.fletcher32
        assert handle["tokens/logp"].shuffle  # random floats: the shuffle makes them smaller
    assert _replay_json(out) == rich_replay


def test_small_compression_shuffles_only_the_fields_the_shuffle_makes_smaller(tmp_path):
    """`pack --compression small` (help: 'the smallest file') shuffled every field, and on the
    README's runs/mine (examples/train_logged.py: log-probs of a few hundred distinct values)
    wrote 0.13 MB where `fast` wrote 0.10 MB, its log-probs 54% larger than fast's. Shuffle
    is now kept only where it makes a field's first values smaller."""
    run = tmp_path / "run"
    levels = -np.linspace(0.1, 3.0, 7, dtype=np.float32)  # few bit patterns, as a softmax's
    rng = np.random.default_rng(0)
    with sd.Recorder(run, policy="grpo", unit="token") as recorder:
        for step in range(20):
            logp = rng.choice(levels, size=(32, 16))
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp,
                advantages=rng.standard_normal(32).astype(np.float32),
                mask=np.ones((32, 16), dtype=np.float32),
                group_id=np.repeat(np.arange(4), 8),
                reward=rng.random(32).astype(np.float32),
            )
    sizes = {}
    for compression in ("fast", "small"):
        out = tmp_path / f"{compression}.h5"
        sizes[compression] = pack_run(run, out, compression=compression).archive_bytes
    with h5py.File(tmp_path / "small.h5", "r") as handle:
        assert not handle["tokens/logp"].shuffle
        assert handle["tokens/logp"].compression == "gzip" and handle["tokens/logp"].fletcher32
    assert sizes["small"] < sizes["fast"]
    assert _replay_json(tmp_path / "small.h5") == _replay_json(run)


def test_an_unknown_compression_is_a_usage_error(rich_run, tmp_path):
    result = runner.invoke(
        app, ["pack", str(rich_run), str(tmp_path / "a.h5"), "--compression", "zip"]
    )
    assert result.exit_code == 2 and "zip" in result.stderr
    with pytest.raises(UsageError, match="compression 'zip'"):
        pack_run(open_run(rich_run), tmp_path / "b.h5", compression="zip")  # type: ignore[arg-type]
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


@pytest.mark.parametrize("fixture", FIXTURE_RUNS, ids=lambda p: p.name)
def test_fixture_pack_replays_identically(fixture, tmp_path):
    out = tmp_path / f"{fixture.name}.h5"
    result = runner.invoke(app, ["pack", str(fixture), str(out)])
    assert result.exit_code == 0, result.output
    assert _replay_json(out) == _replay_json(fixture)


def _cli_json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_inspect_replay_and_cli_read_the_archive(rich_run, rich_archive):
    direct = _cli_json(["inspect", str(rich_run), "--format", "json"])
    packed = _cli_json(["inspect", str(rich_archive), "--format", "json"])
    assert direct["archive_version"] is None and packed["archive_version"] is not None
    for data in (direct, packed):
        for where in ("run", "size_bytes", "archive_version", "archive_known"):
            data.pop(where)
    assert packed == direct
    replayed = _cli_json(
        ["replay", str(rich_archive), "-p", "grpo", "-f", "json", "--device", "cpu"]
    )
    assert replayed["run"] == str(rich_archive) and replayed["steps"] == STEPS


def test_pack_cli_json_summary_and_refuses_overwrite(rich_run, tmp_path):
    out = tmp_path / "run.h5"
    data = _cli_json(["pack", str(rich_run), str(out), "--format", "json"])
    assert data["steps"] == STEPS and data["out"] == str(out) and data["integrity"]["ok"]
    assert data["archive_bytes"] == out.stat().st_size
    before = out.read_bytes()
    again = runner.invoke(app, ["pack", str(rich_run), str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    assert out.read_bytes() == before
    forced = runner.invoke(app, ["pack", str(rich_run), str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "packed 24 steps" in forced.stdout
    # A small run's archive outgrows it (HDF5's fixed overhead): said as larger, never as a
    # ratio under 1 that reads as a shrink.
    assert data["archive_bytes"] > data["source_bytes"]
    shown = _size_change(data["source_bytes"], data["archive_bytes"])
    line = " ".join(forced.stdout.split())  # wrapped at the console's width where it falls
    assert f"({shown})" in line and shown.endswith(" larger"), forced.stdout
    missing_dir = runner.invoke(app, ["pack", str(rich_run), str(tmp_path / "no" / "x.h5")])
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.stderr
    to_dir = runner.invoke(app, ["pack", str(rich_run), str(tmp_path)])
    assert to_dir.exit_code == 2 and "is a directory" in to_dir.stderr
    no_run = runner.invoke(app, ["pack", str(tmp_path / "nope"), str(tmp_path / "y.h5")])
    assert no_run.exit_code == 3 and "no such run" in no_run.stderr


def test_failed_pack_leaves_no_file_under_the_target(rich_run, tmp_path, monkeypatch):
    calls = []
    real_add = _pack_steps.Packer.add

    def add_then_fail(self, step, where):
        calls.append(step.step)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_add(self, step, where)

    monkeypatch.setattr(_pack_steps.Packer, "add", add_then_fail)
    out = tmp_path / "run.h5"
    with pytest.raises(WriteError, match=r"run\.h5: cannot write it \(disk full \(simulated"):
        pack_run(open_run(rich_run), out)
    assert calls == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []  # no target, and the temporary file is removed
    # An existing archive is kept whole when a forced re-pack fails.
    out.write_bytes(b"previous archive")
    calls.clear()
    with pytest.raises(WriteError, match="simulated"):
        pack_run(open_run(rich_run), out, force=True)
    assert out.read_bytes() == b"previous archive"
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]


_KILLED_WORKER = """
import sys, time
from stabledrl_cli.dump import _pack_steps, open_run, pack_run
real_add = _pack_steps.Packer.add
def add(self, step, where):
    real_add(self, step, where)
    if step.step == 5:
        print("midway", flush=True)
        time.sleep(600)
_pack_steps.Packer.add = add
pack_run(open_run(sys.argv[1]), sys.argv[2])
"""


@contextmanager
def _half_done_pack(run: Path, out: Path) -> Iterator[subprocess.Popen]:
    """A process packing `run` into `out`, stopped (asleep) after its sixth step; killed on
    leaving if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WORKER, str(run), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "midway"  # blocks until the pack is half done
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_killed_pack_leaves_no_file_under_the_target(rich_run, tmp_path):
    out = tmp_path / "run.h5"
    with _half_done_pack(rich_run, out) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run.h5.tmp-")
    # open_run never mistakes the half-written temporary file for the archive.
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 3


def test_a_later_pack_removes_the_temporary_file_of_a_killed_pack_not_of_a_live_one(
    rich_run, tmp_path, monkeypatch
):
    """A pack killed by SIGKILL left `.run.h5.tmp-PID` beside the target forever: every later
    pack left it there (measured: the built-in example's pack killed mid-write, then a pack
    to the same name: both the archive and the 5.8 kB temporary file stayed). A pack now
    removes the temporary files of its target whose writer is gone; a live pack's (its
    process runs, and it holds a flock of the file: a process on another machine sharing
    the file system is seen so), and files of other names, stay."""
    out = tmp_path / "run.h5"
    with _half_done_pack(rich_run, out) as proc:
        live = tmp_path / f".run.h5.tmp-{proc.pid}"
        pack_run(rich_run, out, force=True)  # beside a live pack
        assert live.exists()
        with monkeypatch.context() as patch:  # as if its process ran elsewhere: its flock
            patch.setattr(_atomic, "_gone", lambda pid: True)
            pack_run(rich_run, out, force=True)
        assert live.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    other = tmp_path / f".other.h5.tmp-{proc.pid}"  # another target's
    other.write_bytes(b"x")
    assert live.exists()
    result = runner.invoke(app, ["pack", str(rich_run), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "run.h5"]
    assert open_run(out).step_numbers == list(range(STEPS))


def test_pack_does_not_name_a_file_browsers_files_as_left_out(tmp_path):
    """A run whose folder a file browser had shown packed with 'warning: ... not Thumbs.db,
    desktop.ini (0.00 MB): keep the run directory for them' and those two in the JSON's
    left_out, though every reader and --force treat them as no run's. They are not named now;
    a folder that only bears such a name is."""
    run = tiny_run(tmp_path / "run")
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._manifest.json"):
        (run / name).write_bytes(b"junk")
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(run), str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["left_out"] == {}
    assert "warning" not in result.stderr
    (run / "Thumbs.db").unlink()
    (run / "Thumbs.db").mkdir()
    (run / "Thumbs.db" / "mine.txt").write_text("mine")
    result = runner.invoke(app, ["pack", str(run), str(out), "--force", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["left_out"] == {"Thumbs.db/": 4}


def test_pack_says_which_files_of_the_run_directory_the_archive_does_not_hold(tmp_path):
    """A run recorded with --checkpoint-every 2 packed as '0.44 MB -> 0.05 MB (9.5x
    smaller)', silent that its 0.43 MB checkpoints/ (which `stabledrl branch` reads from the
    run directory) are not in the archive: a user deleting the directory for its archive lost
    them. The size now counts what the archive holds, and a warning names what it does not
    (a run's dot-named notes and locks are its own, not named)."""
    run = tiny_run(tmp_path / "run")
    held = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-00000002.pt").write_bytes(bytes(400_000))
    (run / "notes.txt").write_text("mine")
    (run / ".writer.rank-0000.lock").write_bytes(b"")
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(run), str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source_bytes"] == held
    assert data["left_out"] == {"checkpoints/": 400_000, "notes.txt": 4}
    assert (
        f"warning: {run}: the archive holds its manifest and steps, not checkpoints/, notes.txt "
        "(0.40 MB): keep the run directory for them (stabledrl branch reads checkpoints/ there)"
    ) in " ".join(result.stderr.split())
    again = runner.invoke(app, ["pack", str(out), str(tmp_path / "again.h5")])
    assert again.exit_code == 0 and "warning" not in again.stderr, again.output


def test_pack_carries_integrity_findings(rich_run, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "steps").mkdir()
    (damaged / "manifest.json").write_bytes((rich_run / "manifest.json").read_bytes())
    for src in sorted((rich_run / "steps").iterdir())[:10]:
        (damaged / "steps" / src.name).write_bytes(src.read_bytes())
    torn = damaged / "steps" / "step-00000004.safetensors"
    torn.write_bytes(torn.read_bytes()[:-50])
    (damaged / "steps" / ".step-00000010.safetensors.tmp-99").write_bytes(b"partial")
    out = tmp_path / "damaged.h5"
    result = runner.invoke(app, ["pack", str(damaged), str(out)])
    assert result.exit_code == 0, result.output
    assert "2 integrity finding(s) (temporary, torn)" in result.stderr
    archive = open_run(out)
    assert archive.step_numbers == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    kinds = [(f.kind, f.step) for f in archive.integrity.findings]
    assert kinds == [("torn", 4), ("temporary", 10)]
    inspected = _cli_json(["inspect", str(out), "--format", "json"])
    assert [f["kind"] for f in inspected["integrity"]["findings"]] == ["torn", "temporary"]


@pytest.fixture
def fletcher32_everywhere(monkeypatch):
    """`pack` as it was before the per-step CRC-32s: Fletcher32 on every data dataset."""
    monkeypatch.setitem(_layout.FILTERS, "plain", {"fletcher32": True})


def test_an_archive_with_fletcher32_everywhere_reads_and_verifies_as_before(
    rich_run, rich_replay, tmp_path, fletcher32_everywhere
):
    out = tmp_path / "run.h5"
    pack_run(open_run(rich_run), out)
    with h5py.File(out, "r") as handle:
        assert "checksums" not in handle and handle.attrs["format_version"] == "1.0"
        assert all(d.fletcher32 for d in _data_datasets(handle))
    archive = open_run(out)
    assert archive.integrity.findings == [] and len(list(archive.steps())) == STEPS
    assert _replay_json(out) == rich_replay


def test_corrupt_archive_chunk_is_a_finding_and_its_steps_are_skipped(
    rich_run, tmp_path, fletcher32_everywhere
):
    out = tmp_path / "run.h5"
    pack_run(open_run(rich_run), out)
    with h5py.File(out, "r") as handle:
        info = handle["tokens/logp_old"].id.get_chunk_info(0)
    with open(out, "r+b") as fh:  # flip bytes inside the first chunk of logp_old
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\xff\x00\xff\x00")
    archive = open_run(out)
    findings = archive.integrity.findings  # one small chunk holds every step's logp_old
    assert [(f.kind, f.step) for f in findings] == [("unreadable", n) for n in range(STEPS)]
    assert all(f.path.endswith(":tokens/logp_old") for f in findings)
    assert archive.step_numbers == []
    with pytest.raises(InputError, match=rf"no step could be read \({STEPS} steps were skipped"):
        sd.replay(out, ["grpo"], device="cpu")  # before: '1 step file was skipped'
    fresh = open_run(out)
    with pytest.warns(RunIntegrityWarning, match="checksum"):
        assert list(fresh.steps()) == []
    with pytest.raises(InputError, match="unreadable"):
        open_run(out).step(3)


def _flip_in_step(archive: Path, name: str, offsets_name: str, step: int) -> None:
    """Flips one byte of dataset `name`'s slice of step `step` (index) in the file."""
    with h5py.File(archive, "r") as handle:
        dataset = handle[name]
        info = dataset.id.get_chunk_info(0)
        assert not dataset.fletcher32 and dataset.compression is None
        begin = int(handle[offsets_name][step]) * dataset.dtype.itemsize
    with open(archive, "r+b") as fh:
        fh.seek(info.byte_offset + begin + 1)
        byte = fh.read(1)
        fh.seek(info.byte_offset + begin + 1)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize(
    ("name", "offsets_name", "step"),
    [
        ("tokens/logp_old", "tokens/step_offsets", 3),
        ("ragged/unit_grad_sketch/data", "ragged/unit_grad_sketch/step_offsets", 9),
    ],
)
def test_a_flipped_byte_in_a_step_of_a_dataset_without_fletcher32_is_found(
    rich_run, tmp_path, name, offsets_name, step
):
    out = tmp_path / "run.h5"
    pack_run(open_run(rich_run), out)
    _flip_in_step(out, name, offsets_name, step)
    others = [n for n in range(STEPS) if n != step]
    with pytest.warns(RunIntegrityWarning, match=f"archive data checksum failed: {name}"):
        assert [s.step for s in open_run(out).steps()] == others
    with pytest.raises(InputError, match=f"step {step} is unreadable: archive data checksum"):
        open_run(out).step(step)
    archive = open_run(out)  # the integrity check alone reads every step's slice
    (finding,) = archive.integrity.findings
    assert (finding.kind, finding.step) == ("unreadable", step)
    assert finding.path.endswith(f":{name}") and "CRC-32" in finding.message
    assert archive.step_numbers == others
    inspected = _cli_json(["inspect", str(out), "--format", "json"])
    assert [(f["kind"], f["step"]) for f in inspected["integrity"]["findings"]] == [
        ("unreadable", step)
    ]
    result = runner.invoke(app, ["replay", str(out), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert f"step {step}" in result.stderr, result.stderr
    assert json.loads(result.stdout)["steps"] == STEPS - 1


def test_a_step_bad_in_two_datasets_is_counted_as_one_step_skipped(rich_run, tmp_path):
    """Step 3's slices of logp and logp_old both flipped: replay warned 'skipped 2 unreadable,
    incomplete or invalid steps ... replayed 23' of 24 (a finding per dataset counted as a
    step). One step is skipped, and said so; inspect still names both datasets."""
    out = tmp_path / "run.h5"
    pack_run(open_run(rich_run), out)
    for name in ("tokens/logp", "tokens/logp_old"):
        _flip_in_step(out, name, "tokens/step_offsets", 3)
    inspected = _cli_json(["inspect", str(out), "--format", "json"])
    assert [
        (f["step"], f["path"].rsplit(":", 1)[1]) for f in inspected["integrity"]["findings"]
    ] == [
        (3, "tokens/logp"),
        (3, "tokens/logp_old"),
    ]
    result = runner.invoke(app, ["replay", str(out), "-p", "grpo", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == STEPS - 1
    assert f"skipped 1 unreadable, incomplete or invalid step of {out}" in " ".join(
        result.stderr.split()
    ), result.stderr


def _partly_held_run(path: Path) -> Path:
    """6 steps: step 1 without a batch (its grad_norm 7.0 only), logp_ref from step 3 on."""
    gen = torch.Generator().manual_seed(0)
    with sd.Recorder(path, policy="grpo") as recorder:
        for step in range(6):
            if step == 1:
                recorder.log_step(step, grad_norm=7.0)
                continue
            logp = -torch.rand(4, 5, generator=gen)
            ref = None if step < 3 else logp - 0.02
            recorder.log_step(
                step, logp=logp, logp_old=logp + 0.01, logp_ref=ref, advantages=torch.ones(4)
            )
    return path


def test_a_corrupt_chunk_skips_only_the_steps_that_hold_data_in_it(tmp_path, fletcher32_everywhere):
    """One chunk holds every step's logp_ref, corrupt: the integrity check marked all 6 steps
    unreadable, where steps 0-2 hold no logp_ref (step 1 no batch: its grad_norm was lost from
    the scalar series) and read whole. Only steps 3-5 are skipped."""
    out = tmp_path / "run.h5"
    pack_run(_partly_held_run(tmp_path / "run"), out)
    with h5py.File(out, "r") as handle:
        info = handle["tokens/logp_ref"].id.get_chunk_info(0)
    with open(out, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\xff\x00\xff\x00")
    archive = open_run(out)
    assert [f.step for f in archive.integrity.findings] == [3, 4, 5]
    assert archive.step_numbers == [0, 1, 2]
    steps, values = archive.scalar_series_many(["grad_norm"])["grad_norm"]
    assert (steps.tolist(), values.tolist()) == ([1], [7.0])


def test_a_flipped_byte_where_a_step_lacks_the_field_skips_no_step(tmp_path):
    """Step 0 has no logp_ref: its slice of tokens/logp_ref is pack's fill value, which no read
    of it touches. A byte flipped there made the integrity check skip step 0 (read whole by
    steps())."""
    out = tmp_path / "run.h5"
    pack_run(_partly_held_run(tmp_path / "run"), out)
    _flip_in_step(out, "tokens/logp_ref", "tokens/step_offsets", 0)
    archive = open_run(out)
    assert archive.integrity.findings == [] and archive.step_numbers == list(range(6))


def test_open_run_refuses_reports_and_other_hdf5(tmp_path, rich_run):
    report = tmp_path / "report.h5"
    with h5py.File(report, "w") as handle:
        handle.attrs["kind"] = "stabledrl-replay-report"
    with pytest.raises(InputError, match="is a replay report, not a run"):
        open_run(report)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("x", data=[1, 2])
    result = runner.invoke(app, ["inspect", str(other)])
    assert result.exit_code == 3 and "not a run" in result.stderr
    newer = tmp_path / "newer.h5"
    pack_run(open_run(rich_run), newer)
    with h5py.File(newer, "r+") as handle:
        handle.attrs["format_version"] = "3.0"
    result = runner.invoke(app, ["replay", str(newer)])
    assert result.exit_code == 3 and "newer than this tool reads" in result.stderr
    broken = tmp_path / "broken.h5"
    pack_run(open_run(rich_run), broken)
    with h5py.File(broken, "r+") as handle:
        del handle["steps/step"]
    result = runner.invoke(app, ["inspect", str(broken)])
    assert result.exit_code == 3 and "corrupt run archive" in result.stderr
    missing = tmp_path / "missing.h5"
    pack_run(open_run(rich_run), missing)
    with h5py.File(missing, "r+") as handle:
        del handle["tokens/logp"]
    with pytest.raises(InputError, match="corrupt run archive \\(no dataset tokens/logp\\)"):
        open_run(missing)


def test_large_manifest_and_multi_rank_run(tmp_path):
    path = tmp_path / "ranks"
    names = [f"model.layers.{i}.mlp.weight.with.a.long.name" for i in range(3000)]  # > 64 KiB
    recorders = [sd.Recorder(path, world_size=2, rank=r, param_names=names) for r in (0, 1)]
    for step in range(3):
        for rank, rec in enumerate(recorders):
            rec.log_step(
                step,
                logp=torch.full((2, 3), -1.0 - rank),
                logp_old=torch.full((2, 3), -1.0),
                advantages=torch.tensor([1.0, -1.0]),
                group_id=np.array([0, 0]),
                reward=np.array([1.0, float(rank)]),
                unit_grad_sketch=torch.ones(6, 2).half(),
                unit_grad_sketch_scale=2.0 + rank,
                loss=float(rank),
            )
    for rec in recorders:
        rec.close()
    assert len(json.dumps(open_run(path).manifest)) > 65536
    out = tmp_path / "ranks.h5"
    pack_run(open_run(path), out)
    source, archive = open_run(path), open_run(out)
    assert archive.manifest["param_names"] == names
    for a, b in zip(source.steps(), archive.steps(), strict=True):
        assert a.fields == b.fields and _same_scalars(a.scalars, b.scalars)
        for name in a.fields:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert archive.step(1)["seq_id"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert archive.step(1)["unit_grad_sketch"].dtype == torch.float32


def test_pack_run_rejects_existing_target_in_python(rich_run, tmp_path):
    out = tmp_path / "x.h5"
    out.write_bytes(b"")
    with pytest.raises(UsageError, match="already exists"):
        pack_run(open_run(rich_run), out)


def test_a_run_with_no_readable_step_is_refused_and_leaves_no_archive(tmp_path):
    """A run of no step, or whose every step file is torn, packed into an archive of no step
    and exited 0 ('packed 0 steps'): a CI job shipped an archive that every replay refuses.
    Exit 3, as `replay` refuses such a run, naming the first finding; no file at OUT.h5."""
    empty = tmp_path / "empty"
    sd.Recorder(empty).close()
    torn = tiny_run(tmp_path / "torn")
    for step_file in (torn / "steps").iterdir():
        step_file.write_bytes(step_file.read_bytes()[:50])
    for run, said in (
        (empty, "the run has no steps; nothing to pack"),
        (torn, "no readable step to pack (4 integrity findings, the first: step 0: torn:"),
    ):
        out = tmp_path / f"{run.name}.h5"
        result = runner.invoke(app, ["pack", str(run), str(out)])
        assert result.exit_code == 3, result.output
        assert f"error: {run}: {said}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "torn"]
        with pytest.raises(InputError, match=r"nothing to pack|no readable step to pack"):
            pack_run(open_run(run), out)


def test_check_reads_the_archive_like_the_directory(rich_run, rich_archive, tmp_path):
    baseline = tmp_path / "rich.baseline.json"
    args = ["-p", "grpo", "-p", "is", "--device", "cpu"]
    written = runner.invoke(app, ["check", str(rich_run), *args, "--write-baseline", str(baseline)])
    assert written.exit_code == 0, written.output
    gates = ["--baseline", str(baseline), "--max-collapsed", "0", "--format", "json"]
    direct = runner.invoke(app, ["check", str(rich_run), *args, *gates])
    packed = runner.invoke(app, ["check", str(rich_archive), *args, *gates])
    assert direct.exit_code == packed.exit_code
    assert json.loads(packed.stdout)["gates"] == json.loads(direct.stdout)["gates"]
    assert all(g["ok"] for g in json.loads(packed.stdout)["gates"] if g["gate"] != "max_collapsed")


def test_a_run_without_per_sequence_arrays_packs_and_replays_as_its_directory(tmp_path: Path):
    """Steps with token arrays only (no reward, group_id or micro_batch: the archive has no
    `sequences/` data) read from the .h5 as from the directory; every step was refused
    ("its sequences offsets disagree with its counts or the data")."""
    with sd.Recorder(tmp_path / "run") as rec:
        for step in range(3):
            rec.log_step(
                step,
                logp=np.full(4, -1.0 - step, np.float32),
                logp_old=np.full(4, -1.1, np.float32),
                advantages=np.array([1, 1, -1, -1], np.float32),
                seq_id=np.array([0, 0, 1, 1]),
            )
    pack_run(open_run(tmp_path / "run"), tmp_path / "run.h5")
    assert open_run(tmp_path / "run.h5").integrity.ok
    replays = [
        runner.invoke(app, ["replay", str(tmp_path / name), "-p", "grpo", "--format", "json"])
        for name in ("run", "run.h5")
    ]
    assert [r.exit_code for r in replays] == [0, 0], replays[1].stderr
    directory, archive = (json.loads(r.stdout) for r in replays)
    assert directory["steps"] == archive["steps"] == 3
    assert directory["policies"] == archive["policies"]


def test_a_file_name_that_is_not_utf8_in_steps_packs_to_a_readable_archive(tmp_path):
    """A stray file in steps/ whose name is not UTF-8 is an unknown_file finding, carried into
    the archive named escaped (junk\\xff). Before, its lone surrogate went into the archive's
    integrity text, which every reader then refused (exit 3), pack having exited 0."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    (run / "steps" / os.fsdecode(b"junk\xff.safetensors")).write_text("x")
    out = tmp_path / "run.h5"
    packed = runner.invoke(app, ["pack", str(run), str(out)])
    assert packed.exit_code == 0, packed.output
    shown = runner.invoke(app, ["inspect", str(out), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    (finding,) = json.loads(shown.stdout)["integrity"]["findings"]
    assert finding["kind"] == "unknown_file" and finding["path"].endswith("junk\\xff.safetensors")


def test_a_run_at_a_path_that_is_not_utf8_packs(tmp_path):
    """The archive's `source` attribute names the run's path escaped. Before, h5py could not
    encode its lone surrogate: an internal error (UnicodeEncodeError, exit 70)."""
    run = tmp_path / os.fsdecode(b"run\xff")
    with sd.Recorder(run, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    out = tmp_path / "run.h5"
    packed = runner.invoke(app, ["pack", str(run), str(out), "--format", "json"])
    assert packed.exit_code == 0, packed.output
    assert open_run(out).step_numbers == [0]
    with h5py.File(out) as handle:
        assert handle.attrs["source"].endswith("run\\xff")


@pytest.mark.parametrize("entry", ["dangling-link", "link-to-a-file", "fifo"])
def test_pack_refuses_any_entry_named_out_and_force_writes_it_in_place(rich_run, tmp_path, entry):
    """OUT is refused whatever it is (a symlink to nothing, a FIFO: before, a dangling link was
    silently replaced and a FIFO's refusal told the command's user to pass force=True), in
    the command's words. --force writes the archive through a link (the link stays) and to a
    FIFO's reader (one that nobody reads is refused, exit 4), never replacing the entry."""
    out, target = tmp_path / "run.h5", tmp_path / "target.h5"
    if entry == "fifo":
        os.mkfifo(out)
    else:
        if entry == "link-to-a-file":
            target.write_bytes(b"old")
        out.symlink_to(target)

    def identity(path):
        st = os.lstat(path)
        return st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns

    entry_before = identity(out)
    refused = runner.invoke(app, ["pack", str(rich_run), str(out)])
    assert refused.exit_code == 2
    assert refused.stderr == f"error: {out} already exists; pass --force to overwrite it\n"
    assert identity(out) == entry_before  # left as it was
    forced = runner.invoke(app, ["pack", str(rich_run), str(out), "--force"])
    assert identity(out) == entry_before
    if entry == "fifo":
        assert forced.exit_code == 4
        assert forced.stderr.endswith("cannot write it (a FIFO that no process reads)\n")
        return
    assert forced.exit_code == 0, forced.output
    assert open_run(target).step_numbers == open_run(rich_run).step_numbers


@pytest.mark.parametrize(
    "scalars", [{"a#b": 1.0}, {"a#b": 1.0, "a": 2.0}], ids=["nul", "nul_and_its_prefix"]
)
def test_a_scalar_name_hdf5_cannot_hold_is_refused_not_renamed(tmp_path, scalars):
    """A scalar name with a NUL character (which a Recorder of this version refuses, and an
    older one wrote; here the '#' of a recorded name is made a NUL in the step's header):
    HDF5 ends a name there, so pack stored 'a\\x00b' as 'a' (the archive read back another
    scalar, exit 0) and, beside a scalar 'a', failed with 'name already exists' (exit 70).
    Pack refuses it, exit 3."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy="grpo") as rec:
        rec.log_step(
            0,
            logp=np.zeros((1, 3), np.float32),
            logp_old=np.zeros((1, 3), np.float32),
            advantages=np.ones(1, np.float32),
            scalars=scalars,
        )

    def with_nul(header: dict) -> None:
        meta = header["__metadata__"]
        meta["a\x00b"] = meta.pop("a#b")

    edit_header(path, 0, with_nul)
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(path), str(out)])
    assert result.exit_code == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("packing:")]
    assert len(lines) == 1, result.stderr
    assert "step 0: scalar 'a\\x00b' has no HDF5 name" in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("how", ["manifest", "new-file", "steps-dir", "link-into-it", "file-url"])
def test_pack_refuses_an_out_inside_the_run_with_or_without_force(tmp_path, how):
    """OUT inside the run being packed (through a symlink too, and for a file:// URL) is refused
    (exit 2) before anything is written: `--force` onto its manifest replaced the run's
    manifest with the archive and left the run unreadable (exit 3)."""
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        rec.log_step(0, loss=1.0)
    source = str(run)
    out = {
        "manifest": run / "manifest.json",
        "new-file": run / "run.h5",
        "steps-dir": run / "steps" / "x.h5",
        "link-into-it": tmp_path / "link.h5",
        "file-url": run / "run.h5",
    }[how]
    if how == "link-into-it":
        out.symlink_to(run / "manifest.json")
    if how == "file-url":
        source = run.as_uri()
    before = sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file())
    for force in ([], ["--force"]):
        refused = runner.invoke(app, ["pack", source, str(out), *force])
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == (
            f"error: {out} is inside the run {source}; write the archive outside it\n"
        )
        with pytest.raises(UsageError, match="inside the run"):
            pack_run(open_run(source), out, force=True)
    after = sorted((p.relative_to(run), p.read_bytes()) for p in run.rglob("*") if p.is_file())
    assert after == before
    assert open_run(run).step_numbers == [0]


@pytest.mark.parametrize("how", ["path", "link", "file-url", "local-url"])
def test_pack_refuses_to_replace_the_archive_it_packs(tmp_path, how):
    """`pack A.h5 A.h5 --force` replaced the archive being read with its re-pack (exit 0):
    the bytes of a damaged step, which a pack leaves out, were gone from the only copy. The
    archive itself is the run, as a run directory's files are: refused, with --force too."""
    run = tmp_path / "run"
    with sd.Recorder(run) as rec:
        rec.log_step(0, loss=1.0)
    archive = tmp_path / "run.h5"
    pack_run(open_run(run), archive)
    before = archive.read_bytes()
    source = {
        "path": str(archive),
        "link": str(archive),
        "file-url": archive.as_uri(),
        "local-url": f"local://{archive}",
    }[how]
    out = archive
    if how == "link":
        out = tmp_path / "link.h5"
        out.symlink_to(archive)
    refused = runner.invoke(app, ["pack", source, str(out), "--force"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr == (
        f"error: {out} is inside the run {source}; write the archive outside it\n"
    )
    assert archive.read_bytes() == before


def test_a_run_written_while_it_is_packed_carries_the_findings_of_the_steps_packed(tmp_path):
    """The findings come from the listing the steps were packed from: a step that lands and
    one in flight meanwhile are not in the archive, nor findings of the archive."""
    run = tmp_path / "run"
    batch = {"logp": -torch.ones(2, 3), "logp_old": -torch.ones(2, 3), "advantages": torch.ones(2)}
    with sd.Recorder(run, policy="grpo") as rec:
        for step in range(3):
            rec.log_step(step, **batch, mask=torch.ones(2, 3))

        def record_more(_: int) -> None:
            if rec.last_step == 2:
                rec.log_step(3, **batch, mask=torch.ones(2, 3))
                (run / "steps" / ".step-00000004.safetensors.tmp-999").write_bytes(b"x")

        out = tmp_path / "run.h5"
        summary = pack_run(open_run(run), out, progress=record_more)
    archive = open_run(out)
    assert (summary.steps, summary.findings) == (3, [])
    assert archive.step_numbers == [0, 1, 2] and archive.integrity.findings == []


def test_pack_warns_that_the_run_is_being_recorded(tmp_path):
    run, out = tmp_path / "run", tmp_path / "run.h5"
    with sd.Recorder(run, policy="grpo") as rec:
        ones = torch.ones(1, 3)
        rec.log_step(0, logp=-ones, logp_old=-ones, advantages=ones[:, 0], mask=ones)
        live = runner.invoke(app, ["pack", str(run), str(out)])
    closed = runner.invoke(app, ["pack", str(run), str(out), "--force"])
    assert live.exit_code == closed.exit_code == 0
    warning = f"warning: {run} is being recorded now (a live Recorder holds it); the archive"
    assert warning in " ".join(live.stderr.split()) and "warning" not in closed.stderr


def test_an_out_ending_in_a_slash_is_refused_not_written_as_a_file(rich_run, tmp_path):
    """`pack RUN archives/` (no such directory yet) wrote the archive as a FILE named
    `archives`, exit 0, and `pack RUN afile/ --force` replaced the file `afile`: a name ending
    in / names a directory, never the archive's file. Exit 2, nothing written."""
    (tmp_path / "afile").write_text("kept")
    for given, force in ((f"{tmp_path}/archives/", []), (f"{tmp_path}/afile/", ["--force"])):
        result = runner.invoke(app, ["pack", str(rich_run), given, *force])
        assert result.exit_code == 2, result.output
        name = given.rstrip("/")
        assert result.stderr == (
            f"error: {given} ends in /: give the archive's file name, e.g. {name}/run.h5\n"
        )
        with pytest.raises(UsageError, match="ends in /"):
            pack_run(open_run(rich_run), given, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "kept"


def test_pack_run_takes_a_path_as_replay_does_and_refuses_bad_arguments(rich_run, tmp_path):
    """`pack_run("runs/x", "x.h5")` raised AttributeError ('str' object has no attribute
    'location'), an `out` of None or bytes a TypeError, and `force="no"` overwrote the archive
    (its truth value taken). The run is opened from a path or URL (and closed after), as
    `replay` opens it; a bad argument is a UsageError naming it, nothing written."""
    out = tmp_path / "x.h5"
    summary = pack_run(str(rich_run), out)
    assert summary.steps == STEPS and open_run(out).step_numbers == list(range(STEPS))
    before = out.read_bytes()
    for args, kwargs, said in (
        ((rich_run, out), {"force": "no"}, "force must be True or False, not str"),
        ((rich_run, None), {}, "out must be a str or a path object, not NoneType"),
        ((rich_run, os.fsencode(out)), {}, "out must be a str or a path object, not bytes"),
        ((3, tmp_path / "y.h5"), {}, "run must be a path, a URL or an opened Run, not int"),
    ):
        with pytest.raises(UsageError, match=said):
            pack_run(*args, **kwargs)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_the_size_change_is_said_in_plain_digits():
    """A tiny run's archive packed to a hundred times its size (6588 -> 704149 bytes, before
    a small dataset became one chunk of its size): the line said '(1.1e+02x larger)'. Ratios
    from 10 up are whole numbers."""
    assert _size_change(6588, 704149) == "107x larger"
    assert _size_change(6588, 47585) == "7.2x larger"
    assert _size_change(1025358, 328229) == "3.1x smaller"
    assert _size_change(10, 10) == "same size" and _size_change(0, 10) == "n/a"


def test_a_small_size_change_is_said_as_a_percentage():
    """An archive 1.5% larger than its run (50,718 -> 51,469 bytes) was said '1x larger'."""
    assert _size_change(50718, 51469) == "1.5% larger"
    assert _size_change(51469, 50718) == "1.5% smaller"
    assert _size_change(1000, 1099) == "9.9% larger" and _size_change(1000, 1100) == "1.1x larger"


def test_a_tiny_size_change_is_said_in_plain_digits():
    """A 1 GB run packed 5 bytes larger was said '5e-07% larger'."""
    assert _size_change(10**9, 10**9 + 5) == "under 0.01% larger"
    assert _size_change(10**6, 10**6 - 100) == "0.01% smaller"


def test_an_archive_name_the_file_system_takes_is_written_however_long(rich_run, tmp_path):
    """A name of 253 bytes (the file system takes 255) failed, exit 4 '(File name too long)':
    the temporary name beside it, `.NAME.tmp-PID`, was the one too long. The temporary name is
    cut to fit; the archive is written under the name given."""
    out = tmp_path / ("a" * 250 + ".h5")
    result = runner.invoke(app, ["pack", str(rich_run), str(out)])
    assert result.exit_code == 0, result.output
    assert open_run(out).step_numbers == list(range(STEPS))
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_an_archive_name_longer_than_the_file_system_takes_is_an_output_error(rich_run, tmp_path):
    """A name of 263 bytes was refused with exit 3, the code of a bad input, as if the run
    were at fault ('error: NAME: File name too long', from the check of the target). It is
    the output the system refuses: exit 4, 'cannot write it (File name too long)'."""
    out = tmp_path / ("a" * 260 + ".h5")
    result = runner.invoke(app, ["pack", str(rich_run), str(out)])
    assert result.exit_code == 4, result.output
    assert result.stderr == f"error: {out}: cannot write it (File name too long)\n"
    with pytest.raises(WriteError, match="File name too long"):
        pack_run(rich_run, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chunk", [_layout.CHUNK_ELEMENTS, 16])
@pytest.mark.parametrize("compression", ["fast", "small"])
def test_a_field_recorded_narrower_then_wider_is_widened_and_replays_as_its_directory(
    tmp_path, monkeypatch, chunk, compression
):
    """A sketch recorded as float16 (with its scale), then as float32, could not be packed:
    'error: RUN: step 3: unit_grad_sketch is float32, an earlier step's float16; an archive
    keeps one dtype a field: cannot pack it' (exit 3), for a run that replays. The field is
    now widened to float32 (every float16 is a float32 exactly: the entries already written
    are rewritten, also once the dataset is on disk, chunks of 16 here), a float16 step after
    it is cast to it, and the archive reads and replays as the directory does."""
    monkeypatch.setattr(_pack_column, "CHUNK_ELEMENTS", chunk)
    run = tmp_path / "run"
    gen = torch.Generator().manual_seed(0)
    dtypes = (torch.float16, None, torch.float16, torch.float32, torch.float32, torch.float16)
    with sd.Recorder(run, policy="grpo") as recorder:
        for step, dtype in enumerate(dtypes):
            logp = -torch.rand(4, 5, generator=gen)
            sketch = torch.randn(20, 3, generator=gen)
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.01 * torch.randn(4, 5, generator=gen),
                advantages=torch.randn(4, generator=gen),
                unit_grad_sketch=None if dtype is None else sketch.to(dtype),
                unit_grad_sketch_scale=0.7 if dtype == torch.float16 else None,
                grad_norm=1.0,
                grad_norm_covered=1.0,
            )
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(run), str(out), "--compression", compression])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as handle:
        data = handle["ragged/unit_grad_sketch/data"]
        assert data.dtype == np.float32
        assert data.chunks[0] <= 2 * chunk  # chunks of `chunk`, float32 uncompressed 2 x 16
        assert [n for n in handle["ragged/unit_grad_sketch"]] == ["data", "shape", "step_offsets"]
    source, archive = open_run(run), open_run(out)
    for a, b in zip(source.steps(), archive.steps(), strict=True):
        assert a.fields == b.fields and _same_scalars(a.scalars, b.scalars)
        for name in a.fields:
            assert b[name].dtype == torch.float32 or name != "unit_grad_sketch"
            torch.testing.assert_close(a[name].to(b[name].dtype), b[name], rtol=0, atol=0)
    report = _cli_json(["inspect", str(out), "--format", "json"])
    assert report["integrity"]["ok"], report["integrity"]
    assert _replay_json(out) == _replay_json(run)


@pytest.mark.parametrize("compression", ["fast", "small"])
def test_a_field_its_first_steps_lack_leaves_chunks_unwritten_and_reads_as_its_directory(
    tmp_path, monkeypatch, compression
):
    """pack never writes the chunks of a field that only steps without it span (logp_ref from
    step 3 on, in chunks of 16 entries here): a reader takes those for no data only where a
    step holds the field, so such an archive reads with no finding, as its directory."""
    monkeypatch.setattr(_pack_column, "CHUNK_ELEMENTS", 16)
    run = tmp_path / "run"
    gen = torch.Generator().manual_seed(0)
    with sd.Recorder(run, policy="grpo") as recorder:
        for step in range(6):
            logp = -torch.rand(4, 5, generator=gen)
            recorder.log_step(
                step,
                logp=logp,
                logp_old=logp + 0.01,
                logp_ref=None if step < 3 else logp - 0.02,
                advantages=torch.randn(4, generator=gen),
            )
    out = tmp_path / "run.h5"
    pack_run(run, out, compression=compression)
    with h5py.File(out, "r") as handle:
        dataset = handle["tokens/logp_ref"]
        assert dataset.id.get_num_chunks() < -(-dataset.shape[0] // dataset.chunks[0])
    report = _cli_json(["inspect", str(out), "--format", "json"])
    assert report["integrity"]["ok"], report["integrity"]
    assert _replay_json(out) == _replay_json(run)


def test_the_chunk_index_of_a_field_with_unwritten_chunks_is_walked_once(tmp_path, monkeypatch):
    """Reading every step and then the integrity of an archive whose Fletcher32 dataset has
    chunks never written walked its chunk index twice: once to find the steps in them, again
    in the integrity check (its Python callback a chunk: 0.2 s at 51,200 chunks, and 0.67 s
    making their selections). The check reuses the first walk."""
    monkeypatch.setattr(_pack_column, "CHUNK_ELEMENTS", 16)
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as recorder:
        for step in range(6):
            logp = -torch.rand(4, 5, generator=torch.Generator().manual_seed(step))
            ref = None if step < 3 else logp - 0.02
            recorder.log_step(
                step, logp=logp, logp_old=logp + 0.01, logp_ref=ref, advantages=torch.ones(4)
            )
    out = tmp_path / "run.h5"
    pack_run(run, out, compression="small")
    walked: list[str] = []
    real = _archive_chunks.stored_chunks

    def stored_chunks(dataset: h5py.h5d.DatasetID, visit: Any) -> None:
        walked.append(h5py.h5i.get_name(dataset).decode())
        real(dataset, visit)

    monkeypatch.setattr(_archive_chunks, "stored_chunks", stored_chunks)
    with open_run(out) as archive:
        assert [step.step for step in archive.steps()] == list(range(6))
        assert archive.integrity.ok
    assert walked == ["/tokens/logp_ref"]


def test_the_integrity_check_asks_a_dataset_its_chunks_not_once_a_chunk(tmp_path, monkeypatch):
    """After a step's read, the integrity check asked h5py each unread chunk's dataset for its
    chunk shape (the creation properties read again: 2.9 us, half a 16-entry chunk's read):
    155 asks for this archive of 5 datasets of 32 chunks, one a dataset now."""
    monkeypatch.setattr(_pack_column, "CHUNK_ELEMENTS", 16)
    run = tmp_path / "run"
    with sd.Recorder(run, policy="grpo") as recorder:
        for step in range(16):
            logp = -torch.rand(4, 8, generator=torch.Generator().manual_seed(step))
            recorder.log_step(step, logp=logp, logp_old=logp + 0.01, advantages=torch.ones(4))
    out = tmp_path / "run.h5"
    pack_run(run, out, compression="small")
    with h5py.File(out, "r") as handle:
        assert handle["tokens/logp"].chunks == (16,)  # 32 chunks a dataset
    asks = [0]
    chunks = h5py.Dataset.chunks

    def counted(dataset: h5py.Dataset) -> Any:
        asks[0] += 1
        return chunks.fget(dataset)

    with open_run(out) as archive:
        next(iter(archive.steps()))
        monkeypatch.setattr(h5py.Dataset, "chunks", property(counted))
        assert archive.integrity.ok
    assert asks[0] <= 5


def test_a_compact_manifest_near_the_bound_packs_into_an_archive_that_reads(tmp_path):
    """A run whose manifest.json is written compactly, 921 KB (under the 1 MiB a manifest may
    take), packed with exit 0 into an archive no command could open ('corrupt run archive
    (manifest is not a bounded string)'): the archive re-wrote the manifest indented, 1.2 MB.
    It is written compactly when indented it would not fit; the archive reads as the run."""
    run = tiny_run(tmp_path / "run", steps=1)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["meta"] = {"names": ["x" * 20] * 40000}
    (run / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(run), str(out)])
    assert result.exit_code == 0, result.output
    with open_run(out) as archive:
        assert archive.manifest == open_run(run).manifest and archive.step_numbers == [0]


def test_an_archive_packed_before_format_1_2_reads_its_scalar_names_with_a_slash(tmp_path):
    """A tool before format 1.2 packed a scalar `eval/acc` as HDF5 made of it: a dataset `acc`
    in a group `scalars/eval`. Before, such an archive was refused whole ("corrupt run archive
    (no dataset scalars/eval)", exit 3); it reads now, the scalar named as recorded."""
    run = tmp_path / "run"
    with sd.Recorder(run, unit="sequence", reward_range=(0.0, 1.0)) as rec:
        for step in range(3):
            rec.log_step(
                step,
                logp=[-1.0, -2.0],
                logp_old=[-1.0, -2.0],
                advantages=[0.5, -0.5],
                group_id=[0, 0],
                reward=[1.0, 0.0],
                scalars={"eval_acc": 0.25 * step},
            )
    archive = tmp_path / "old.h5"
    pack_run(run, archive, compression="small")
    with h5py.File(archive, "r+") as handle:
        assert handle.attrs["format_version"] == "1.0"
        for group in ("scalars", "scalars_recorded"):
            handle.move(f"{group}/eval_acc", f"{group}/eval/acc")
    steps = list(open_run(archive).steps())
    assert [s.scalars["eval/acc"] for s in steps] == [0.0, 0.25, 0.5]
    result = runner.invoke(app, ["inspect", str(archive), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "eval/acc" in json.loads(result.stdout)["scalars"]


def test_an_empty_group_in_a_pre_1_2_archive_scalars_is_still_a_missing_dataset(tmp_path):
    run = tmp_path / "run"
    with sd.Recorder(run, unit="sequence") as rec:
        rec.log_step(0, logp=[-1.0], logp_old=[-1.0], advantages=[0.5], scalars={"x": 1.0})
    archive = tmp_path / "old.h5"
    pack_run(run, archive, compression="small")
    with h5py.File(archive, "r+") as handle:
        for group in ("scalars", "scalars_recorded"):
            del handle[f"{group}/x"]
            handle.create_group(f"{group}/x")
    with pytest.raises(InputError, match="no dataset scalars/x"):
        open_run(archive)


def test_pack_names_the_arrays_of_a_newer_minor_version_it_leaves_out(tmp_path):
    """A run whose step files hold an array of a newer minor version (read as the docs say:
    the field ignored) packed with exit 0 and no word, its archive without the array: a run
    shared by a newer release, packed and the directory deleted, lost it. The warning names
    it, as the JSON's unknown_fields."""
    from stabledrl_cli.dump._step_encoding import encode_step
    from stabledrl_cli.dump._stfile import read_header

    run = tiny_run(tmp_path / "run")
    step_file = run / "steps" / "step-00000001.safetensors"
    metadata = {
        k: v for k, v in read_header(step_file, deep=True).metadata.items() if k[:6] != "_crc32"
    }
    metadata["_format_version"] = "1.9"
    step = open_run(run).step(1)
    arrays = {name: step.array(name) for name in step}
    arrays["future_array"] = np.ones(3, np.float32)
    _atomic.write_atomic(step_file, encode_step(arrays, metadata))
    out = tmp_path / "run.h5"
    result = runner.invoke(app, ["pack", str(run), str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unknown_fields"] == ["future_array"]
    assert (
        f"warning: {run}: its steps hold 1 array that run format 1.3, the newest this "
        "stabledrl reads, does not name ('future_array': a newer version's fields); the archive "
        "leaves them out: pack the run with the stabledrl that recorded it to keep them"
    ) in " ".join(result.stderr.split())
    again = runner.invoke(app, ["pack", str(out), str(tmp_path / "again.h5"), "--format", "json"])
    assert again.exit_code == 0 and "warning" not in again.stderr, again.output
    assert json.loads(again.stdout)["unknown_fields"] == []
    with h5py.File(out, "r+") as handle:  # an archive a newer minor packed, with its field
        steps = handle["steps/step"].shape[0]
        present = handle["present"].create_dataset("future_array", data=np.ones(steps, np.uint8))
        present.attrs["crc32"] = np.uint32(zlib.crc32(present[()].tobytes()))
    again = runner.invoke(
        app, ["pack", str(out), str(tmp_path / "again.h5"), "--force", "--format", "json"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["unknown_fields"] == ["future_array"]
    assert "its steps hold 1 array that run format 1.3" in again.stderr


def test_the_progress_total_counts_the_steps_packed(tmp_path: Path) -> None:
    """A 2-rank run of 16 steps whose rank 1 wrote 11: pack's progress counted to 16/16 (the
    last line jumping from 10/16), then its warning said 'packed its 11 readable steps'. A
    step some rank lacks is never read: the total is the steps every rank wrote."""
    run = tmp_path / "run"
    ranks = [sd.Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for n in range(16):
        for recorder in ranks[: 1 if n >= 11 else 2]:
            recorder.log_step(n, grad_norm=1.0, loss=0.5)
    for recorder in ranks:
        recorder.close()
    result = CliRunner().invoke(app, ["pack", str(run), str(tmp_path / "run.h5")])
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("packing:")]
    assert shown and all("/11 (" in line for line in shown), result.stderr
    assert shown[-1] == "packing: 11/11 (100%)"
    assert "packed its 11 readable steps" in result.stderr


def test_a_live_run_is_packed_as_listed_when_the_pack_began(tmp_path, monkeypatch) -> None:
    """2 ranks: 5 whole steps and step 5 of rank 0 when pack listed the run; rank 1 wrote
    step 5 and both step 6 before the packing read its steps. The bar counted to 5, yet the
    archive held 7 steps (a bar of 7/5) and the warning said 'the 7 steps listed when the
    pack began'. The pack holds the listing counted and says what finished since."""
    run, out = tmp_path / "run", tmp_path / "run.h5"
    ranks = [sd.Recorder(run, policy=None, world_size=2, rank=rank) for rank in (0, 1)]
    for n in range(6):
        for recorder in ranks[: 1 if n == 5 else 2]:
            recorder.log_step(n, grad_norm=1.0, loss=0.5)
    packing = _packer.pack_run  # (pack imports it once the run is found)

    def steps_land(*args, **kwargs):
        ranks[1].log_step(5, grad_norm=1.0, loss=0.5)
        for recorder in ranks:
            recorder.log_step(6, grad_norm=1.0, loss=0.5)
        return packing(*args, **kwargs)

    monkeypatch.setattr(_packer, "pack_run", steps_land)
    result = runner.invoke(app, ["pack", str(run), str(out), "--format", "json"])
    for recorder in ranks:
        recorder.close()
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("packing:")]
    assert shown[-1] == "packing: 5/5 (100%)", result.stderr
    assert json.loads(result.stdout)["steps"] == 5
    assert open_run(out).step_numbers == [0, 1, 2, 3, 4]
    said = " ".join(result.stderr.split())
    assert (
        "the archive holds the 5 steps listed when the pack began (to step 4), not the 2 steps"
        in said
    )


@pytest.mark.parametrize("listed", [[0, 0, 1], [3, 1, 2]], ids=["repeated", "unsorted"])
def test_a_listing_given_out_of_order_is_refused(tmp_path, listed) -> None:
    """pack_run(listed=[0, 0, 1]) said 3 steps packed of an archive whose reader found 1 (step
    0 repeated: unreadable), and [3, 1, 2] 1 of 3 (steps 1..2 below an earlier step's). A
    listing not ascending, each step once, is refused before anything is written."""
    run, out = tiny_run(tmp_path / "run", steps=4), tmp_path / "run.h5"
    with pytest.raises(UsageError, match="listed must be ascending, each step once"):
        pack_run(run, out, listed=listed)
    assert not out.exists()
    assert pack_run(run, out, listed=[1, 3]).steps == len(open_run(out).step_numbers) == 2


@pytest.mark.parametrize("listed", [5, "12"], ids=["int", "str"])
def test_a_listing_that_is_no_list_is_refused(tmp_path, listed) -> None:
    """pack_run(listed=5) raised TypeError ('int' object is not iterable), and listed="12"
    said 'listed must be an int ..., got '1''. Either is a UsageError naming what it got."""
    run, out = tiny_run(tmp_path / "run", steps=4), tmp_path / "run.h5"
    with pytest.raises(UsageError, match="listed must be a list of step numbers, not"):
        pack_run(run, out, listed=listed)
    assert not out.exists()


def test_the_damaged_steps_left_out_are_counted_as_the_bar_counts_them(tmp_path) -> None:
    """10 steps, 3 and 7 corrupt: the bar read 8/10 then jumped to 10/10 at the end beside
    'packed 8 steps'. Each step read advances the bar, packed or left out, and the line and
    the JSON count the 2 left out."""
    run = tiny_run(tmp_path / "run", steps=10)
    for n in (3, 7):
        flip_bit(step_path(run, n), -5)
    result = runner.invoke(app, ["pack", str(run), str(tmp_path / "run.h5")])
    assert result.exit_code == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("packing:")]
    assert shown == [f"packing: {n}/10 ({10 * n}%)" for n in range(1, 11)], result.stderr
    assert "packed 8 steps (96 tokens; 2 damaged left out)" in result.stdout
    assert "packed its 8 readable steps, left out 2 damaged" in " ".join(result.stderr.split())
    again = runner.invoke(app, ["pack", str(run), str(tmp_path / "again.h5"), "-f", "json"])
    assert json.loads(again.stdout)["damaged_steps"] == 2
