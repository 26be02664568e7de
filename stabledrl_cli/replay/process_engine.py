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
and a `memory://` run, which lives in this process only, is refused. A worker that dies (killed,
out of memory) ends the replay (exit 70, one line naming it); the Ray engine retries its shard.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from urllib.parse import urlsplit

from stabledrl_cli.dump import Run
from stabledrl_cli.errors import UsageError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.shards import (
    check_run,
    check_workers,
    merge_streams,
    shard_tasks,
    stream_shard,
)
from stabledrl_cli.replay.stream import StreamedRun


@dataclass
class ProcessEngine:
    """A replay's streaming pass on `workers` processes of this machine (None: its CPUs)."""

    workers: int | None = None

    def __post_init__(self) -> None:
        check_workers(self.workers)

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
        workers = self.workers or os.cpu_count() or 1
        tasks, sizes = shard_tasks(run, policies, own_index, config, workers)
        context = multiprocessing.get_context("fork" if forks else "spawn")
        parts: dict[int, StreamedRun] = {}
        # The workers are forked before the run's check starts a thread in this process.
        with ProcessPoolExecutor(min(workers, len(tasks)) or 1, mp_context=context) as pool:
            futures = {pool.submit(stream_shard, task): i for i, task in enumerate(tasks)}
            checking = threading.Thread(target=check_run, args=(run,), daemon=True)
            checking.start()
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    parts[i] = future.result()
                    if progress is not None:
                        progress(sizes[i])
            except BrokenProcessPool:
                raise RuntimeError(
                    f"{run.location}: a replay worker process died (killed, or out of memory?); "
                    "replay with fewer --workers or a smaller --memory-budget"
                ) from None
            finally:
                for future in futures:
                    future.cancel()
            checking.join()
        return merge_streams([parts[i] for i in range(len(tasks))], len(policies))
