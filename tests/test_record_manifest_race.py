"""Ranks of one run that change its manifest at the same time (they start or stop together):
each reads the manifest and writes it back whole, and no rank's change may be undone by
another's write."""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path

from test_stop_notes import _stopping

import stabledrl_cli as sd
from stabledrl_cli.dump import _manifest_edits
from stabledrl_cli.dump._manifest_edits import amend_manifest

RANKS = 4
CHANGES = 60
"""Changes each process makes: enough that, without a lock, two of them interleave."""


def _at_once(rank_does: Callable[[Path, int, Barrier], None], path: Path, ranks: int) -> None:
    """`rank_does(path, rank, start)` in `ranks` processes, each released by `start` when all
    are ready; fails unless each ends with exit code 0."""
    context = multiprocessing.get_context("fork")
    start = context.Barrier(ranks)
    processes = [
        context.Process(target=rank_does, args=(path, rank, start)) for rank in range(ranks)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0


def _amend_own_key(path: Path, rank: int, start: Barrier) -> None:
    start.wait()
    for change in range(CHANGES):
        amend_manifest(path, f"rank_{rank}", change)


def test_ranks_amending_the_manifest_at_once_lose_no_change(tmp_path):
    """Before, a rank's write of the manifest read before another's write undid it: with 4
    processes making 60 changes each to keys of their own, keys ended at an earlier value or
    were missing (every run of the test)."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "run", "world_size": RANKS}))
    _at_once(_amend_own_key, tmp_path, RANKS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {
        "format": "run",
        "world_size": RANKS,
        **{f"rank_{rank}": CHANGES - 1 for rank in range(RANKS)},
    }


TRIALS = 60
"""Runs resumed by both ranks at once: enough that, without a lock, one of them interleaves."""


def _resume(path: Path, rank: int, start: Barrier) -> None:
    start.wait()
    sd.Recorder(path, world_size=2, rank=rank, resume=True, resume_from=1).close()


def test_ranks_resuming_a_run_at_once_keep_its_new_identity(tmp_path, monkeypatch):
    """Both ranks of a run that rank 1's failed write stopped at step 2 resume it from step 1,
    at the same time: rank 0 gives the run a new run_id (steps a reader may have read are
    written again) and the note goes. Before, rank 1's removal of the note, read before rank
    0's new run_id and written after it, put the old run_id back: about one trial in 20 (in
    each of 4 runs of the test, first at trial 5, 22, 27 and 26)."""
    template = tmp_path / "template"
    _stopping(template, 0, monkeypatch, fail_at=3)
    _stopping(template, 1, monkeypatch, fail_at=2)
    old = json.loads((template / "manifest.json").read_text())
    assert old["recording_stopped"]["rank"] == 1
    for trial in range(TRIALS):
        run = shutil.copytree(template, tmp_path / f"run-{trial}")
        _at_once(_resume, run, 2)
        manifest = json.loads((run / "manifest.json").read_text())
        assert "recording_stopped" not in manifest, trial
        assert manifest["run_id"] != old["run_id"], trial


def _amend_as_on_another_host(path: Path, rank: int, start: Barrier) -> None:
    """`_amend_own_key` in a process whose pid is the other ranks' (ranks in containers of
    several hosts often have the same one) on a file system that refuses the lock (NFS)."""
    os.getpid = lambda: 42  # (a forked child's own os module)

    def refused(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    fcntl.flock = refused
    _amend_own_key(path, rank, start)


def test_ranks_of_several_hosts_never_tear_the_manifest_without_a_lock(tmp_path):
    """Without the lock a change can still be lost, as before; but each write is whole. Before,
    ranks with the same pid wrote the manifest through the same temporary name: one's rename
    found it gone (WriteError) or the manifest ended as one's text with the tail of
    another's, which no reader can parse."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "run", "world_size": RANKS}))
    _at_once(_amend_as_on_another_host, tmp_path, RANKS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "run"
    assert [name for name in os.listdir(tmp_path) if name != "manifest.json"] == []


def _amend_once(path: Path) -> None:
    amend_manifest(path, "rank_1", "written")


def test_a_rank_never_waits_for_ever_for_a_lock_another_process_holds(tmp_path, monkeypatch):
    """A process that holds the lock and never lets go (stopped in a debugger, frozen by
    SIGSTOP mid-write): another rank's change waits its bounded time, then goes without the
    lock. Before, the rank's training hung in its manifest change for as long as the holder."""
    monkeypatch.setattr(_manifest_edits, "LOCK_WAIT", 0.5)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "run"}))
    holder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        rank = multiprocessing.get_context("fork").Process(target=_amend_once, args=(tmp_path,))
        began = time.monotonic()
        rank.start()
        rank.join(timeout=60)
        if rank.exitcode is None:
            rank.kill()
            rank.join()
        assert rank.exitcode == 0
        assert time.monotonic() - began < 5  # LOCK_WAIT as patched, not its 10 s
    finally:
        os.close(holder)
    assert json.loads((tmp_path / "manifest.json").read_text())["rank_1"] == "written"
