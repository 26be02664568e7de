"""A process of the command that steps an optimizer under the hooks while another records
the run (a worker forked or spawned from it, a child of multiprocessing): its steps are not
recorded, and it is told so, with the ways out."""

from __future__ import annotations

import os

from stabledrl_cli.errors import UsageError

ENV_HOOKS_RECORDER = "STABLEDRL_HOOKS_RECORDER"
"""The pid of the process whose optimizer became the run's under the hooks, set by it at that
optimizer's first step: a process started from it later (forked, spawned, a subprocess)
inherits it and records none of its own optimizer steps (`_step_stats.step_stats`)."""


def child_stepped(started: str, recorded_by: str) -> UsageError:
    """What a process of the command that is not the rank's recording one is told when it
    steps an optimizer under the hooks: `started`, how it came to be; `recorded_by`, who
    records the run."""
    return UsageError(
        f"a child process of the command (pid {os.getpid()}, {started}) stepped an optimizer "
        f"under `stabledrl record`'s optimizer hooks while {recorded_by}: its steps are not "
        "recorded. Record with --no-optimizer-hooks, or have the workers not step optimizers, "
        "or record them as ranks of their own (Recorder(path, world_size=N, rank=R))"
    )


def descendant_stepped(recording_pid: int) -> UsageError:
    """The error of an optimizer step under the hooks in a process started (forked, spawned)
    from `recording_pid`, whose optimizer is the run's (`ENV_HOOKS_RECORDER`)."""
    return child_stepped(
        f"started from pid {recording_pid}", f"pid {recording_pid} records the run's optimizer"
    )


def refuse_child_of_recording(run_dir: str, rank: int) -> None:
    """UsageError when this process is a child of `multiprocessing` (a Pool's worker, say)
    whose optimizer steps under the hooks while another process, the one that started it,
    records the rank: a run takes one process a rank, so the child's steps are not recorded.
    Says so, and the ways out, where the Recorder would only say that another one holds it."""
    import multiprocessing
    from pathlib import Path

    from stabledrl_cli.dump._writer_lock import writer_states

    parent = multiprocessing.parent_process()
    if parent is None or (writer_states(Path(run_dir) / "steps") or {}).get(rank) != "held":
        return
    error = child_stepped(
        f"started by multiprocessing from pid {parent.pid}",
        f"rank {rank} of the run is recorded by another process",
    )
    raise UsageError(f"{run_dir}: {error}")
