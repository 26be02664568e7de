"""A replay's streaming pass on worker processes of this machine (`--engine processes`).

The Ray engine's shards without a cluster: the run's steps are cut into contiguous shards
(`shards.shard_tasks`), each computed by a worker process forked from this one
(`shards.stream_shard`: it opens the run, reads its own steps, one torch thread), and their
per-step rows are joined in step order (`shards.merge_streams`), so the result is a local
replay's, byte for byte. Unlike the threads of one process (`--threads`), whose Python code
between tensor operations takes turns on the interpreter's lock, the workers share nothing
but the run's files.

Workers are forked where the platform forks (Linux), so they start at once with this process's
imports and read a `memory://` run too; elsewhere they are spawned (each imports torch first),
and a `memory://` run, which lives in this process only, is refused. Each worker is sent one
shard at a time on a pipe of its own, so a worker that dies (killed: SIGKILL is often the
out-of-memory killer) is known with its shard and its signal: the replay ends with one line
naming both (`WorkerDiedError`, exit 71); the Ray engine retries such a shard instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from urllib.parse import urlsplit

from stabledrl_cli._process import how_it_ended, usable_cpus
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import UsageError, WorkerDiedError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.config import MAX_THREADS, ReplayConfig, check_workers
from stabledrl_cli.replay.shards import (
    WORKER_ADVICE,
    ShardTask,
    merge_streams,
    shard_named,
    shard_tasks,
    stream_shard,
)
from stabledrl_cli.replay.stream import StreamedRun

Reply = tuple[StreamedRun | None, Exception | None, str]
"""A worker's answer to a shard: its rows, or the error it raised and that error's traceback."""


class _RemoteTraceback(Exception):
    """The traceback of an error raised in a worker, shown under it by `--debug`."""

    def __str__(self) -> str:
        return str(self.args[0])


def _sendable(error: Exception) -> Exception:
    """`error`, or a RuntimeError of its name and message when pickle cannot carry it to the
    replay: it refuses the error (a lambda in it), or its copy cannot be loaded there (an
    `__init__` of other arguments than the message, as botocore's ClientError)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


PR_SET_PDEATHSIG = 1
"""prctl(2)'s option: the signal the kernel sends this process when its parent dies."""


def _ended_with_the_replay(replay: int) -> None:
    """On Linux, a SIGTERM to this worker from the kernel as soon as the replay's process
    (`replay`, its pid) dies, however it died: a busy worker stops at once instead of
    computing its shard to the end for nobody. Elsewhere nothing: it ends at its next read."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # no libc to ask: the EOF still ends it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != replay:  # the replay died before the request took effect
        os._exit(0)


def _serve(conn: Connection, replays_ends: Sequence[Connection], replay: int) -> None:
    """A worker: computes each shard sent on `conn` and sends back its `Reply`, until it is sent
    None or the replay's end of the pipe closes. Ctrl-C is the replay's to handle: it stops the
    workers; SIGTERM ends it, whatever handler the replay's process had (a forked worker
    inherits it), as the kernel stops it with SIGTERM once the replay dies. A forked worker
    first closes its copies of the replay's ends (`replays_ends`), so that it reads EOF once
    the replay is gone, however it ended (SIGKILL too)."""
    for end in replays_ends:
        end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _ended_with_the_replay(replay)
    try:
        while (task := conn.recv()) is not None:
            try:
                reply: Reply = (stream_shard(task), None, "")
            except Exception as exc:
                reply = (None, _sendable(exc), traceback.format_exc())
            conn.send(reply)
    except (EOFError, BrokenPipeError):  # the replay is gone
        return


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    shard: int | None = None
    """The shard it computes, None when idle."""


def _start(context: BaseContext, count: int, location: str) -> list[_Worker]:
    """`count` worker processes, each with its end of a pipe. A forked one also gets the
    replay's ends it inherits, its own and the earlier workers', to close: while one is open
    in a worker, that worker or another would never read EOF, and outlive the replay. One
    that the system refuses to start (fork: out of memory, the process limit) stops those
    started and raises WorkerDiedError, as the machine's limits do to a running one."""
    workers: list[_Worker] = []
    forks = context.get_start_method() == "fork"
    try:
        for _ in range(count):
            conn, child = context.Pipe()
            inherited = [*(worker.conn for worker in workers), conn] if forks else []
            worker_args = (child, inherited, os.getpid())
            process = context.Process(target=_serve, args=worker_args, daemon=True)  # type: ignore[attr-defined]
            process.start()
            child.close()  # the worker's end is the worker's alone: it reads EOF once that dies
            workers.append(_Worker(process, conn))
    except OSError as exc:
        _stop(workers)
        raise WorkerDiedError(
            f"{location}: a replay worker process could not be started "
            f"({exc.strerror or exc}); {WORKER_ADVICE}"
        ) from None
    return workers


