"""The child side of `stabledrl record --out DIR -- CMD`: the run that `log_policy_batch`
(`_log_policy_batch`) and the optimizer hooks (`optimizer_hooks`) write together.

`record` exports to the training command:
- STABLEDRL_RUN_DIR: the run directory to write;
- STABLEDRL_FORCE: "1" when --force was given (record into a non-empty directory: replace its
  run, or continue it when the script resumes it, recorder_kwargs resume=True); the process
  that opens the run (here, or by a Recorder of the script's own: `_run_env.forced_run`)
  takes it out of its environment, so that a process it starts later (a spawned worker with
  an optimizer of its own) finds the run and does not replace it;
- STABLEDRL_POLICY: the --policy spec, when given;
- STABLEDRL_STATUS_FILE: a file of `record`'s, where the child reports a recording failure;
- STABLEDRL_RANKS_DIR: a directory of `record`'s, where each process of the command that runs
  as a rank says so (an empty file RANK-of-WORLD_SIZE, written by record's sitecustomize): at
  its start when its launcher set RANK and WORLD_SIZE, else as it opens the run.

Inside the child, the first step to write opens a Recorder on the run directory; it is closed
at interpreter exit, after every exit handler of the script when the sitecustomize runs
(`closed_last`), so that a step one of them logs is recorded; the steps logged before are
written earlier, by an exit handler registered as the hooks are installed and as the run
opens (`_written_at_exit`). In a child process of `multiprocessing` (which ends with os._exit
when forked, running no exit handler), the run is closed as the child's target returns
(`_close_at_child_end`). Under a launcher that sets torch.distributed's RANK and
WORLD_SIZE (torchrun, accelerate, deepspeed), or in a rank that initialized its default
process group itself (torch.multiprocessing.spawn), it records as that rank, each rank writing
its own step files (`recorder_kwargs` may still pass `rank` and `world_size`).

A step comes from `log_policy_batch` (a policy batch), from the optimizer hooks (an optimizer
step's scalars), or from both: the pairing rule is that
`log_policy_batch(n, ...)` and the hooks' optimizer step n (the n-th `step()` of the run's
optimizer, counted from 0; in a run the script resumes, `recorder_kwargs` resume=True, from
the first step it records again) are one step, whichever comes first. The first half is written at
once; the second rewrites the step's file with both halves (a field given by both is taken
from `log_policy_batch`; when that write fails, the step's file is removed: no half-step).
A half whose step number is not the last step's starts a new step.
One exception: the hooks' first step waits for the next event (a batch, the next optimizer
step, or the end of the process) before it opens the run, so that a policy batch logged just
after the first optimizer step still opens it with its policy and recorder_kwargs; a child
forked meanwhile leaves it to its parent (`_forked`); os._exit writes it (`_os_exit`).

Recording must never break training: the first failure is reported once on stderr as a
warning, recording is off from then on (`log_policy_batch` returns False at once, the hooks
are removed), and training goes on.

How the parent learns of a failure, and of a tool error that ended a process of the
command: the status file (`_status`, `_uncaught`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from stabledrl_cli._run_env import ENV_FORCE as ENV_FORCE  # record exports them (module doc)
from stabledrl_cli._run_env import ENV_RANKS_DIR as ENV_RANKS_DIR
from stabledrl_cli._run_env import ENV_RUN_DIR as ENV_RUN_DIR
from stabledrl_cli._run_env import env_force as env_force
from stabledrl_cli._sigterm import WRITE_SECONDS, steps_written_on_sigterm
from stabledrl_cli.capture import _uncaught
from stabledrl_cli.capture._child_processes import refuse_child_of_recording
from stabledrl_cli.capture._process_rank import launcher_rank
from stabledrl_cli.capture._record_out import ENV_OPTIMIZER_HOOKS as ENV_OPTIMIZER_HOOKS
from stabledrl_cli.capture._record_out import records_its_out
from stabledrl_cli.capture._recording import Recording
from stabledrl_cli.capture._run_lock import RunLock
from stabledrl_cli.capture._script_args import refuse_unknown, warn_policies_differ
from stabledrl_cli.capture._step_pairing import Step, refuse_parted, warn_order_turned
from stabledrl_cli.errors import UsageError, WriteError, warn

if TYPE_CHECKING:
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._policy import PolicyLike

ENV_POLICY = "STABLEDRL_POLICY"
NO_POLICY = (
    "no policy to record: pass one to `stabledrl record`, e.g. `--policy grpo`, or to the "
    "first call, e.g. `log_policy_batch(step, policy='grpo', ...)`"
)

recording = Recording()
"""This process's recording of record's run."""

HOOKS_SOURCE = {"kind": "optimizer-hooks"}
"""The manifest's `source` of a run that the optimizer hooks opened."""


