"""The archive probe (`dump._archive_probe.probe`): its forked child reads the metadata and
walks the objects once for the reader; a child that hangs, dies or is cut short refuses the
archive; a file swapped after the probe is walked again by the reader; no child is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _corpus import packed

import stabledrl_cli as sd
from stabledrl_cli.dump import _archive_checks, _archive_probe
from stabledrl_cli.dump._store_file import StoreFile
from stabledrl_cli.errors import InputError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe forks")


def _probe(path: Path, seconds: float | None = None) -> _archive_probe.Probed:
    return _archive_probe.probe(path, path.stat().st_size, seconds)


@pytest.fixture
def walks_here(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Archives (as messages name them) that `check_objects` walked in this process (the
    probe's child's walks are lost with the child)."""
    walked: list[str] = []
    real = _archive_checks.check_objects

    def counting(handle: h5py.File, where: str, file_size: int) -> list[str]:
        walked.append(where)
        return real(handle, where, file_size)

    monkeypatch.setattr(_archive_checks, "check_objects", counting)
    return walked


def test_the_reader_takes_the_childs_walk(tmp_path: Path, walks_here: list[str]) -> None:
    archive = packed(tmp_path)
    run = sd.open_run(archive)
    assert walks_here == []
    with h5py.File(archive, "r") as handle:
        expected = _archive_checks.check_objects(handle, str(archive), archive.stat().st_size)
    assert sorted(run._datasets) == sorted(expected) and "tokens/logp" in expected


def test_a_file_swapped_after_the_probe_is_walked_by_the_reader(
    tmp_path: Path, walks_here: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's walk is of the file it read; a different file under the same name (another
    inode) is walked again, and refused if it points elsewhere."""
    honest = packed(tmp_path / "honest")
    crafted = packed(tmp_path / "crafted")
    with h5py.File(crafted, "r+") as handle:
        del handle["sequences/reward"]
        handle["sequences/reward"] = h5py.SoftLink("/tokens/logp")
    target = tmp_path / "run.h5"
    shutil.copy(honest, target)
    real_probe = _archive_probe.probe

    def probe_then_swap(*args: object, **kwargs: object) -> _archive_probe.Probed:
        probed = real_probe(*args, **kwargs)  # type: ignore[arg-type]
        os.replace(tmp_path / "swap.h5", target)
        return probed

    monkeypatch.setattr("stabledrl_cli.dump._archive_file.probe", probe_then_swap)
    shutil.copy(honest, tmp_path / "swap.h5")
    sd.open_run(target)
    assert walks_here == [str(target)]
    shutil.copy(crafted, tmp_path / "swap.h5")
    with pytest.raises(InputError, match="sequences/reward is a soft link"):
        sd.open_run(target)


def test_a_refusal_found_by_the_child_is_the_readers_own(tmp_path: Path) -> None:
    archive = packed(tmp_path)
    with h5py.File(archive, "r+") as handle:
        del handle["sequences/reward"]
        handle["sequences/reward"] = h5py.ExternalLink("/etc/passwd", "/reward")
    probed = _probe(archive)
    assert probed.datasets is None
    assert probed.refusal == f"{archive}: refused: sequences/reward is an external link"
    with pytest.raises(InputError) as refused:
        sd.open_run(archive)
    assert str(refused.value) == probed.refusal


def test_a_child_that_hangs_is_killed_and_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hung child is killed and reaped, not left sleeping beside the reader."""
    archive = packed(tmp_path)
    pid_file = tmp_path / "child.pid"

    def hang(*args: object) -> bytes:
        pid_file.write_text(str(os.getpid()))
        time.sleep(60)
        return b""

    monkeypatch.setattr(_archive_probe, "_child_report", hang)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"did not finish in 0\.5 s"):
        _probe(archive, 0.5)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):  # neither sleeping nor a zombie left unreaped
        os.kill(int(pid_file.read_text()), 0)


def test_a_child_that_dies_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = packed(tmp_path)

    def crash(*args: object) -> bytes:
        os.kill(os.getpid(), signal.SIGKILL)
        return b""

    monkeypatch.setattr(_archive_probe, "_child_report", crash)
    with pytest.raises(InputError, match=r"crashed libhdf5 \(signal 9;"):
        _probe(archive)


def test_a_child_that_runs_out_of_its_memory_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child may add `PROBE_MEMORY` beyond the archive's size to its parent's address space;
    an allocation past it refuses the archive. It took what it asked for (here lazily: numpy's
    empty pages), the reader then reading the file itself."""
    archive = packed(tmp_path)
    real = _archive_probe._child_report

    def greedy(*args: object) -> bytes:
        held = np.empty(3 * _archive_probe.PROBE_MEMORY, dtype=np.uint8)
        return real(*args) if held.size else b""

    monkeypatch.setattr(_archive_probe, "_child_report", greedy)
    with pytest.raises(InputError, match="took more memory than the file's size can explain"):
        _probe(archive)


def test_a_string_that_claims_gigabytes_is_refused_within_the_childs_memory(
    tmp_path: Path,
) -> None:
    """A variable-length string's stored length claims 2 GiB where its heap object holds 37
    bytes: libhdf5 allocated and filled the 2 GiB in the child (7 s) before it found the
    mismatch; the child's allocation now fails at once, and the archive is refused."""
    archive = packed(tmp_path)
    text = "Q" * 37
    with h5py.File(archive, "r+") as handle:
        handle.attrs["note"] = text
    data = bytearray(archive.read_bytes())
    heaps = [i for i in range(len(data) - 3) if data[i : i + 4] == b"GCOL"]
    stored = [data.find(struct.pack("<IQ", len(text), heap)) for heap in heaps]
    (at,) = [i for i in stored if i >= 0]
    data[at : at + 4] = struct.pack("<I", 0x7FFFFFFF)
    archive.write_bytes(data)
    with pytest.raises(InputError, match="memory allocation failed"):
        _probe(archive)


