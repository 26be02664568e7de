"""`--engine processes`: the run's shards computed by worker processes of this machine, joined
into exactly the JSON of a local replay (docs/scaling.md)."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _corpus import bad_seq_id, tiny_run
from typer.testing import CliRunner

from stabledrl_cli.cli.app import app
from stabledrl_cli.dump import open_run
from stabledrl_cli.errors import InputError, WorkerDiedError
from stabledrl_cli.replay import process_engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.process_engine import ProcessEngine
from stabledrl_cli.replay.shards import SHARDS_PER_WORKER, ShardTask, plan_shards, stream_shard
from stabledrl_cli.replay.stream import StreamedRun

runner = CliRunner()


def test_a_replay_on_worker_processes_is_the_local_one_byte_for_byte(grpo_fixture):
    config = ReplayConfig(device="cpu", chunk_size=8)
    local = replay_run(open_run(grpo_fixture), ["grpo", "stabledrl"], config=config)
    steps: list[int] = []
    shared = replay_run(
        open_run(grpo_fixture),
        ["grpo", "stabledrl"],
        config=config,
        engine=ProcessEngine(workers=2),
        progress=steps.append,
    )
    assert shared.to_json() == local.to_json()
    assert sum(steps) == local.steps and len(steps) == 8  # 4 shards a worker, as each ended


def test_a_bad_step_is_skipped_and_named_as_locally(tmp_path):
    run = bad_seq_id(tiny_run(tmp_path / "run", steps=6), 2)
    local = runner.invoke(app, ["replay", str(run), "-f", "json", "--device", "cpu"])
    shared = runner.invoke(
        app,
        ["replay", str(run), "-f", "json", "--device", "cpu", "--engine", "processes",
         "--workers", "2"],
    )  # fmt: skip
    assert shared.exit_code == local.exit_code == 0, shared.stderr
    assert json.loads(shared.stdout) == json.loads(local.stdout)
    assert shared.stderr.replace("\r", "").count("step 2:") == 1


def test_workers_and_engines_are_checked_in_one_line(tmp_path):
    run = tiny_run(tmp_path / "run", steps=3)
    cases = [
        (["--workers", "0", "--engine", "processes"], "error: --workers must be an integer >= 1"),
        # a fork per worker, each holding a replay: bounded as a replay's threads are
        (
            ["--workers", "99999999999999999999", "--engine", "processes"],
            "error: --workers must be an integer in [1, 256], got 99999999999999999999",
        ),
        (["--workers", "2"], "error: --workers needs --engine processes or ray"),
        (
            ["--engine", "processes", "--ray-address", "h:1"],
            "error: --ray-address needs --engine ray",
        ),
    ]
    for options, line in cases:
        if "99999999999999999999" in options:  # a real process: a fork per worker, if allowed
            done = subprocess.run(
                [sys.executable, "-m", "stabledrl_cli", "replay", str(run), *options],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            code, stderr = done.returncode, done.stderr
        else:
            result = runner.invoke(app, ["replay", str(run), *options])
            code, stderr = result.exit_code, result.stderr
        assert code == 2 and stderr.strip() == line, stderr


KILLED_STEP = 45
"""The step whose shard's worker is killed."""


def _killed_on_a_step(task: ShardTask) -> StreamedRun:
    """stream_shard, but the worker computing `KILLED_STEP` is killed as the out-of-memory
    killer kills: SIGKILL."""
    if KILLED_STEP in task.steps:
        os.kill(os.getpid(), signal.SIGKILL)
    return stream_shard(task)


def _exits_on_a_step(task: ShardTask) -> StreamedRun:
    if KILLED_STEP in task.steps:
        os._exit(9)
    return stream_shard(task)


