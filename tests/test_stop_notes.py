"""Every rank's stop is kept: a rank of a world_size > 1 run whose recording stopped after a
failed write (on_write_error="warn") writes its note into a file of its own,
steps/stopped.rank-NNNN.json, beside the manifest's one `recording_stopped` note. Readers give
them all (`Run.recording_stops`), inspect shows them, pack carries them, resume and overwrite
remove them as they remove the manifest's note."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import pytest
from _corpus import read_step, rewrite_step
from _fsspec_runs import to_memory
from test_recorder_write_errors import _flat
from typer.testing import CliRunner

import stabledrl_cli as sd
from stabledrl_cli import _atomic
from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import pack_run
from stabledrl_cli.dump._directory import DirectoryRun
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.inspection import summarize
from stabledrl_cli.replay.watch.follow import RunWatcher


def _stopping(path: Path, rank: int, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """Rank `rank` of 2 records steps 0 to 4 into `path`; its write of step `fail_at` fails
    (a full disk), every later write (its notes) goes through."""
    rec = sd.Recorder(path, world_size=2, rank=rank, on_write_error="warn")
    real_writev, failed = os.writev, []

    def full_once(fd: int, buffers: list[memoryview]) -> int:
        if not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    for step in range(5):
        if step == fail_at:
            monkeypatch.setattr(_atomic.os, "writev", full_once)
        rec.log_step(step, **_flat(step))
    rec.close()
    monkeypatch.setattr(_atomic.os, "writev", real_writev)


@pytest.fixture
def both_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared directory of 2 ranks: rank 0 stopped at step 3, then rank 1 at step 2."""
    run = tmp_path / "run"
    _stopping(run, 0, monkeypatch, fail_at=3)
    _stopping(run, 1, monkeypatch, fail_at=2)
    return run