@pytest.mark.parametrize("report", ["none", "cut_short"])
def test_a_child_without_a_whole_report_leaves_the_walk_to_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, walks_here: list[str], report: str
) -> None:
    """A Python error in the child (no report) or a report without its end: the reader walks
    the file itself."""
    archive = packed(tmp_path)
    real = _archive_probe._child_report
    monkeypatch.setattr(
        _archive_probe,
        "_child_report",
        lambda *args: b"" if report == "none" else real(*args)[:-1],
    )
    assert _probe(archive) == _archive_probe.Probed()
    sd.open_run(archive)
    assert walks_here == [str(archive)]


def test_no_probe_child_is_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader goes on once the child's report is in; a child still exiting then is reaped
    by the next probe."""
    archive = packed(tmp_path)
    forked: list[int] = []
    real_fork = os.fork

    def recording_fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    for _ in range(3):
        sd.open_run(archive).close()
    deadline = time.monotonic() + 10
    while _archive_probe._UNREAPED and time.monotonic() < deadline:
        time.sleep(0.01)
        _archive_probe._reap_finished()
    assert len(forked) == 3 and not _archive_probe._UNREAPED
    for pid in forked:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _index_reads_here(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Index datasets (`is_index`) that this process opens to read whole."""
    opened: list[str] = []
    real = h5py.h5d.open

    def counting(loc: object, name: bytes, *args: object) -> h5py.h5d.DatasetID:
        if _archive_checks.is_index(name.decode()) and os.getpid() == parent:
            opened.append(name.decode())
        return real(loc, name, *args)

    parent = os.getpid()
    monkeypatch.setattr(h5py.h5d, "open", counting)
    return opened


def _steps(run: sd.Run) -> list[tuple[int, dict[str, list[float]]]]:
    return [
        (step.step, {name: step.array(name).tolist() for name in sorted(step.fields)})
        for step in run.steps()
    ]


def test_the_reader_takes_the_index_the_child_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child hands over the root attributes, texts and index arrays: the reader's process
    reads no index dataset itself, and reads the run exactly as from its own reads."""
    archive = packed(tmp_path)
    expected = _steps(sd.open_run(archive))
    probed = _probe(archive)
    assert {"steps/step", "tokens/step_offsets"} <= set(probed.prefetched.arrays)
    assert set(probed.prefetched.texts) == {"manifest", "integrity"}
    assert probed.prefetched.root["kind"] == "stabledrl-run"
    opened = _index_reads_here(monkeypatch)
    run = sd.open_run(archive)
    assert opened == []
    assert _steps(run) == expected and run.integrity.ok


@pytest.mark.parametrize("damage", ["payload", "dtype"])
def test_a_garbled_handover_leaves_the_index_to_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A handover that is not what the child writes (an array's bytes that do not add up, a
    non-numeric dtype) is dropped whole: the reader reads every value itself, the same run."""
    archive = packed(tmp_path)
    expected = _steps(sd.open_run(archive))
    real = _archive_probe._child_report

    def garbled(*args: object) -> bytes:
        header, _, payload = real(*args).partition(b"\n")  # type: ignore[arg-type]
        fields = json.loads(header)
        if damage == "payload":
            fields["payload"] += 8
            payload += bytes(8)
        else:
            fields["prefetch"]["arrays"][0][1] = "|O"
        return json.dumps(fields).encode() + b"\n" + payload

    monkeypatch.setattr(_archive_probe, "_child_report", garbled)
    assert _probe(archive).prefetched == _archive_probe.Prefetched()
    opened = _index_reads_here(monkeypatch)
    run = sd.open_run(archive)
    assert "steps/step" in opened
    assert _steps(run) == expected


def test_nothing_is_handed_over_for_an_archive_read_through_a_file_object(
    tmp_path: Path,
) -> None:
    """An archive read through a file object (fsspec) has no identity to match, so the reader
    could not take the child's values: the child does not read them (a remote index is read
    once, by the reader)."""
    archive = packed(tmp_path)
    with StoreFile(archive.open("rb")) as fileobj:
        probed = _archive_probe.probe(archive, archive.stat().st_size, fileobj=fileobj)
    assert probed.identity is None and probed.datasets
    assert probed.prefetched == _archive_probe.Prefetched()
