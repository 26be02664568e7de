"""A Recorder's life around its process: in a child forked from the process that made it (a
fork-started worker, `os.fork`) log_step is a UsageError and nothing is written, so the child
neither overwrites the parent's step files nor blocks on the parent's writer queue (which has
no thread in the child), and leaving the child (atexit) does not block either; a close of
async writes that is interrupted while it drains is finished by the next one (at exit)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import stabledrl_cli as sd
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import InputError, UsageError


def _recorded(script: str, path: Path, *args: str) -> tuple[Run, str]:
    """(the run at `path`, stdout) after a real Python process ran `script` with `path` and
    `args`: it exited 0 and the run's integrity is ok."""
    return _ran(["-c", script], path, *args)


def _recorded_file(script: Path, path: Path, *args: str) -> tuple[Run, str]:
    """`_recorded` of the script in file `script`."""
    return _ran([str(script)], path, *args)


def _ran(command: list[str], path: Path, *args: str) -> tuple[Run, str]:
    done = subprocess.run(
        [sys.executable, *command, str(path), *args],
        capture_output=True,
        text=True,
        timeout=120,  # a guard against the hangs these tests are about, not a bound
    )
    assert done.returncode == 0, done.stderr
    run = sd.open_run(path)
    assert run.integrity.ok
    return run, done.stdout


CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import stabledrl_cli as sd
    from stabledrl_cli.errors import UsageError

    def batch(value):
        return dict(logp=np.full(4, value, np.float32), logp_old=np.zeros(4, np.float32),
                    advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]))

    async_writes = sys.argv[2] == "async"
    rec = sd.Recorder(sys.argv[1], async_writes=async_writes, queue_size=2)
    for step in range(3):
        rec.log_step(step, **batch(step))
    pid = os.fork()
    if pid == 0:
        refused = 0
        for step in range(3, 10):  # more steps than the queue holds
            try:
                rec.log_step(step, **batch(1000 + step))
            except UsageError as exc:
                refused += "forked" in str(exc)
        sys.exit(0 if refused == 7 else 1)  # atexit closes the child's copy
    _, status = os.waitpid(pid, 0)
    for step in range(3, 6):
        rec.log_step(step, **batch(step))
    rec.close()
    print(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_forked_child_cannot_write_into_its_parents_run(tmp_path, mode):
    path = tmp_path / "run"
    run, stdout = _recorded(CHILD, path, mode)
    assert stdout.split() == ["0"]  # the child: every log_step refused, and it exited
    assert run.step_numbers == list(range(6))
    assert [float(np.asarray(step["logp"])[0]) for step in run] == [0, 1, 2, 3, 4, 5]
    assert not [n for n in os.listdir(path / "steps") if ".tmp-" in n]


def test_a_recorder_sent_to_another_process_is_a_usage_error_naming_it(tmp_path):
    """A Recorder given to a spawned DataLoader worker (its dataset) or a Pool task is pickled:
    that failed deep in pickle with "cannot pickle '_thread.lock' object", naming neither the
    Recorder nor what to do."""
    with sd.Recorder(tmp_path / "run", policy=None, async_writes=True) as rec:
        for send in (pickle.dumps, copy.deepcopy):
            with pytest.raises(UsageError, match=r"a Recorder cannot be sent to another process"):
                send({"dataset": [rec]})
        rec.log_step(0, grad_norm=1.0)
    assert sd.open_run(tmp_path / "run").step_numbers == [0]


INTERRUPTED_CLOSE = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import stabledrl_cli as sd
    import stabledrl_cli.dump._step_writes as writer

    gate, real_durable = threading.Event(), writer.make_step_durable

    def held_durable(*args):  # the disk is slow: nothing is fsynced until close() waits
        gate.wait()
        real_durable(*args)
        print("durable", args[1], flush=True)

    writer.make_step_durable = held_durable
    rec = sd.Recorder(sys.argv[1], async_writes=True)
    for step in range(6):
        rec.log_step(step, logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
                     advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]))
    real_join = writer.WriteThread.join

    def interrupted_join(self, *args):  # a second Ctrl-C while close() drains the queue
        writer.WriteThread.join = real_join
        gate.set()
        raise KeyboardInterrupt

    writer.WriteThread.join = interrupted_join
    try:
        rec.close()
    except KeyboardInterrupt:
        pass
    """
)


def test_a_close_interrupted_while_it_drains_is_finished_at_exit(tmp_path):
    # A close() interrupted in its drain (Ctrl-C twice) must not lose the queued steps: the
    # next close, at the latest the one at exit, finishes it.
    path = tmp_path / "run"
    run, stdout = _recorded(INTERRUPTED_CLOSE, path)
    assert run.step_numbers == list(range(6))
    assert stdout.split()[1::2] == [f"step-{n:08d}.safetensors" for n in range(6)]


DROPPED_UNCLOSED = textwrap.dedent(
    """
    import atexit, sys, threading
    import numpy as np
    import stabledrl_cli as sd
    import stabledrl_cli.dump._step_writes as writer

    gate, real_durable = threading.Event(), writer.make_step_durable

    def held_durable(*args):  # the disk is slow: nothing is fsynced before the process ends
        gate.wait()
        real_durable(*args)
        print("durable", args[1], flush=True)

    writer.make_step_durable = held_durable

    def train(path):
        rec = sd.Recorder(path, async_writes=True)  # never closed, dropped on return
        atexit.register(gate.set)  # runs before the Recorder's own exit handler
        for step in range(8):
            rec.log_step(step, logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
                         advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]))

    train(sys.argv[1])
    """
)


def test_an_async_recorder_dropped_unclosed_still_writes_its_queue_at_exit(tmp_path):
    path = tmp_path / "run"
    run, stdout = _recorded(DROPPED_UNCLOSED, path)
    assert run.step_numbers == list(range(8))
    assert stdout.split()[1::2] == [f"step-{n:08d}.safetensors" for n in range(8)]


TRAINED_IN_A_CHILD = textwrap.dedent(
    """
    import multiprocessing, sys, time
    import numpy as np
    import stabledrl_cli as sd
    import stabledrl_cli.dump._step_writes as writer

    real_durable = writer.make_step_durable

    def slow_durable(*args):  # a slow disk: steps are still queued when the training returns
        time.sleep(0.1)
        real_durable(*args)
        print("durable", args[1], flush=True)

    writer.make_step_durable = slow_durable

    def train(path):
        rec = sd.Recorder(path, async_writes=True)  # never closed: the child just returns
        for step in range(6):
            rec.log_step(step, logp=np.zeros(4, np.float32), logp_old=np.zeros(4, np.float32),
                         advantages=np.ones(4, np.float32), seq_id=np.array([0, 0, 1, 1]))

    if __name__ == "__main__":
        child = multiprocessing.get_context(sys.argv[2]).Process(target=train, args=(sys.argv[1],))
        child.start()
        child.join()
        sys.exit(child.exitcode)
    """
)


@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_a_recorder_in_a_multiprocessing_child_writes_its_queue_as_the_child_ends(
    tmp_path, start_method
):
    """Training in a child process of `multiprocessing` (a notebook launcher's fork, Python
    3.14's default forkserver): such a child ends with os._exit, which runs no atexit handler,
    so the steps still queued were lost."""
    script = tmp_path / "train.py"  # (a file: spawn and forkserver import the child's code)
    script.write_text(TRAINED_IN_A_CHILD)
    path = tmp_path / "run"
    run, stdout = _recorded_file(script, path, start_method)
    assert run.step_numbers == list(range(6))
    assert stdout.split()[1::2] == [f"step-{n:08d}.safetensors" for n in range(6)]


@pytest.mark.parametrize("async_writes", [False, True])
def test_log_step_from_another_thread_waits_for_the_call_under_way(
    tmp_path, monkeypatch, async_writes
):
    """Each log_step is one step, whole, whichever thread calls it: a call made while another
    thread's call is under way waits for it, so the step order the Recorder checks is the
    order in which the steps were logged (here step 1 then a duplicate step 1, refused; with
    the calls interleaved, step 0's call finished last and the duplicate was taken)."""
    from stabledrl_cli.dump import _recorder_steps
    from stabledrl_cli.errors import UsageError

    rec = sd.Recorder(tmp_path / "run", async_writes=async_writes)
    logp = np.full(4, -1.0, np.float32)
    step = dict(logp=logp, logp_old=logp, advantages=np.ones(4, np.float32), seq_id=[0] * 4)
    real_build = _recorder_steps.build_step
    other = threading.Thread(target=rec.log_step, args=(1,), kwargs=step)

    def build_step(**kwargs):  # step 0's call, under way, lets another thread log step 1
        if kwargs["step"] == 0:
            other.start()
            other.join(0.5)  # a wait for the other call, which may not end before this one
        return real_build(**kwargs)

    monkeypatch.setattr(_recorder_steps, "build_step", build_step)
    rec.log_step(0, **step)
    other.join()
    with pytest.raises(UsageError, match=r"^step 1 was logged already"):
        rec.log_step(1, **step)
    rec.close()
    assert sd.open_run(tmp_path / "run").step_numbers == [0, 1]


def _closed_mark(path: Path) -> object:
    """The run's manifest's `recording_closed`, None without one."""
    return json.loads((path / "manifest.json").read_text()).get("recording_closed")


def test_a_closed_recording_is_marked_in_the_manifest_and_a_resume_clears_the_mark(tmp_path):
    """Closing a Recorder marks its run `recording_closed` (every step written: a reader
    following the run knows none will come); open, the run has no mark, so a process killed
    while recording never leaves one; resuming clears it before any step changes. A run of
    world_size > 1 is not marked: its rank 0 cannot know the others are done. Before, no
    run said it was finished."""
    run = tmp_path / "run"
    with sd.Recorder(run, policy=None, async_writes=True) as recorder:
        recorder.log_step(0, grad_norm=1.0)
        recorder.flush()
        assert _closed_mark(run) is None
    assert _closed_mark(run) is True
    assert sd.open_run(run).step_numbers == [0]  # a reader leaves the mark alone
    recorder.close()  # idempotent
    with sd.Recorder(run, policy=None, resume=True) as recorder:
        assert _closed_mark(run) is None
        recorder.log_step(1, grad_norm=1.0)
    assert _closed_mark(run) is True
    ranked = tmp_path / "ranked"
    with sd.Recorder(ranked, policy=None, world_size=2, rank=0) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    assert _closed_mark(ranked) is None


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import stabledrl_cli as sd

    rec = sd.Recorder(sys.argv[1], policy=None, async_writes=True)
    for step in range(3):
        rec.log_step(step, grad_norm=1.0)
    rec.flush()
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # a forked child's exit closes its copy of the Recorder: no mark
    os.waitpid(pid, 0)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while recording
    """
)


def test_a_run_killed_while_recording_is_not_marked_closed(tmp_path):
    path = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -9, done.stderr
    assert sd.open_run(path).step_numbers == [0, 1, 2]
    assert _closed_mark(path) is None


def test_a_closed_run_overwritten_loses_its_mark_before_any_step_file_goes(tmp_path, monkeypatch):
    """`overwrite=True` (`record --force`, `import --force`, `branch --force`) over a closed run:
    the old manifest's mark is removed before its step files are, so a watcher that reads the
    run while they go does not end on a run half gone. Before, the mark stayed until the new
    manifest was written: such a watcher read the old manifest, closed, over the steps left
    (here 2 of 3) and ended as if the recording were done."""
    from stabledrl_cli.dump import _setup
    from stabledrl_cli.replay.config import ReplayConfig
    from stabledrl_cli.replay.watch.follow import RunWatcher

    run = tmp_path / "run"
    with sd.Recorder(run, policy=None) as recorder:
        for step in range(3):
            recorder.log_step(step, grad_norm=1.0)
    assert _closed_mark(run) is True
    watcher = RunWatcher(run, ReplayConfig(device="cpu"))
    seen: list[tuple[bool, int]] = []
    remove = _setup.remove_file

    def removed_then_polled(path: Path) -> None:
        remove(path)
        if not seen:  # the first step file gone: a watcher polls
            watcher.poll()
            seen.append((watcher.closed, watcher.state().steps))

    monkeypatch.setattr(_setup, "remove_file", removed_then_polled)
    with sd.Recorder(run, policy=None, overwrite=True) as recorder:
        recorder.log_step(0, grad_norm=2.0)
    assert seen == [(False, 2)]
    assert _closed_mark(run) is True


class _TellingLock:
    """A Recorder's lock that sets `wanted` when a thread starts to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.wanted = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.wanted.set()
            self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def test_a_close_from_another_thread_marks_the_run_after_a_step_under_way(tmp_path, monkeypatch):
    """A synchronous Recorder closed from one thread while another is writing a step: the
    run is marked `recording_closed` only once that step is final (a watch that reads the
    mark then lists every step). Before, close marked it at once, the step landing after
    the mark; the async Recorder already waited for a log_step under way."""
    from stabledrl_cli.dump import _manifest_edits, _recorder_end, _recorder_steps

    run = tmp_path / "run"
    recorder = sd.Recorder(run, policy=None)
    recorder.log_step(0, grad_norm=1.0)
    lock = _TellingLock()
    recorder._lock = lock  # type: ignore[assignment]
    writing = threading.Event()
    write, amend = _recorder_steps.write_step_file, _manifest_edits.amend_manifest
    step = run / "steps" / "step-00000001.safetensors"
    landed: list[bool] = []

    def slow_write(item: object, *, durable: bool = True) -> None:
        writing.set()
        lock.wanted.wait()  # until close waits for the lock (or marks the run without it)
        write(item, durable=durable)  # type: ignore[arg-type]

    def telling_amend(path: Path, name: str, value: object | None) -> None:
        landed.append(step.exists())
        lock.wanted.set()
        amend(path, name, value)

    monkeypatch.setattr(_recorder_steps, "write_step_file", slow_write)
    monkeypatch.setattr(_recorder_end, "amend_manifest", telling_amend)
    logging = threading.Thread(target=recorder.log_step, args=(1,), kwargs={"grad_norm": 1.0})
    logging.start()
    assert writing.wait(timeout=120)
    recorder.close()
    logging.join()
    assert landed == [True]
    assert _closed_mark(run) is True


@pytest.mark.parametrize("manifest", ["[1]", "null", "fifo", "[" * 100_000 + "]" * 100_000])
def test_close_over_a_manifest_replaced_while_recording_never_raises(tmp_path, manifest):
    """close marks the run best effort: a manifest something replaced meanwhile (a JSON that
    is no object, a FIFO, one nested past the parser's depth) is left alone. Before, close
    raised TypeError or AttributeError out of the training's `with` block (a FIFO: it waited
    for a writer for ever; a deep one: RecursionError)."""
    run = tmp_path / "run"
    recorder = sd.Recorder(run, policy=None)
    recorder.log_step(0, grad_norm=1.0)
    (run / "manifest.json").unlink()
    if manifest == "fifo":
        os.mkfifo(run / "manifest.json")
    else:
        (run / "manifest.json").write_text(manifest)
    raised: list[BaseException] = []

    def close() -> None:
        try:
            recorder.close()
        except BaseException as exc:
            raised.append(exc)

    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(60)  # a guard against the hang this test is about, not a bound
    if closing.is_alive():
        os.close(os.open(run / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("close waited on the FIFO")
    assert raised == []
    assert (run / "steps" / "step-00000000.safetensors").is_file()


@pytest.mark.parametrize("async_writes", [False, True])
def test_a_recorder_on_a_relative_path_keeps_writing_there_after_a_chdir(
    tmp_path, monkeypatch, async_writes
):
    """A Recorder made on a relative path writes its run where that path named when it was
    made, whatever working directory the process moves to later (hydra's job chdir, a
    script's own os.chdir): the later steps failed to write (no such directory), and with
    async writes a step logged before the chdir, still queued, was lost too."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    rec = sd.Recorder("run", policy=None, async_writes=async_writes)
    rec.log_step(0, loss=1.0)
    monkeypatch.chdir(elsewhere)
    rec.log_step(1, loss=0.5)
    rec.close()
    assert sd.open_run(start / "run").step_numbers == [0, 1]
    assert json.loads((start / "run" / "manifest.json").read_text())["recording_closed"]
    assert not list(elsewhere.iterdir())


def test_a_relative_path_in_a_removed_working_directory_is_a_write_error(tmp_path, monkeypatch):
    """Made on a relative path while the working directory is gone (removed under the
    process), a Recorder cannot be written: WriteError naming the path, not the
    FileNotFoundError of taking the path from that directory."""
    from stabledrl_cli.errors import WriteError

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(WriteError, match=r"^run: cannot write it \(No such file or directory\)"):
        sd.Recorder("run")


@pytest.mark.parametrize("mode", ["new", "overwrite", "resume"])
def test_a_run_whose_steps_folder_is_a_symlink_is_never_written_through_it(tmp_path, mode):
    """A run's `steps` that is a symlink (to another run's, or to an empty folder for a new
    run) is refused before anything changes (docs/trust.md: a run's own files are never
    written through a link). Before, `overwrite=True` (`record --force`) removed the other
    run's step files through the link (4 of them, here) and wrote its own there, and a resumed
    or new recording wrote through it too: a run that every reader then refused (its steps a
    symlink)."""
    other = tmp_path / "other"
    with sd.Recorder(other, policy=None) as recorder:
        for step in range(4):
            recorder.log_step(step, grad_norm=1.0)
    target = other / "steps"
    run = tmp_path / "run"
    if mode == "new":
        run.mkdir()
        target = tmp_path / "elsewhere"
        target.mkdir()
    else:
        with sd.Recorder(run, policy=None) as recorder:
            recorder.log_step(0, grad_norm=2.0)
        for path in (run / "steps").iterdir():
            path.unlink()
        (run / "steps").rmdir()
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (run / "steps").symlink_to(target)
    with pytest.raises(InputError, match="steps: a symlink"):
        sd.Recorder(run, policy=None, overwrite=mode == "overwrite", resume=mode == "resume")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_record_force_onto_a_run_whose_steps_folder_is_a_symlink_is_one_line(tmp_path):
    """`record --force` there: exit 3, one line naming the link; the other run is intact."""
    from typer.testing import CliRunner

    from stabledrl_cli.cli.app import app

    other, run = tmp_path / "other", tmp_path / "run"
    with sd.Recorder(other, policy=None) as recorder:
        recorder.log_step(0, grad_norm=1.0)
    run.mkdir()
    (run / "steps").symlink_to(other / "steps")
    result = CliRunner().invoke(app, ["record", "--out", str(run), "--force", "--rl-steps", "2"])
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: {run / 'steps'}: a symlink (nothing in a run is followed out of it)\n"
    )
    assert [p.name for p in (other / "steps").iterdir()] == ["step-00000000.safetensors"]


def test_an_async_recorder_dropped_unclosed_holds_its_rank_until_its_queue_is_written(
    tmp_path, monkeypatch
):
    """A dropped async Recorder gave its rank up at once (its finalizer), with steps still
    queued: a second Recorder of the rank then took the run (overwrite=True removed its
    files) and the first's queue landed in it afterwards, two runs' steps mixed. Now the rank
    stays held until the queue is written, and a second Recorder of the rank in the process
    (a notebook cell run again) waits for that, where it was refused ('still open in this
    process; close it first', with nothing left to close)."""
    import gc

    import stabledrl_cli.dump._step_writes as writer

    real_durable, disk = writer.make_step_durable, threading.Event()

    def slow_durable(*args):
        disk.wait(30)
        real_durable(*args)

    monkeypatch.setattr(writer, "make_step_durable", slow_durable)
    path = tmp_path / "run"
    rec = sd.Recorder(path, policy=None, async_writes=True)
    for step in range(3):
        rec.log_step(step, grad_norm=1.0, loss=float(step))
    thread = rec._writer
    del rec
    gc.collect()
    made: list[sd.Recorder] = []
    second = threading.Thread(
        target=lambda: made.append(sd.Recorder(path, policy=None, resume=True))
    )
    second.start()
    second.join(0.5)
    assert second.is_alive() and not made  # waits: the queue is not written
    assert sd.open_run(path).step_numbers == [0, 1, 2]  # each under its name, not fsynced
    disk.set()
    second.join(30)
    assert not thread.is_alive()
    with made[0] as again:
        assert again.last_step == 2
        again.log_step(3, grad_norm=1.0, loss=3.0)
    run = sd.open_run(path)
    assert run.step_numbers == [0, 1, 2, 3]


def test_a_recorder_made_at_once_after_an_async_one_was_dropped_resumes_it(tmp_path):
    """A training function that records with an async Recorder and returns without closing
    it, called again on the same run: the new Recorder of the rank, made while the dropped
    one's steps are still being written, waits for them and resumes after the last."""

    def step(recorder: sd.Recorder, number: int) -> None:
        batch = np.zeros((16, 1024), np.float32)
        recorder.log_step(number, logp=batch, logp_old=batch, advantages=np.ones(16, np.float32))

    def train(first: int, resume: bool) -> None:
        recorder = sd.Recorder(tmp_path / "run", policy="grpo", async_writes=True, resume=resume)
        assert recorder.last_step == (first - 1 if resume else None)
        for number in range(first, first + 5):
            step(recorder, number)

    train(0, resume=False)
    train(5, resume=True)
    with sd.Recorder(tmp_path / "run", policy="grpo", resume=True) as last:
        assert last.last_step == 9
    assert sd.open_run(tmp_path / "run").step_numbers == list(range(10))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_close_from_a_signal_handler_during_log_step_comes_after_the_step(
    tmp_path, monkeypatch, mode
):
    """A close made by a signal handler that runs in the thread of a log_step under way (the
    handler of a script that closes its logger on SIGTERM, then trains on or exits): the
    step is recorded whole and the run marked closed after it. Before, the close went
    through the Recorder's own lock at once: async, the writer thread was stopped before the
    step was queued, so a step whose log_step returned was never written; sync, the run was
    marked closed before the step landed."""
    from stabledrl_cli.dump import _manifest_edits, _recorder_end, _recorder_steps

    run = tmp_path / "run"
    recorder = sd.Recorder(run, policy=None, async_writes=mode == "async")
    recorder.log_step(0, grad_norm=1.0)
    encode, amend = _recorder_steps.encode_step, _manifest_edits.amend_manifest
    step = run / "steps" / "step-00000001.safetensors"
    landed: list[bool] = []

    def encode_then_signal(*args: object, **kwargs: object) -> object:
        parts = encode(*args, **kwargs)  # type: ignore[arg-type]
        recorder.close()  # as a handler run between two bytecodes of log_step
        assert (run / "steps" / "step-00000000.safetensors").exists()  # (then os._exit, say)
        return parts

    def telling_amend(path: Path, name: str, value: object | None) -> None:
        landed.append(step.exists())
        amend(path, name, value)

    monkeypatch.setattr(_recorder_steps, "encode_step", encode_then_signal)
    monkeypatch.setattr(_recorder_end, "amend_manifest", telling_amend)
    recorder.log_step(1, grad_norm=1.0)
    assert step.exists()
    assert landed == [True]
    assert _closed_mark(run) is True
    with pytest.raises(UsageError, match="closed Recorder"):
        recorder.log_step(2, grad_norm=1.0)


LATE_HANDLER = textwrap.dedent(
    """
    import atexit, sys
    import numpy as np
    import stabledrl_cli as sd

    def arrays():
        return dict(logp=np.zeros(3), logp_old=np.zeros(3), advantages=np.ones(3),
                    seq_id=np.zeros(3, dtype=np.int32))

    def last_words():
        recorder.log_step(2, **arrays())
        print("the handler went on")

    atexit.register(last_words)  # before the Recorder: Python runs it after the Recorder's
    recorder = sd.Recorder(sys.argv[1], policy="grpo", async_writes=True)
    for step in range(2):
        recorder.log_step(step, **arrays())
    """
)


def test_an_exit_handler_registered_before_an_async_recorder_still_records(tmp_path):
    """An exit handler of the script registered before an async Recorder runs after the
    Recorder's own (last registered, first run), which closed it: its log_step raised 'on a
    closed Recorder', Python printed 'Exception ignored in atexit callback' and the rest of
    the handler (a checkpoint's save, say) was skipped. The Recorder's exit handler now writes
    the queued steps and marks the run closed but leaves the Recorder writing: step 2 is
    recorded and the handler goes on."""
    run, out = _recorded(LATE_HANDLER, tmp_path / "run")
    assert run.step_numbers == [0, 1, 2]
    assert out == "the handler went on\n"
    assert run.manifest.get("recording_closed") is True


class _Unprintable(Exception):
    """An exception whose message cannot be made: str() of it raises (one made with the
    wrong arguments for its own __str__)."""

    def __str__(self) -> str:
        return self.args[0]


def test_a_training_error_that_cannot_be_printed_is_still_the_one_raised(tmp_path):
    """Leaving a with block on an exception whose str() raises, the Recorder's note of it
    raised IndexError in its place, and the run was left unclosed: the training's own
    exception goes on, and the note names its type alone."""
    path = tmp_path / "run"
    error = _Unprintable()
    with pytest.raises(_Unprintable) as raised, sd.Recorder(path, policy=None) as rec:
        rec.log_step(0, grad_norm=1.0)
        raise error
    assert raised.value is error
    manifest = sd.open_run(path).manifest
    reason = manifest["recording_stopped"]["reason"]
    assert reason == "training stopped by _Unprintable after step 0"
    assert manifest["recording_closed"] is True


def _steps_into(path):
    """A generator of 10 steps, each recorded into `path` in a with-Recorder block."""
    with sd.Recorder(path, policy=None) as rec:
        for step in range(10):
            rec.log_step(step, grad_norm=1.0)
            yield step


def test_a_generator_of_steps_closed_early_is_a_normal_end(tmp_path):
    """A `with Recorder` block in a generator whose consumer stops after step 2 (a `break`,
    then its close) noted the run stopped at step 3: 'training stopped by GeneratorExit after
    step 2', which inspect showed as a training cut short. GeneratorExit is the consumer's
    normal end, as sys.exit(0) is: no note; the run is closed with its 3 steps."""
    path = tmp_path / "run"
    taken = _steps_into(path)
    for step in taken:
        if step == 2:
            break
    taken.close()
    manifest = sd.open_run(path).manifest
    assert "recording_stopped" not in manifest
    assert manifest["recording_closed"] is True
    assert [s.step for s in sd.open_run(path).step_headers()] == [0, 1, 2]


def test_a_generator_of_steps_left_unfinished_at_exit_writes_nothing_more(tmp_path, monkeypatch):
    """A generator holding a with-Recorder block, left unfinished when the script ended, is
    closed by Python as the interpreter ends, after the exit handlers: the Recorder's close
    then printed 'Exception ignored in: <generator object ...>' and a traceback ending
    'ImportError: sys.meta_path is None, Python is likely shutting down' (measured on a real
    script). At that point it writes nothing: the run reads as unclosed, as a Recorder left
    open does."""
    path = tmp_path / "run"
    taken = _steps_into(path)
    assert next(taken) == 0
    monkeypatch.setattr(sys, "is_finalizing", lambda: True)
    taken.close()
    monkeypatch.undo()
    assert "recording_closed" not in sd.open_run(path).manifest


def test_a_call_on_a_closed_recorder_is_named_in_its_refusal(tmp_path):
    """rewrite_step on a closed Recorder was refused as 'log_step on a closed Recorder',
    naming a call the script never made."""
    from stabledrl_cli.errors import UsageError

    recorder = sd.Recorder(tmp_path / "run", policy=None)
    recorder.log_step(0, loss=1.0)
    recorder.close()
    with pytest.raises(UsageError, match=r"^rewrite_step on a closed Recorder$"):
        recorder.rewrite_step(0, loss=2.0)
    with pytest.raises(UsageError, match=r"^log_step on a closed Recorder$"):
        recorder.log_step(1, loss=2.0)


@pytest.mark.parametrize(
    ("module", "call", "async_writes"),
    [
        ("stabledrl_cli.dump._setup", "hold_writer_lock", False),  # steps/ made, no manifest
        ("stabledrl_cli.dump._setup", "fsync_dir", False),  # the manifest written
        ("stabledrl_cli.dump._recorder_end", "at_child_end", True),  # the writer started
    ],
)
def test_a_recorder_cut_short_as_it_is_made_unmakes_the_new_run(
    tmp_path, monkeypatch, module, call, async_writes
):
    """A Ctrl-C while the Recorder makes a new run. Before, one after steps/ was made and
    before the manifest was written left a directory that read as 'is not a run: it has no
    manifest.json', one after it a run of no step that a new Recorder refused as not empty;
    now the run is unmade, the directory as it was found (the folders made above the run
    too: before, fresh/ of fresh/deep/run was left), and a Recorder records into it."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    path = tmp_path / "fresh" / "deep" / "run"
    (tmp_path / "empty").mkdir()
    for run in (path, tmp_path / "empty"):
        with monkeypatch.context() as patch:
            patch.setattr(f"{module}.{call}", interrupted)
            with pytest.raises(KeyboardInterrupt):
                sd.Recorder(run, async_writes=async_writes)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []
    with sd.Recorder(path, unit="sequence") as rec:
        rec.log_step(0, logp=[-1.0], logp_old=[-1.0], advantages=[1.0])
    assert sd.open_run(path).step_numbers == [0]


@pytest.mark.parametrize("call", ["hold_writer_lock", "fsync_dir"])
def test_an_overwrite_cut_short_unmakes_only_a_run_it_made(tmp_path, monkeypatch, call):
    """Recorder(path, overwrite=True) where no run was, cut short as it is made. Before, it
    left fresh/run holding a manifest and an empty steps/ (a run of no step), which `record`
    without --force then refused as not empty; now it is unmade as a new run is. Over a run,
    the new manifest stays (the old run's steps are gone already): never another run's."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    path, old = tmp_path / "fresh" / "run", tmp_path / "old"
    with sd.Recorder(old, policy=None) as rec:
        rec.log_step(0, loss=1.0)
    for run in (path, old):
        with monkeypatch.context() as patch:
            patch.setattr(f"stabledrl_cli.dump._setup.{call}", interrupted)
            with pytest.raises(KeyboardInterrupt):
                sd.Recorder(run, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert sorted(os.listdir(old)) == ["manifest.json", "steps"]
    with sd.Recorder(path, policy=None) as rec:
        rec.log_step(0, loss=1.0)
    assert sd.open_run(path).step_numbers == [0]


@pytest.mark.parametrize("call", ["at_child_end", "steps_written_on_sigterm"])
def test_an_async_recorder_cut_short_leaves_no_failing_exit_handler(tmp_path, monkeypatch, call):
    """Before, a Ctrl-C in an async Recorder's making after its exit handler was registered
    and before its SIGTERM one was left a handler that failed at exit: 'Exception ignored in
    atexit callback ... AttributeError: 'Recorder' object has no attribute
    '_cancel_on_sigterm'' (the Recorder kept alive by the uncaught exception's traceback)."""
    registered: list[Callable[[], None]] = []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("stabledrl_cli.dump._recorder_end.atexit.register", registered.append)
    monkeypatch.setattr(f"stabledrl_cli.dump._recorder_end.{call}", interrupted)
    with pytest.raises(KeyboardInterrupt) as cut_short:
        sd.Recorder(tmp_path / "run", async_writes=True)
    assert cut_short.value.__traceback__ is not None  # keeps the half-made Recorder alive
    for handler in registered:
        handler()
    assert not (tmp_path / "run").exists()