def _inspect(run: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["inspect", str(run), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_both_ranks_that_stop_in_a_shared_directory_keep_their_notes(both_stopped: Path) -> None:
    """Before, the manifest's one note was rewritten by each rank that stopped: rank 0's stop
    was lost (the manifest said rank 1 only)."""
    manifest = json.loads((both_stopped / "manifest.json").read_text())
    assert manifest["recording_stopped"]["rank"] == 1  # the last one, as before
    run = sd.open_run(both_stopped)
    stops = run.recording_stops
    assert [(n["rank"], n["step"]) for n in stops] == [(0, 3), (1, 2)]
    assert all("no space left on device" in n["reason"] for n in stops)
    kinds = {f.kind for f in run.integrity.findings}
    assert kinds == {"missing_rank"}  # step 2 of rank 0 alone; the notes are no stray files
    assert run.step_numbers == [0, 1]
    shown = json.loads(_inspect(both_stopped, "--format", "json"))
    assert [n["rank"] for n in shown["recording_stops"]] == [0, 1]
    assert shown["recording_stopped"]["rank"] == 1  # the manifest's note, as before
    table = _inspect(both_stopped)
    assert "stopped at step 3 (rank 0): " in table
    assert "stopped at step 2 (rank 1): " in table


def test_a_node_directory_without_a_manifest_keeps_its_ranks_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node records into its own directory, copied into one afterwards (docs/recording.md:
    several nodes). Before, rank 1's note went to a manifest its directory does not have: lost, and
    the merged run said nothing of rank 1's stop."""
    node0, node1, merged = tmp_path / "node0", tmp_path / "node1", tmp_path / "run"
    with sd.Recorder(node0, world_size=2, rank=0) as rec:
        for step in range(5):
            rec.log_step(step, **_flat(step))
    _stopping(node1, 1, monkeypatch, fail_at=2)
    assert not (node1 / "manifest.json").exists()
    assert json.loads((node1 / "steps" / "stopped.rank-0001.json").read_text())["step"] == 2
    shutil.copytree(node0, merged)
    shutil.copytree(node1, merged, dirs_exist_ok=True)
    run = sd.open_run(merged)
    assert [(n["rank"], n["step"]) for n in run.recording_stops] == [(1, 2)]
    assert "recording_stopped" not in run.manifest
    assert "stopped at step 2 (rank 1): " in _inspect(merged)


def test_a_run_read_through_fsspec_gives_every_ranks_note(both_stopped: Path) -> None:
    url = to_memory(both_stopped)
    assert sd.open_run(url).recording_stops == sd.open_run(both_stopped).recording_stops
    shown = json.loads(_inspect(url, "--format", "json"))
    assert [n["rank"] for n in shown["recording_stops"]] == [0, 1]


def test_pack_carries_every_ranks_note(both_stopped: Path, tmp_path: Path) -> None:
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(both_stopped), archive)
    packed = sd.open_run(archive)
    assert packed.recording_stops == sd.open_run(both_stopped).recording_stops
    assert [n["rank"] for n in packed.recording_stops] == [0, 1]
    assert packed.manifest["recording_stopped"]["rank"] == 1  # kept as it was
    shown = json.loads(_inspect(archive, "--format", "json"))
    assert [n["rank"] for n in shown["recording_stops"]] == [0, 1]


@pytest.mark.parametrize(("resume_from", "kept"), [(2, False), (None, True), (3, True)])
def test_a_resume_removes_its_ranks_note_as_the_manifests(
    both_stopped: Path, resume_from: int | None, kept: bool
) -> None:
    """Rank 1 stopped at step 2; resumed from step 2 or before, it records that step again: its
    note goes (rank 0's stays). Appending (no resume_from), or resumed later, it stays."""
    note = both_stopped / "steps" / "stopped.rank-0001.json"
    sd.Recorder(both_stopped, world_size=2, rank=1, resume=True, resume_from=resume_from).close()
    assert note.exists() == kept
    ranks = [n["rank"] for n in sd.open_run(both_stopped).recording_stops]
    assert 0 in ranks and (1 in ranks) == kept


def test_overwrite_removes_its_own_ranks_note_only(both_stopped: Path) -> None:
    sd.Recorder(both_stopped, world_size=2, rank=1, overwrite=True).close()
    names = sorted(os.listdir(both_stopped / "steps"))
    assert "stopped.rank-0001.json" not in names and "stopped.rank-0000.json" in names
    sd.Recorder(both_stopped, world_size=2, rank=0, overwrite=True).close()
    assert sd.open_run(both_stopped).recording_stops == []


def test_a_new_recording_refuses_a_directory_holding_its_ranks_note(both_stopped: Path) -> None:
    """A new rank 1 into a directory whose steps/ holds rank 1's note of an earlier run would
    show that stop as its own."""
    for step_file in (both_stopped / "steps").glob("*.rank-0001.safetensors"):
        step_file.unlink()
    with pytest.raises(UsageError, match=r"stopped\.rank-0001\.json"):
        sd.Recorder(both_stopped, world_size=2, rank=1)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"not json", "not valid JSON"),
        (b'{"step": "abc", "rank": 1, "reason": 5}', "not a recording_stopped note"),
        (b'{"step": 2, "rank": 0, "reason": "disk full"}', "says rank 0, its file name 1"),
        (b'{"step": 2, "rank": 1, "reason": "' + b"x" * 70_000 + b'"}', "more than 65536"),
        ('{"rank": 1, "step": 2, "reason": "é"}'.encode("utf-16"), "not UTF-8"),
    ],
)
def test_a_crafted_note_file_is_one_finding(both_stopped: Path, content: bytes, said: str) -> None:
    (both_stopped / "steps" / "stopped.rank-0001.json").write_bytes(content)
    run = sd.open_run(both_stopped)
    assert [n["rank"] for n in run.recording_stops] == [0, 1]  # rank 1's manifest note
    [finding] = [f for f in run.integrity.findings if f.kind != "missing_rank"]
    assert finding.kind == "unknown_file" and finding.step is None
    assert finding.message.startswith("stopped.rank-0001.json: ") and said in finding.message
    assert "\n" not in finding.message
    _inspect(both_stopped)  # exit 0, no traceback