@pytest.mark.parametrize(
    ("worker", "how"),
    [
        (_killed_on_a_step, "was killed by SIGKILL (often the out-of-memory killer)"),
        (_exits_on_a_step, "exited with code 9"),
    ],
)
def test_a_worker_that_dies_ends_the_replay_naming_its_shard_and_signal(
    grpo_fixture, monkeypatch, worker, how
):
    """Not exit 70 and 'a bug': the line says which steps died and how (docs/exit-codes.md)."""
    monkeypatch.setattr(process_engine, "stream_shard", worker)  # forked workers inherit it
    run = open_run(grpo_fixture)
    shards = plan_shards(run.step_numbers, 2 * SHARDS_PER_WORKER)
    (number,) = [i for i, steps in enumerate(shards) if KILLED_STEP in steps]
    steps = shards[number]
    result = runner.invoke(
        app,
        ["replay", str(grpo_fixture), "--device", "cpu", "--engine", "processes", "--workers",
         "2", "--format", "json"],
    )  # fmt: skip
    assert result.exit_code == WorkerDiedError.exit_code == 71, result.output
    assert result.stdout == ""
    (line,) = [x for x in result.stderr.replace("\r", "\n").splitlines() if "error" in x]
    assert line == (
        f"error: {grpo_fixture}: a replay worker process {how} while computing steps "
        f"{steps[0]}-{steps[-1]} (shard {number + 1} of {len(shards)}); replay with fewer "
        "--workers or a lower --memory-budget"
    )


def _fails(task: ShardTask) -> StreamedRun:
    raise InputError(f"step {task.steps[0]}: missing field")


class _Unpicklable(Exception):
    """An error pickle refuses: it holds a lambda."""

    def __init__(self) -> None:
        super().__init__("a bug in a shard")
        self.callback = lambda: None


def _fails_unpicklably(task: ShardTask) -> StreamedRun:
    raise _Unpicklable()


class _Unloadable(Exception):
    """An error that pickles but whose copy cannot be loaded, as botocore's ClientError: its
    __init__ takes other arguments than the message it passes on."""

    def __init__(self, response: str, operation: str) -> None:
        super().__init__(f"An error occurred ({response}) when calling the {operation} operation")


def _fails_unloadably(task: ShardTask) -> StreamedRun:
    raise _Unloadable("NoSuchKey", "GetObject")


@pytest.mark.parametrize(
    ("worker", "error", "message"),
    [
        (_fails, InputError, r"^step \d+: missing field$"),
        # pickle refuses it: it still comes by name, not as a worker that died
        (_fails_unpicklably, RuntimeError, r"^_Unpicklable: a bug in a shard$"),
        # its copy cannot be loaded: before, the replay raised that TypeError ("a bug", 70)
        (
            _fails_unloadably,
            RuntimeError,
            r"^_Unloadable: An error occurred \(NoSuchKey\) when calling the GetObject operation$",
        ),
    ],
)
def test_an_error_of_a_shard_is_raised_as_it_is(grpo_fixture, monkeypatch, worker, error, message):
    monkeypatch.setattr(process_engine, "stream_shard", worker)
    with pytest.raises(error, match=message):
        replay_run(
            open_run(grpo_fixture),
            ["grpo"],
            config=ReplayConfig(device="cpu"),
            engine=ProcessEngine(workers=2),
        )


def test_a_worker_that_dies_between_two_shards_is_named_too(grpo_fixture):
    """Every worker is killed as the first shard's rows arrive: the next shard cannot be sent
    to the worker that computed it (a pipe whose reader died), and that says so, exit 71."""

    def kill_the_workers(steps: int) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
            child.join()

    run = open_run(grpo_fixture)
    shards = plan_shards(run.step_numbers, 2 * SHARDS_PER_WORKER)
    with pytest.raises(WorkerDiedError) as died:
        replay_run(
            run,
            ["grpo"],
            config=ReplayConfig(device="cpu"),
            engine=ProcessEngine(workers=2),
            progress=kill_the_workers,
        )
    assert str(died.value) == (
        f"{grpo_fixture}: a replay worker process was killed by SIGKILL (often the out-of-memory "
        f"killer) before computing steps {shards[2][0]}-{shards[2][-1]} (shard 3 of "
        f"{len(shards)}); replay with fewer --workers or a lower --memory-budget"
    )


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="workers are forked on Linux"
)
def test_the_workers_end_once_the_replay_is_gone():
    """The replay's process killed (SIGKILL, the out-of-memory killer's; SIGTERM): the kernel
    closes its ends of the pipes and each idle worker reads EOF and ends. Before, each forked
    worker held copies of the replay's end of its own pipe (and of the earlier workers'), so
    none ever read EOF: they were left waiting forever, orphaned."""
    workers = process_engine._start(multiprocessing.get_context("fork"), 2, "run")
    for worker in workers:
        worker.conn.close()  # what the replay's death does to its ends
    for worker in workers:
        worker.process.join(timeout=60)  # a guard against the hang only: they end at once
        assert worker.process.exitcode == 0


