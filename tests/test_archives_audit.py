"""Sharing runs as packed archives, and receiving archives and run directories from others:
what an audit of links, paths and pack round trips found (docs/trust.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pytest
from _corpus import packed, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump._archive_checks import CRC_ATTR, DEFLATE_RATIO, index_crc
from stabledrl_cli.dump._archive_index import CARRIED_TEXT_LIMIT

runner = CliRunner()


def _outside(tmp_path: Path) -> Path:
    """A directory outside the run, holding a file of 100,000 bytes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(bytes(100_000))
    return outside


def test_pack_never_follows_a_link_of_the_run_directory_out_of_it(tmp_path):
    """A run received with `notes -> /usr` and `key -> /etc/shadow` in its directory packed
    with `left_out: {"notes/": 8398130415, "key": 631}`: pack walked all of /usr (7 s; a link
    to / walks the whole file system) and reported the size of files the run does not hold.
    A link is now left out as the link it is, its own bytes, never followed."""
    run = tiny_run(tmp_path / "run")
    outside = _outside(tmp_path)
    (run / "notes").symlink_to(outside)
    (run / "key").symlink_to(outside / "secret.bin")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-00000002.pt").write_bytes(bytes(400))
    (run / "checkpoints" / "latest.pt").symlink_to(outside / "secret.bin")
    result = runner.invoke(app, ["pack", str(run), str(tmp_path / "run.h5"), "--format", "json"])
    assert result.exit_code == 0, result.output
    link_bytes = {name: os.lstat(run / name).st_size for name in ("key", "notes")}
    latest = os.lstat(run / "checkpoints" / "latest.pt").st_size
    assert json.loads(result.stdout)["left_out"] == {
        "checkpoints/": 400 + latest,
        "key": link_bytes["key"],
        "notes": link_bytes["notes"],
    }


def test_inspect_counts_no_file_a_link_of_the_run_names_in_its_size(tmp_path):
    """`inspect`'s size on disk of a run with `steps/x -> /outside/file` counted that file's
    bytes: a link is its own bytes there too."""
    run = tiny_run(tmp_path / "run")
    held = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    link = run / "steps" / "x"
    link.symlink_to(_outside(tmp_path) / "secret.bin")
    result = runner.invoke(app, ["inspect", str(run), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["size_bytes"] == held + os.lstat(link).st_size


def test_pack_never_writes_its_archive_into_another_run(tmp_path):
    """`pack mine.h5 --force`, mine.h5 a link to another run's manifest.json, replaced that
    run's manifest with the archive (the run gone), and `pack RUN other/steps/x.h5` put an
    archive among another run's step files: trust.md says no output of a command lies inside
    another run, and reports were refused there. pack refuses both now, exit 2, as reports."""
    run = tiny_run(tmp_path / "run")
    other = tiny_run(tmp_path / "other")
    manifest = (other / "manifest.json").read_bytes()
    link = tmp_path / "mine.h5"
    link.symlink_to(other / "manifest.json")
    for target, force in ((link, ["--force"]), (other / "steps" / "x.h5", [])):
        result = runner.invoke(app, ["pack", str(run), str(target), *force])
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"error: {target} is inside the run {other}; write the archive outside it\n"
        )
    assert (other / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (other / "steps").iterdir()) == [
        f"step-{n:08d}.safetensors" for n in range(4)
    ]


def _carrying(tmp_path: Path, findings: list[dict[str, object]]) -> Path:
    """tiny_run's archive whose `integrity` text carries `findings`, its checksum matching
    (a crafted archive, not a damaged one)."""
    archive = packed(tmp_path)
    text = json.dumps(findings)
    with h5py.File(archive, "r+") as handle:
        del handle["integrity"]
        handle.create_dataset("integrity", data=text, dtype=h5py.string_dtype())
        handle["integrity"].attrs[CRC_ATTR] = index_crc(text)
    return archive


@pytest.mark.parametrize("step", [2**63, 10**30, -1])
def test_a_carried_finding_of_no_step_number_refuses_the_archive(tmp_path, step):
    """An archive whose integrity text carried a finding of step 10**30 made `replay` crash,
    exit 70 (OverflowError: Python int too large to convert to C long, measuring the run's
    gaps); a step number is an int in [0, 2**63 - 1], as in a step file's name."""
    finding = {"kind": "torn", "step": step, "path": "p", "message": "m"}
    archive = _carrying(tmp_path, [finding])
    result = runner.invoke(app, ["replay", str(archive)])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {archive}: corrupt run archive (integrity is not a list of findings)\n"
    )