BATCH_CONTINUES = "a later one continues it with log_policy_batch's recorder_kwargs resume=True"
HOOKS_CONTINUE_NONE = (
    "the optimizer hooks do not continue a run (log_policy_batch's recorder_kwargs "
    "resume=True does): record a later process with a `stabledrl record --out` of its own"
)
"""How a later process of record's command continues the run an earlier one recorded
(`RunNotEmpty.for_record`), when log_policy_batch opens it, and when the hooks do."""
_closed_at_child_end = False
"""Whether `close` runs as this process's target returns, in a child of multiprocessing."""


def _forked() -> None:
    """In a child forked from this process: the held step is the parent's to write (the child
    would open the run with it at its exit, and the parent then fail to), as are the queued
    steps that `_written_at_exit` writes (the Recorder refuses a child's flush), and the lock
    may have been held by another thread of the parent, which the child does not have."""
    global _closed_at_child_end
    recording.held, recording.lock, _closed_at_child_end = None, RunLock(), False
    atexit.unregister(_written_at_exit)


def _close_at_child_end() -> None:
    """In a child process of multiprocessing that records, the run is closed as the child's
    target returns (`_child_end`): one started by fork or forkserver ends with os._exit, which
    runs no exit handler, and its held and queued steps would be lost. Called by the child's
    first step, before it is held or the run opened."""
    global _closed_at_child_end
    if not _closed_at_child_end:
        from stabledrl_cli._child_end import at_child_end  # (multiprocessing: not at start-up)

        _closed_at_child_end = True
        at_child_end(close)


os.register_at_fork(after_in_child=_forked)


def open_recorder(
    policy: str | PolicyLike | None,
    recorder_kwargs: dict[str, Any],
    *,
    batch: bool,
    hooks: bool,
) -> Recorder:
    """The run's Recorder, opened by the first step to write: a step with a policy `batch`
    needs a policy; one with the `hooks`' half marks the run's source and writes its steps
    from the Recorder's thread (`async_writes`)."""
    if recording.recorder is not None:
        return recording.recorder
    _close_at_child_end()
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        raise UsageError(f"{ENV_RUN_DIR} is not set (run the script under `stabledrl record`)")
    from pathlib import Path

    from stabledrl_cli.dump._setup import RunNotEmpty, refuse_in_the_way

    refuse_in_the_way(Path(run_dir))
    given = os.environ.get(ENV_POLICY) or None
    if policy is not None and given is not None:
        warn_policies_differ(policy, given)
    policy = policy or given
    if policy is None and batch:
        raise UsageError(NO_POLICY)
    from stabledrl_cli.dump import Recorder  # the training script may never log a step
    from stabledrl_cli.dump._writer_lock import holds_in_this_process

    holds_in_this_process(run_dir, records_its_out())
    refuse_unknown(recorder_kwargs, "__init__", "a key of recorder_kwargs")
    recorder_kwargs.setdefault("on_write_error", "warn")  # a full disk never stops training
    for name, value in launcher_rank().items():
        recorder_kwargs.setdefault(name, value)
    if hooks:
        from stabledrl_cli._child_end import in_pool_worker  # (multiprocessing: not at start-up)

        recorder_kwargs.setdefault("source", HOOKS_SOURCE)
        # The training thread never waits for the disk; but a pool's worker, which ends by a
        # SIGTERM, has each step written before step() returns.
        recorder_kwargs.setdefault("async_writes", not in_pool_worker())
    # --force lets the command record into a non-empty directory: the Recorder replaces the
    # run, or continues the one the script resumes (resume=True), and takes the switch.
    recording.opening = True
    try:
        recorder = Recorder(run_dir, policy=policy, **recorder_kwargs)
    except UsageError as exc:
        if hooks:
            refuse_child_of_recording(run_dir, recorder_kwargs.get("rank", 0))
        if isinstance(exc, RunNotEmpty):  # record's words at its --out
            raise exc.advised(BATCH_CONTINUES if batch else HOOKS_CONTINUE_NONE) from None
        raise
    finally:
        recording.opening = False
    recording.recorder = recorder
    if recorder_kwargs.get("resume") and recorder.last_step is not None:
        recording.hooks_start = recorder.last_step + 1
    if _announce_rank is not None:
        _announce_rank(recorder.rank, recorder.world_size)
    if _closed_last:
        recorder.closed_by_caller_at_exit()
        atexit.register(_written_at_exit)
    else:
        atexit.register(close)
    return recorder