BUSY_SCRIPT = """
import os, sys, threading
from pathlib import Path
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay import process_engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.process_engine import ProcessEngine


def shard(task):
    (Path(sys.argv[2]) / str(os.getpid())).touch()
    threading.Event().wait()  # a shard that takes long


process_engine.stream_shard = shard
replay_run(open_run(sys.argv[1]), ["grpo"], config=ReplayConfig(device="cpu"),
           engine=ProcessEngine(workers=2))
"""


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's"
)
def test_busy_workers_end_with_a_replay_that_is_killed(grpo_fixture, tmp_path):
    """The replay's process killed while its workers compute (the out-of-memory killer's
    SIGKILL): they end at once. Before, each computed its shard to the end for nobody (here,
    forever) and only then read the EOF."""
    busy = tmp_path / "busy"
    busy.mkdir()
    replay = subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT, str(grpo_fixture), str(busy)])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120  # guards against a hang only
        while len(pids) < 2 and time.monotonic() < deadline and replay.poll() is None:
            time.sleep(0.05)
            pids = [int(path.name) for path in busy.iterdir()]
        assert len(pids) == 2, "the workers never started their shards"
        replay.kill()
        replay.wait()
        deadline = time.monotonic() + 60
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in pids)
    finally:
        replay.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


GRACEFUL_SCRIPT = """
import signal, sys, threading, time
from stabledrl_cli.dump import open_run
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay import process_engine
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import replay_run
from stabledrl_cli.replay.process_engine import ProcessEngine

stopping = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopping.set())  # a training's graceful stop


def shard(task):
    if task.steps[0] == 0:
        raise InputError("step 0: missing field")
    threading.Event().wait()  # a long shard: busy still when the replay stops


serve = process_engine._serve


def slow_to_start(conn, replays_ends, replay):
    if len(replays_ends) > 1:  # the second worker, still starting when the first one fails
        time.sleep(float(sys.argv[2]))
    serve(conn, replays_ends, replay)


process_engine.stream_shard = shard
process_engine._serve = slow_to_start
try:
    replay_run(open_run(sys.argv[1]), ["grpo"], config=ReplayConfig(device="cpu"),
               engine=ProcessEngine(workers=2))
except InputError as exc:
    print(exc)
"""