def test_a_carried_finding_of_megabytes_is_cut_to_a_line(tmp_path):
    """An archive carrying a finding whose message held 30 MB made `inspect` fold it for more
    than a minute, and `replay` print it whole as its one warning line: a finding the reader
    makes names any value of the input cut short, and so is a carried one now, at
    CARRIED_TEXT_LIMIT characters, its length said."""
    message = "x" * 2_000_000
    finding = {"kind": "torn", "step": 99, "path": "/" + "p" * 2_000_000, "message": message}
    other = {"kind": "k" * 2_000_000, "step": None, "path": None, "message": "m"}
    archive = _carrying(tmp_path, [finding, other])
    shown = f"{'x' * CARRIED_TEXT_LIMIT}... (2,000,000 characters)"
    result = runner.invoke(app, ["inspect", str(archive), "--format", "json"])
    assert result.exit_code == 0, result.output
    found = {f["step"]: f for f in json.loads(result.stdout)["integrity"]["findings"]}
    carried, newer = found[99], found[None]
    assert newer["kind"] == f"{'k' * CARRIED_TEXT_LIMIT}... (2,000,000 characters)"
    assert carried["message"] == shown
    assert carried["path"] == f"/{'p' * (CARRIED_TEXT_LIMIT - 1)}... (2,000,001 characters)"
    result = runner.invoke(app, ["replay", str(archive)])
    assert result.exit_code == 0, result.output
    assert shown in result.stderr and len(result.stderr) < 2 * CARRIED_TEXT_LIMIT


@pytest.mark.parametrize("kind", ["torn", "unreadable", "missing_rank"])
def test_a_carried_finding_that_a_held_step_was_skipped_refuses_the_archive(tmp_path, kind):
    """A packed run holds only the steps its reader did not skip, so a carried finding that
    names one it holds as skipped is crafted. Before, `replay` replayed step 1 and reported it
    skipped too (`skipped 1 unreadable ... step`), and `inspect` listed it as damaged."""
    finding = {"kind": kind, "step": 1, "path": "p", "message": "step 1: m"}
    archive = _carrying(tmp_path, [finding])
    for command in ("replay", "inspect"):
        result = runner.invoke(app, [command, str(archive)])
        assert result.exit_code == 3, result.output
        assert result.stderr == (
            f"error: {archive}: corrupt run archive (integrity says step 1 was skipped "
            f"({kind}), and the archive holds it)\n"
        )


@pytest.mark.parametrize("url", [False, True])
def test_a_sparse_archive_is_bounded_by_the_bytes_it_holds(tmp_path, url):
    """An archive of 48 KB on disk made sparse at 2 TiB (its holes read as zeros no disk holds),
    its scalars/loss declared 1 TiB, passed the size bounds, which took the file's size, and
    `replay` tried to allocate it: exit 71 'out of memory ... not a bug' where memory allows
    no such array, a 1 TiB read where overcommit lets it. The bounds take at most
    DEFLATE_RATIO times the bytes on disk now: refused as bad input, exit 3, also at its
    file:// URL."""
    archive = packed(tmp_path)
    with h5py.File(archive, "r+") as handle:
        crc = handle["scalars/loss"].attrs[CRC_ATTR]
        del handle["scalars/loss"]
        handle.create_dataset("scalars/loss", shape=(1 << 37,), dtype="f8").attrs[CRC_ATTR] = crc
    os.truncate(archive, 2 << 40)
    held = os.stat(archive).st_blocks * 512
    given = f"file://{archive}" if url else str(archive)
    result = runner.invoke(app, ["replay", given])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {given}: refused: dataset scalars/loss declares {8 << 37} bytes, more than "
        f"a {DEFLATE_RATIO * held}-byte archive can hold\n"
    )