def test_a_note_that_is_no_regular_file_is_never_opened(both_stopped: Path) -> None:
    note = both_stopped / "steps" / "stopped.rank-0001.json"
    note.unlink()
    os.mkfifo(note)
    run = sd.open_run(both_stopped)
    [finding] = [f for f in run.integrity.findings if f.kind != "missing_rank"]
    assert finding.kind == "unknown_file" and "not a regular file" in finding.message
    assert [n["rank"] for n in run.recording_stops] == [0, 1]


def test_watch_names_every_rank_that_stopped(both_stopped: Path) -> None:
    """Before, watch said only the manifest's note: rank 1's, the last to stop."""
    result = CliRunner().invoke(app, ["watch", str(both_stopped), "--once", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "recording stopped" in line]
    assert len(lines) == 2, result.stderr
    assert "stopped at step 3 (rank 0)" in lines[0] and "stopped at step 2 (rank 1)" in lines[1]


def test_pack_cuts_the_reasons_of_many_ranks_to_fit_the_manifests_bound(tmp_path: Path) -> None:
    """4096 ranks that all stopped on a full shared disk, each naming its long path: the notes
    whole would take the archive's manifest past the 1 MiB its readers take. Step 0 was
    written by every rank (rank 0's file copied): a run of no step is refused."""
    run, ranks = tmp_path / "run", 4096
    with sd.Recorder(run, world_size=ranks, rank=0) as recorder:
        recorder.log_step(0, loss=0.5)
    header, data = read_step(run / "steps" / "step-00000000.rank-0000.safetensors")
    for rank in range(1, ranks):
        header["__metadata__"]["_rank"] = str(rank)
        rewrite_step(run / "steps" / f"step-00000000.rank-{rank:04d}.safetensors", header, data)
    reason = "/mnt/" + "d" * 2000 + ": cannot write it (no space left on device)"
    for rank in range(ranks):
        note = {"step": 7, "rank": rank, "reason": reason}
        (run / "steps" / f"stopped.rank-{rank:04d}.json").write_text(json.dumps(note))
    archive = tmp_path / "run.h5"
    pack_run(sd.open_run(run), archive)
    stops = sd.open_run(archive).recording_stops
    assert [n["rank"] for n in stops] == list(range(ranks))
    said = f"... ({len(reason):,} characters)"
    assert all(n["reason"].endswith(said) for n in stops)
    assert all(reason.startswith(n["reason"].removesuffix(said)) for n in stops)
    assert len(stops[0]["reason"]) < len(reason)
    table = _inspect(archive)
    assert table.count("stopped at step") == 20  # a line a rank, at most 20
    assert "... 4076 more ranks stopped: --format json has them all" in table


def test_a_manifest_whose_recording_stops_is_no_list_of_notes_is_corrupt(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sd.Recorder(run, world_size=2, rank=0).close()
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["recording_stops"] = [{"step": "abc", "rank": 1, "reason": "disk full"}]
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "corrupt manifest: recording_stops" in result.stderr


def test_a_note_naming_a_path_that_is_not_utf8_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason names the step file's path, here with a byte that is not UTF-8: it was written
    as a lone surrogate, which every reader refuses (the manifest became corrupt)."""
    run = tmp_path / os.fsdecode(b"run-\xff")
    _stopping(run, 1, monkeypatch, fail_at=2)
    _stopping(run, 0, monkeypatch, fail_at=3)
    stops = sd.open_run(run).recording_stops
    assert [n["rank"] for n in stops] == [0, 1]
    assert all("run-\\xff" in n["reason"] for n in stops)


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories a run reader lists, one entry a listing; no listing is reused (as of a
    live run, or a run at a URL)."""
    names: list[str] = []
    entries = DirectoryRun._entries

    def counted(self: DirectoryRun, directory: Path) -> list[tuple[str, bool]]:
        names.append(directory.name)
        return entries(self, directory)

    monkeypatch.setattr(DirectoryRun, "_entries", counted)
    monkeypatch.setattr(DirectoryRun, "_stamp", lambda self, directory: None)
    return names


def test_a_watch_poll_lists_the_steps_directory_once(both_stopped: Path, listed: list[str]) -> None:
    """The notes a poll gives are those of the listing it made of the steps (a live run's
    listing is never reused): reading them listed the directory a second time, 160 ms a poll
    for a run of 2 ranks x 20,000 steps on a loaded machine."""
    watcher = RunWatcher(both_stopped, ReplayConfig(device="cpu"))
    watcher.poll()
    assert [n["rank"] for n in watcher.recording_stops] == [0, 1]
    listed.clear()
    watcher.poll()
    assert listed == ["steps"]


def test_watch_names_at_most_20_ranks_that_stopped_then_one_line(tmp_path: Path) -> None:
    """30 ranks that all stopped on a full shared disk gave 30 warning lines."""
    run, ranks = tmp_path / "run", 30
    for rank in range(ranks):
        with sd.Recorder(run, world_size=ranks, rank=rank) as rec:
            rec.log_step(0, **_flat(0))
    for rank in range(ranks):
        note = {"step": 1, "rank": rank, "reason": "disk full"}
        (run / "steps" / f"stopped.rank-{rank:04d}.json").write_text(json.dumps(note))
    result = CliRunner().invoke(app, ["watch", str(run), "--once", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "recording stopped" in line]
    assert len(lines) == 21, result.stderr
    assert "(rank 19)" in lines[19]
    assert lines[20] == f"warning: {run}: recording stopped on more ranks: inspect has them all"


def test_a_manifests_notes_are_one_a_rank_with_its_own_note_too(tmp_path: Path) -> None:
    """A crafted archive manifest whose recording_stops leaves out the rank of its
    recording_stopped note, and names another rank twice: that note was hidden, and the
    rank was given twice."""
    run, archive = tmp_path / "run", tmp_path / "run.h5"
    with sd.Recorder(run) as recorder:
        recorder.log_step(0, loss=0.5)
    pack_run(sd.open_run(run), archive)
    with h5py.File(archive, "r+") as handle:
        manifest = json.loads(handle["manifest"][()])
        manifest["recording_stopped"] = {"step": 2, "rank": 1, "reason": "disk full"}
        manifest["recording_stops"] = [
            {"step": 3, "rank": 0, "reason": "disk full"},
            {"step": 4, "rank": 0, "reason": "again"},
        ]
        text = json.dumps(manifest)
        del handle["manifest"]
        handle.create_dataset("manifest", data=text, dtype=h5py.string_dtype())
    stops = sd.open_run(archive).recording_stops
    assert [(n["rank"], n["step"]) for n in stops] == [(0, 3), (1, 2)]


def test_a_notes_control_characters_reach_the_terminal_escaped(both_stopped: Path) -> None:
    note = {"step": 2, "rank": 1, "reason": "disk\x1b[2J\nfull\x9b31m"}
    (both_stopped / "steps" / "stopped.rank-0001.json").write_text(json.dumps(note))
    table = CliRunner().invoke(app, ["inspect", str(both_stopped)], env={"COLUMNS": "200"})
    watched = CliRunner().invoke(app, ["watch", str(both_stopped), "--once", "--device", "cpu"])
    for shown in (table, watched):
        assert shown.exit_code == 0, shown.output
        assert not {"\x1b", "\x9b"} & set(shown.output), repr(shown.output)
    assert r"disk\x1b[2J full\x9b31m" in table.stdout
    [line] = [line for line in watched.stderr.splitlines() if "(rank 1)" in line]
    assert r"disk\x1b[2J full\x9b31m" in line


def test_inspect_reads_the_notes_without_listing_the_run_again(
    both_stopped: Path, listed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inspect took the notes from a listing of its own: one more listing of steps/ (a request
    at a URL: 4 where 3 without the notes); now from the integrity check's."""
    summary = summarize(sd.open_run(both_stopped))
    assert [n["rank"] for n in summary.recording_stops] == [0, 1]
    with_notes, listed[:] = len(listed), []
    monkeypatch.setattr(DirectoryRun, "recording_stops", property(lambda self: []))
    monkeypatch.setattr(DirectoryRun, "listed_recording_stops", property(lambda self: []))
    assert summarize(sd.open_run(both_stopped)).recording_stops == []
    assert with_notes == len(listed)