@pytest.mark.parametrize("start_delay", ["0", "1.5"], ids=["started", "still-starting"])
def test_a_busy_worker_is_stopped_even_under_a_sigterm_handler_of_the_caller(
    grpo_fixture, start_delay
):
    """A process that replays (a training's monitor, say) may handle SIGTERM itself, as a
    graceful stop that sets a flag: its forked workers inherited that handler, so the
    SIGTERM that stops a busy worker once another shard failed was caught and ignored, and
    the replay waited for that worker forever. A worker resets the handler as it starts, but
    one still starting when another's shard fails (a loaded machine: CI saw it) had not yet."""
    done = subprocess.run(
        [sys.executable, "-c", GRACEFUL_SCRIPT, str(grpo_fixture), start_delay],
        capture_output=True, text=True, timeout=60,  # a guard against the hang only
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "step 0: missing field\n"


def test_a_worker_that_cannot_be_started_is_exit_71_and_the_others_stop(tmp_path, monkeypatch):
    """fork refused (out of memory, the process limit): the machine's limits, as for a worker
    killed (exit 71, EX_OSERR: 'cannot fork'), and the worker started before it stops. Before,
    the OSError was 'internal error ... a bug' (exit 70)."""
    run = tiny_run(tmp_path / "run", steps=8)
    start = multiprocessing.context.ForkProcess.start
    started: list[int] = []

    def start_once(self: multiprocessing.context.ForkProcess) -> None:
        if started:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        started.append(1)
        start(self)

    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", start_once)
    result = runner.invoke(
        app,
        ["replay", str(run), "--device", "cpu", "--engine", "processes", "--workers", "2"],
    )
    assert result.exit_code == WorkerDiedError.exit_code == 71, result.output
    assert result.stderr.strip() == (
        f"error: {run}: a replay worker process could not be started (Cannot allocate "
        "memory); replay with fewer --workers or a lower --memory-budget"
    )
    assert multiprocessing.active_children() == []


class _ReplyAfter:
    """The parent's end of a worker's pipe that, once its reply is read, makes another
    worker's reply arrive: replies landing in a set order, whatever the machine's timing."""

    def __init__(self, conn, then) -> None:
        self.conn, self.then = conn, then

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, task) -> None:
        self.conn.send(task)

    def poll(self) -> bool:
        return self.conn.poll()

    def recv(self):
        reply = self.conn.recv()
        self.then()
        return reply


def test_the_error_of_the_first_failing_shard_is_raised_whichever_ends_first():
    """Shards failing at once (a step lacking a field a policy needs, in each): the first reply
    to arrive was raised, so the step named changed from one run of the same command to the
    next (step 20 or step 22 with 2 workers) and differed from the local replay's. The first
    failing shard in step order is raised now, once the shards before it have ended."""
    first_parent, first_child = multiprocessing.Pipe()
    second_parent, second_child = multiprocessing.Pipe()
    pipes = [os.pipe(), os.pipe()]  # no worker process: sentinels that never become ready
    first, second = (type("Process", (), {"sentinel": read})() for read, _ in pipes)

    def first_replies() -> None:
        first_child.send((None, InputError("step 20: missing field"), ""))

    workers = [
        process_engine._Worker(first, first_parent),
        process_engine._Worker(second, _ReplyAfter(second_parent, first_replies)),
    ]
    second_child.send((None, InputError("step 22: missing field"), ""))
    try:
        with pytest.raises(InputError, match=r"^step 20: missing field$"):
            process_engine._compute(workers, ["shard 0", "shard 1"], lambda i: None, "run")
        assert first_child.recv() == "shard 0" and second_child.recv() == "shard 1"
    finally:
        for fd in (fd for pipe in pipes for fd in pipe):
            os.close(fd)
        for conn in (first_parent, first_child, second_parent, second_child):
            conn.close()


@pytest.mark.parametrize(
    ("machine", "usable", "expected"), [(64, {0}, 1), (1000, set(range(1000)), 256)]
)
def test_the_default_workers_are_the_cpus_this_process_may_use(
    tmp_path, monkeypatch, machine, usable, expected
):
    """Without --workers the engine forked a worker per CPU of the machine (os.cpu_count):
    under `taskset -c 0`, a Slurm job's or a container's cpuset, 2 (or 64) replays' memory for
    one CPU; and past 256 CPUs more workers than --workers may ask for. Now a worker per CPU
    this process may use (its affinity), at most 256."""
    run = open_run(tiny_run(tmp_path / "run", steps=2))
    asked: list[int] = []

    def shards(*args: object) -> object:
        asked.append(args[-1])  # type: ignore[arg-type]
        raise InputError("stop here")

    monkeypatch.setattr(os, "cpu_count", lambda: machine)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: usable, raising=False)
    monkeypatch.setattr(process_engine, "shard_tasks", shards)
    with pytest.raises(InputError, match="stop here"):
        replay_run(run, ["grpo"], config=ReplayConfig(device="cpu"), engine=ProcessEngine())
    assert asked == [expected]
