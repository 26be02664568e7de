"""One live Recorder a rank of a run directory (`dump._writer_lock`). Before, a second
`Recorder(path, overwrite=True)` while the first still recorded removed the first's finished
steps, and the first's later steps were written into the second's run, under its manifest: a
run of two policies that read as one."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
from _record_worker import killed_while_recording

import stabledrl_cli as sd
from stabledrl_cli.dump._writer_lock import writer_states
from stabledrl_cli.errors import UsageError

LOCK = ".writer.rank-0000.lock"


def _refusal(path, where: str) -> str:
    return (
        f"{path}: rank 0 of this run is being recorded by another Recorder, still open {where}; "
        "close it first (a run takes one Recorder a rank), or record elsewhere"
    )


def _losses(path) -> dict[int, float]:
    return {step.step: step.scalars["loss"] for step in sd.open_run(path)}


def _in_a_child(work) -> str:
    """What `work()` returns (text), run in a forked child: another process to the kernel's
    locks, with nothing of this one's locks (POSIX locks are not inherited)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's
        try:
            said = work()
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}"
        os.write(write, said.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def test_a_second_overwrite_while_the_first_records_is_refused_and_changes_nothing(tmp_path):
    path = tmp_path / "run"
    first = sd.Recorder(path, policy="grpo", overwrite=True)
    for step in range(3):
        first.log_step(step, loss=1.0)
    with pytest.raises(UsageError) as refused:
        sd.Recorder(path, policy="stabledrl", overwrite=True)
    assert str(refused.value) == _refusal(path, "in this process")
    first.log_step(3, loss=1.0)
    first.close()
    assert sd.open_run(path).manifest["policy"]["name"] == "grpo"
    assert _losses(path) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert LOCK not in os.listdir(path / "steps")  # closed: the rank is free, the file gone
    with sd.Recorder(path, policy="stabledrl", overwrite=True) as second:
        second.log_step(0, loss=2.0)
    assert _losses(path) == {0: 2.0}


@pytest.mark.parametrize("mode", ["overwrite", "resume", "new"])
def test_a_recorder_in_another_process_is_refused_while_one_records(tmp_path, mode):
    path = tmp_path / "run"
    with sd.Recorder(path, policy="grpo") as first:
        first.log_step(0, loss=1.0)

        def second() -> str:
            first.close()  # a forked child's close closes its copy only: the lock stays
            sd.Recorder(path, policy="grpo", **({mode: True} if mode != "new" else {}))
            return "opened"

        said = _in_a_child(second)
        first.log_step(1, loss=1.0)
    assert said == f"UsageError: {_refusal(path, 'in another process')}"
    assert _losses(path) == {0: 1.0, 1: 1.0}


def test_a_killed_recorders_rank_is_free_again(tmp_path):
    """The kernel drops a killed process's lock: its run resumes, the lock file it left is
    taken over and never read as a step."""
    path = tmp_path / "run"
    killed_while_recording(path, policy="grpo")
    assert LOCK in os.listdir(path / "steps")
    run = sd.open_run(path)
    assert [s.step for s in run] == [0] and run.integrity.findings == []
    with sd.Recorder(path, policy="grpo", resume=True) as resumed:
        resumed.log_step(1, loss=2.0)
    assert _losses(path) == {0: 1.0, 1: 2.0}


def test_a_recorder_dropped_unclosed_frees_its_rank(tmp_path):
    path = tmp_path / "run"
    dropped = sd.Recorder(path, policy="grpo")
    dropped.log_step(0, loss=1.0)
    del dropped
    with sd.Recorder(path, policy="grpo", resume=True) as resumed:
        resumed.log_step(1, loss=1.0)
    assert _losses(path) == {0: 1.0, 1: 1.0}


def test_each_rank_has_its_own_lock_and_a_live_run_reads_clean(tmp_path):
    path = tmp_path / "run"
    ranks = [sd.Recorder(path, world_size=2, rank=rank, policy="grpo") for rank in (0, 1)]
    for rank, recorder in enumerate(ranks):
        recorder.log_step(0, loss=float(rank), logp=np.zeros(2), logp_old=np.zeros(2),
                          advantages=np.ones(2), mask=np.ones(2, bool),
                          seq_id=np.zeros(2, np.int32))  # fmt: skip
    with pytest.raises(UsageError, match="rank 1 of this run"):
        sd.Recorder(path, world_size=2, rank=1, policy="grpo", resume=True)
    live = sd.open_run(path)
    assert sorted(os.listdir(path / "steps"))[:2] == [LOCK, ".writer.rank-0001.lock"]
    assert [s.step for s in live] == [0] and live.integrity.findings == []
    for recorder in ranks:
        recorder.close()
    assert not [n for n in os.listdir(path / "steps") if n.startswith(".writer.")]


def test_a_fifo_under_the_lock_files_name_is_never_waited_on(tmp_path):
    """A FIFO put where the lock file goes neither blocks a Recorder (it records unguarded)
    nor hides from a reader: it is an unknown file, as any other."""
    path = tmp_path / "run"
    (path / "steps").mkdir(parents=True)
    os.mkfifo(path / "steps" / LOCK)
    with sd.Recorder(path, policy="grpo") as recorder:
        recorder.log_step(0, loss=1.0)
    run = sd.open_run(path)
    assert [s.step for s in run] == [0]
    assert [f.kind for f in run.integrity.findings] == ["unknown_file"]


def test_a_killed_recorder_is_told_from_a_live_one_and_a_closed_one(tmp_path):
    """`writer_states` (what ends a watch of a recording whose Recorders ended unmarked): a
    rank's lock file that no process holds, signed under this machine's running kernel, is
    "released" (its Recorder died); one a Recorder holds is "held", in this process (whose
    lock the question must not drop) or another; a closed Recorder's is gone."""
    killed = tmp_path / "killed"
    killed_while_recording(killed)
    assert writer_states(killed / "steps") == {0: "released"}
    with sd.Recorder(killed, policy=None, resume=True) as resumed:
        assert writer_states(killed / "steps") == {0: "held"}
        assert _in_a_child(lambda: str(writer_states(killed / "steps"))) == "{0: 'held'}"
        second = _in_a_child(lambda: str(sd.Recorder(killed, policy=None, resume=True)))
        assert second == f"UsageError: {_refusal(killed, 'in another process')}"  # still held
        resumed.log_step(1, loss=1.0)
    assert writer_states(killed / "steps") == {}  # closed: its lock file is removed
    assert _losses(killed) == {0: 1.0, 1: 1.0}

    ranks = tmp_path / "ranks"
    killed_while_recording(ranks, ranks=2)
    assert writer_states(ranks / "steps") == {0: "released", 1: "released"}
    (ranks / "steps" / ".writer.rank-0001.lock").write_text("another-machine\n")
    assert writer_states(ranks / "steps") == {0: "released", 1: "unknown"}  # may not show


def test_a_lock_file_of_an_older_recorder_is_never_judged(tmp_path):
    """An unsigned lock file (left by a Recorder from before the signature, or by one on a
    file system without locks, which records unguarded) says nothing about its Recorder."""
    path = tmp_path / "run"
    killed_while_recording(path)
    (path / "steps" / LOCK).write_bytes(b"")
    assert writer_states(path / "steps") == {0: "unknown"}
    assert writer_states(tmp_path / "absent" / "steps") is None


def test_a_closed_recorder_whose_lock_file_cannot_be_removed_never_reads_as_died(
    tmp_path, monkeypatch
):
    """steps/ made read-only while recording (the lock file cannot be removed at close): the
    file left names no kernel, so the closed run never reads as one whose Recorder died.
    Before: `inspect` said 'ended unclosed: the process recording rank 0 died' above 'closed:
    its Recorder finished' (`record -- CMD` into a run whose steps/ was chmod 555 mid-run)."""
    from stabledrl_cli.dump import _writer_lock
    from stabledrl_cli.replay.inspection import summarize

    path = tmp_path / "run"
    rec = sd.Recorder(path, policy=None)
    rec.log_step(0, loss=1.0)
    real_unlink = os.unlink

    def refused(name, *args, **kwargs):
        if str(name).endswith(LOCK):
            raise PermissionError(13, "Permission denied", str(name))
        return real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(_writer_lock.os, "unlink", refused)
    rec.close()
    monkeypatch.undo()
    assert (path / "steps" / LOCK).exists()  # left: steps/ refused its removal
    assert writer_states(path / "steps") == {0: "unknown"}
    summary = summarize(sd.open_run(path))
    assert summary.recording_closed and summary.recording_died == []
    assert _losses(path) == {0: 1.0}


def test_a_recorder_started_with_another_on_one_directory_is_told_it_is_recorded(
    tmp_path, monkeypatch
):
    """Two jobs given one output at once (two `record --out RUN` started together: RUN made
    empty by each): the Recorder that finds the run made by the other after it looked for
    steps/ (so before it could lock) is refused as the one in another process, not as a run
    that is not empty. Before: 'RUN already exists and is not empty (manifest.json); pass
    overwrite=True to replace the run, or resume=True to continue it' (2 of 3 tries)."""
    from stabledrl_cli.dump import _setup

    path = tmp_path / "run"
    path.mkdir()  # `record` makes --out before its command starts
    ready_read, ready_write = os.pipe()
    end_read, end_write = os.pipe()
    real_ready, children = _setup._ready, []

    def the_other_first(*args, **kwargs):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's: the other job's Recorder, held
            try:
                os.close(end_write)  # its end comes as the test closes its own
                _setup._ready = real_ready  # (the child's copy of the patch)
                other = sd.Recorder(path, policy=None)
                os.write(ready_write, b"1")
                os.read(end_read, 1)
                other.close()
            finally:
                os._exit(0)
        children.append(pid)
        assert os.read(ready_read, 1) == b"1"
        return real_ready(*args, **kwargs)

    monkeypatch.setattr(_setup, "_ready", the_other_first)
    try:
        with pytest.raises(UsageError) as refused:
            sd.Recorder(path, policy=None)
    finally:
        os.close(end_write)
        for pid in children:
            os.waitpid(pid, 0)
        for fd in (ready_read, ready_write, end_read):
            os.close(fd)
    assert str(refused.value) == _refusal(path, "in another process")


@pytest.mark.parametrize("start", ["spawn", "forkserver"])
def test_a_spawned_worker_that_makes_the_scripts_recorder_again_is_told_why(tmp_path, start):
    """A script that makes its Recorder at its top level and starts a spawned DataLoader (or
    Pool) worker: the worker runs the top level again, as `__mp_main__`, and its Recorder was
    refused as 'still open in another process; close it first', naming neither the worker nor
    the fix. A forkserver (DataLoader(multiprocessing_context="forkserver"), Python 3.14's
    default on Linux), which runs it in a process the script started through another, still
    was (a grandchild here)."""
    path = tmp_path / "run"
    with sd.Recorder(path, policy=None) as first:
        first.log_step(0, loss=1.0)

        def spawned() -> str:
            first.close()  # (the child's copy)
            sys.modules["__mp_main__"] = types.ModuleType("__mp_main__")  # spawn's rerun
            sd.Recorder(path, policy=None)
            return "opened"

        said = _in_a_child(spawned if start == "spawn" else lambda: _in_a_child(spawned))
    assert said == (
        f"UsageError: {path}: rank 0 of this run is being recorded by another Recorder, still "
        "open in the process that started this one: a spawned worker (a DataLoader's, a "
        "Pool's) runs the script's top level again, so make the Recorder under "
        'if __name__ == "__main__":'
    )
    assert _losses(path) == {0: 1.0}