def write_step(step: Step, recorder: Recorder, *, replace: bool) -> bool:
    """Logs the step (a rewrite of the last one when `replace`); False when recording is off."""
    if not replace and recording.last is not None:
        refuse_parted(step, recording.last, recorder.resumed_after)
    if step.batch is not None and step.hooks is not None:
        if recording.hooks_first is None:
            recording.hooks_first = step.hooks_first
        elif recording.hooks_first and not step.hooks_first:
            warn_order_turned(step.number)
    recording.last = step
    log = recorder.rewrite_step if replace else recorder.log_step
    log(step.number, **step.fields())
    return not recording.failure.stopped(recorder.stopped, _stopped_at(recorder, step.number))


def _stopped_at(recorder: Recorder, noticed: int | None) -> str:
    """Where recording stopped: at the step whose write failed, which the Recorder knows; else
    at step `noticed` (the one being logged), or at the end of the run (None). A write in the
    background fails unseen until a later step is logged, or the run closes."""
    step = noticed if recorder.stopped_step is None else recorder.stopped_step
    return "recording stopped " + ("at the end of the run" if step is None else f"at step {step}")


def release_held(policy: str | PolicyLike | None, recorder_kwargs: dict[str, Any]) -> None:
    """Writes the held first hook step, if any, opening the run (with `policy`, if any)."""
    held, recording.held = recording.held, None
    if held is not None:
        recorder = open_recorder(policy, recorder_kwargs, batch=held.batch is not None, hooks=True)
        held.number += recording.hooks_start
        write_step(held, recorder, replace=False)


def inside_a_step(call: str) -> bool:
    """Whether this thread is recording a step already: `call` came from a signal handler (or
    a finalizer) that ran in the middle of it, and the lock lets this thread through, but its
    step would be written inside that one (out of order: recording would stop). It is
    refused, one warning line each; recording goes on."""
    if not recording.lock.held_here():
        return False
    warn(
        f"stabledrl: warning: {call} came while this thread was recording another step (a "
        "signal handler's call): not recorded; recording goes on\n"
    )
    return True


def log_hook_step(step: int, fields: dict[str, Any]) -> None:
    """Records the optimizer hooks' step `step` (Recorder.log_step keywords), paired with a
    `log_policy_batch` of the same number (module docstring). Never raises."""
    if not hooks_wanted() or recording.closed or inside_a_step(f"optimizer step {step}"):
        return
    held = None  # the held first step, written (and the run opened) with this one
    try:
        with recording.lock:
            _close_at_child_end()
            if recording.recorder is None and recording.held is None:
                # The Recorder imported now, not when the held step is written at exit: a
                # library imported during the interpreter's exit may crash it (h5py did:
                # SIGSEGV in libhdf5's exit handler). The rank seen now: a spawned rank's
                # process group may be destroyed by then.
                import stabledrl_cli.dump._writer  # noqa: F401

                launcher_rank()
                recording.held = Step(step, hooks=fields)
                return
            held = recording.held
            release_held(None, {})
            held = None
            recorder = open_recorder(None, {}, batch=False, hooks=True)
            step += recording.hooks_start
            if (
                recording.last is not None
                and recording.last.number == step
                and recording.last.hooks is None
            ):
                recording.last.hooks = fields
                write_step(recording.last, recorder, replace=True)
            else:
                write_step(Step(step, hooks=fields), recorder, replace=False)
    except Exception as exc:  # named by the first step it loses: the held one's, if not written
        recording.failure.fail(
            exc, f"recording optimizer step {step if held is None else held.number}"
        )


def integration_records() -> None:
    """An integration (TRL, verl) records this process's steps itself: the optimizer hooks
    stand down here, so that they never write step files beside its own."""
    recording.integration = True


def recorded_into(directory: str | os.PathLike[str]) -> bool:
    """Whether this process recorded steps of record's run (the optimizer hooks' of a warm-up,
    say, or `log_policy_batch`'s; the hooks' first step held included) and that run is
    `directory`: an integration's steps, numbered from 1 again, cannot go beside them."""
    with recording.lock:
        if recording.recorder is not None:
            run = os.fspath(recording.recorder.path)
        elif recording.held is not None:
            run = os.environ.get(ENV_RUN_DIR, "")
        else:
            return False
    return bool(run) and os.path.realpath(run) == os.path.realpath(directory)


def hooks_wanted() -> bool:
    """Whether the optimizer hooks should record in this process."""
    return not recording.failure.off and not recording.integration