def _stop(workers: Sequence[_Worker]) -> None:
    """Idle workers are told to end, busy ones (the replay stopped early) killed: their rows
    are nobody's now, and SIGKILL, unlike SIGTERM, no handler catches, not even the replay's
    own that a worker still starting has inherited and not yet reset."""
    for worker in workers:
        if worker.shard is None:
            try:
                worker.conn.send(None)
            except OSError:
                worker.process.kill()
        else:
            worker.process.kill()
    for worker in workers:
        worker.process.join()
        worker.conn.close()


def _reply(worker: _Worker) -> Reply | None:
    """The worker's reply, or None when it died without one (or in the middle of sending it)."""
    if not worker.conn.poll():
        return None
    try:
        reply: Reply = worker.conn.recv()
    except (EOFError, OSError):
        return None
    return reply


def _death(worker: _Worker, when: str, location: str) -> WorkerDiedError:
    """The one-line error of a worker that died `when` (`while computing` and a shard's
    `shard_named`)."""
    worker.process.join()
    code = worker.process.exitcode
    how = how_it_ended(code if code is not None else 0)
    return WorkerDiedError(f"{location}: a replay worker process {how} {when}; {WORKER_ADVICE}")


def _compute(
    workers: Sequence[_Worker],
    tasks: Sequence[ShardTask],
    on_shard: Callable[[int], None],
    location: str,
) -> dict[int, StreamedRun]:
    """Every task's rows, by task index, a shard at a time on each worker; `on_shard(i)` as
    shard i ends. A worker's error is raised here: once a shard fails no shard is begun, those
    begun before it are waited for (the later ones are left to `_stop`), and the first failing
    shard's error in step order is raised, as a local replay raises its first (not the first
    to arrive); a worker that died raises WorkerDiedError."""
    queue: Iterator[int] = iter(range(len(tasks)))
    parts: dict[int, StreamedRun] = {}
    failed: dict[int, tuple[Exception, str]] = {}

    def assign(worker: _Worker) -> None:
        i = worker.shard = None if failed else next(queue, None)
        if i is not None:
            try:
                worker.conn.send(tasks[i])
            except OSError:  # it died idle
                shard = shard_named(tasks[i], i, len(tasks))
                raise _death(worker, f"before computing {shard}", location) from None

    def before_a_failure(worker: _Worker) -> bool:
        return worker.shard is not None and worker.shard < min(failed, default=len(tasks))

    for worker in workers:
        assign(worker)
    while busy := [worker for worker in workers if before_a_failure(worker)]:
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
        for worker in busy:
            ready_now = worker.conn in ready or worker.process.sentinel in ready
            if not ready_now or not before_a_failure(worker):  # (a shard failed in this pass)
                continue
            i = worker.shard
            assert i is not None  # busy
            reply = _reply(worker)
            if reply is None:
                shard = shard_named(tasks[i], i, len(tasks))
                raise _death(worker, f"while computing {shard}", location)
            rows, error, trace = reply
            if error is not None:
                failed[i] = (error, trace)
            else:
                assert rows is not None  # no error
                parts[i] = rows
                on_shard(i)
            assign(worker)
    if failed:
        error, trace = failed[min(failed)]
        raise error from _RemoteTraceback(trace)
    return parts


@dataclass
class ProcessEngine:
    """A replay's streaming pass on `workers` processes of this machine (None: a worker per
    CPU this process may use, `usable_cpus`; at most `MAX_THREADS`, as a replay's threads: each
    process forked holds a replay's memory)."""

    workers: int | None = None

    def __post_init__(self) -> None:
        check_workers(self.workers, MAX_THREADS)

    def stream(
        self,
        run: Run,
        policies: list[Policy],
        own_index: int | None,
        config: ReplayConfig,
        progress: Callable[[int], None] | None,
    ) -> StreamedRun:
        """Every policy over every readable step of `run`, shard by shard on the workers."""
        forks = "fork" in multiprocessing.get_all_start_methods()
        if not forks and urlsplit(run.source).scheme == "memory":
            raise UsageError(
                f"{run.location}: a memory:// run lives in this process only, and this platform "
                "cannot fork its workers: replay it with the local engine"
            )
        workers = self.workers or min(usable_cpus(), MAX_THREADS)
        tasks, sizes = shard_tasks(run, policies, own_index, config, workers)
        context = multiprocessing.get_context("fork" if forks else "spawn")

        def on_shard(i: int) -> None:
            if progress is not None:
                progress(sizes[i])

        pool = _start(context, min(workers, len(tasks)), run.location)
        try:
            parts = _compute(pool, tasks, on_shard, run.location)
        finally:
            _stop(pool)
        return merge_streams(run, [parts.pop(i) for i in range(len(tasks))], len(policies))