def hooks_installed() -> None:
    """Called once the optimizer hooks are in: the held step (if any) is written at exit, by
    os._exit (`_os_exit`), and with the queued steps on a SIGTERM that would end the process
    at once (`_sigterm`: the main thread in the middle of a step finishes it first)."""
    atexit.register(_written_at_exit if _closed_last else close)
    steps_written_on_sigterm(_written_at_exit, lambda then: recording.lock.after_release(then))
    os._exit = _os_exit


_python_os_exit = os._exit


def _os_exit(status: int) -> NoReturn:
    """os._exit under the optimizer hooks: a script that ends so after its first optimizer
    step (no exit handler runs) has the step the hooks hold written first, from a thread of
    its own, for WRITE_SECONDS at most. Written steps are on disk already. A signal handler
    that calls it in a step being recorded holds the recording lock, which its thread never
    gives back: the held step, whole, is written without it (`_written_at_exit`)."""
    if recording.held is not None:
        writing = threading.Thread(
            target=_written_at_exit,
            kwargs={"unlocked": recording.lock.held_here()},
            name="stabledrl-exit",
            daemon=True,
        )
        writing.start()
        writing.join(WRITE_SECONDS)
    _python_os_exit(status)


_announce_rank: Callable[[int, int], None] | None = None
"""How this process tells `record` the rank it records as (`ranks_announced_by`)."""


def ranks_announced_by(announce: Callable[[int, int], None]) -> None:
    """Called by `record`'s sitecustomize, which announces a process's rank at its start when
    its launcher set RANK and WORLD_SIZE: `announce(rank, world_size)` announces the rank the
    process records as when it opens the run, which it may have taken later (its default
    process group, or RANK set by the script)."""
    global _announce_rank
    _announce_rank = announce


_closed_last = False
"""Whether `close` runs from the exit handler that `record`'s sitecustomize registered at
the process's start (`closed_last`), rather than from one registered when the run opens."""


def closed_last() -> None:
    """Called by `record`'s sitecustomize, which closes the run (`close`) from an exit handler
    it registered at the process's start: atexit runs it after every handler registered later,
    so a step that the script's exit handler logs is recorded even when that handler was
    registered before the run opened (it would run after a handler registered then). Without
    the sitecustomize (`python -I`), the run is closed by a handler registered as it opens."""
    global _closed_last
    _closed_last = True


def _written_at_exit(*, unlocked: bool = False) -> None:
    """Under `closed_last`, the exit handler registered as the hooks are installed and as the
    run opens: the held step and every queued one are written, the run left open. An exit
    handler registered before it that ends the process (`os._exit`) or never returns then
    loses no finished step, and one that logs a step still has it recorded (the run is
    closed last). A SIGTERM that ends the process writes its steps with it too. `unlocked`:
    for `_os_exit` in a signal handler of the thread holding the lock, which never goes on;
    nothing is written while that thread was opening the run (`recording.opening`: a second
    Recorder would be refused), nor while it wrote the held step (no longer held: lost)."""
    if recording.failure.off or (unlocked and recording.opening):
        return
    try:
        with contextlib.nullcontext() if unlocked else recording.lock:
            release_held(None, {})
            recorder = recording.recorder
        if recorder is not None:
            recorder.flush()
            recording.failure.stopped(recorder.stopped, _stopped_at(recorder, None))
    except Exception as exc:
        recording.failure.fail(
            WriteError(str(exc)) if isinstance(exc, OSError) else exc, "writing the last steps"
        )


def hook_failed(exc: BaseException, context: str) -> None:
    """The optimizer hooks failed: warn once, recording off (RecordingFailure)."""
    recording.failure.fail(exc, context)


def close() -> None:
    """Write a held step, close the Recorder (registered with atexit; safe to call twice). A
    close that a Ctrl-C cuts short while the Recorder's queue drains is finished before the
    KeyboardInterrupt goes on: at exit under `record` nothing closes the run after this
    (`closed_last`), and the steps still queued would be lost."""
    if not recording.failure.off:
        try:
            with recording.lock:
                release_held(None, {})
        except Exception as exc:
            recording.failure.fail(exc, "recording the last optimizer step")
    with recording.lock:
        recorder, recording.recorder, recording.closed = recording.recorder, None, True
    if recorder is not None:
        if _uncaught.interrupted is not None:  # after the held step: it is whole, and recorded
            recorder.note_interrupted(_uncaught.interrupted)
        try:
            try:
                recorder.close()
            except KeyboardInterrupt:
                recorder.close()  # (the Recorder finishes an interrupted close)
                raise
            recording.failure.stopped(recorder.stopped, _stopped_at(recorder, None))
        except Exception as exc:
            recording.failure.fail(
                WriteError(str(exc)) if isinstance(exc, OSError) else exc, "closing the run"
            )
