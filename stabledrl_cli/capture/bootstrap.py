"""The child side of `stabledrl record --out DIR -- CMD`: `log_policy_batch`, and the run that
it and the optimizer hooks (`optimizer_hooks`) write together.

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

How the parent learns of a failure: `report_failure` appends one line `CODE<TAB>MESSAGE` to
the status file (CODE is the exit code the failure maps to: 2 for a usage error such as a
missing policy or arrays log_step refuses, 3 for unreadable input or an exception that is not
the tool's, 4 for a run that could not be written). After the command exits, `record` reads
that file (`read_status`): a reported failure, or a command that wrote no step file, makes it
exit non-zero with the reason, unless the command's own non-zero exit code wins.

A tool error that ends the command: a stabledrl error (UsageError, InputError, WriteError)
that a process of the command does not catch, say an integration refusing a configuration,
is bad input, not a bug of the script. The sitecustomize's audit hook, which sees every
uncaught exception whatever sys.excepthook the script set (`rich.traceback.install()`), hands
it to `uncaught_error`, which prints it as one line `error: ...` (`rank R: ` first in a multi-rank
run; the traceback instead under STABLEDRL_DEBUG=1, which `record --debug` sets) and appends
`E<CODE><TAB>MESSAGE` to the status file. The process still exits 1, as after any uncaught
exception; `record` then exits with CODE. torchrun's own ChildFailedError, raised when such a
rank failed, is silenced the same way (the ranks said why). Every other exception keeps its
traceback. A framework that catches the error, prints its own report and calls `sys.exit(1)`
in its except block (hydra's `@hydra.main`) ends the process the same way: the sitecustomize's
`sys.exit` raises `reported_exit`'s SystemExit, which hands the error to `uncaught_error`
when the interpreter ends the process with it (the framework's report stays, before the line).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli._run_env import ENV_FORCE as ENV_FORCE  # record exports them (module doc)
from stabledrl_cli._run_env import ENV_RANKS_DIR as ENV_RANKS_DIR
from stabledrl_cli._run_env import ENV_RUN_DIR as ENV_RUN_DIR
from stabledrl_cli._run_env import env_force as env_force
from stabledrl_cli._run_env import records_out
from stabledrl_cli._sigterm import WRITE_SECONDS, steps_written_on_sigterm
from stabledrl_cli.errors import (
    InputError,
    StabledrlError,
    UsageError,
    WriteError,
    task_cause,
    warn,
)

if TYPE_CHECKING:
    from stabledrl_cli.dump import Recorder
    from stabledrl_cli.dump._policy import PolicyLike

ENV_POLICY = "STABLEDRL_POLICY"
ENV_STATUS_FILE = "STABLEDRL_STATUS_FILE"
ENV_TORCH_RANK = "RANK"
ENV_TORCH_WORLD_SIZE = "WORLD_SIZE"
ENV_DEBUG = "STABLEDRL_DEBUG"
ENV_OPTIMIZER_HOOKS = "STABLEDRL_OPTIMIZER_HOOKS"
""""0": the sitecustomize installs no optimizer hooks (`record --no-optimizer-hooks`)."""
ENV_HOOKS_RECORDER = "STABLEDRL_HOOKS_RECORDER"
"""The pid of the process whose optimizer became the run's under the hooks, set by it at that
optimizer's first step: a process started from it later (forked, spawned, a subprocess)
inherits it and records none of its own optimizer steps (`optimizer_hooks._step_stats`)."""
FATAL = "E"
"""Marks a status line of a tool error that ended a process of the command (module docstring)."""
_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"

NO_POLICY = (
    "no policy to record: pass one to `stabledrl record`, e.g. `--policy grpo`, or to the "
    "first call, e.g. `log_policy_batch(step, policy='grpo', ...)`"
)

_lock = threading.Lock()
_recorder: Recorder | None = None
_interrupted: BaseException | None = None
"""The first exception that went uncaught in this process (Ctrl-C, an error): it ends, and
`close` notes in the run how its training was cut short (`Recorder.note_interrupted`)."""


def report_failure(code: int, message: str, *, fatal: bool = False) -> None:
    """Tell the parent `record` that recording failed, or (`fatal`) that a tool error ended a
    process of the command (a no-op outside `record -- CMD`)."""
    path = os.environ.get(ENV_STATUS_FILE)
    if not path:
        return
    line = f"{FATAL if fatal else ''}{code}\t{' '.join(message.split())}\n"
    try:  # a lone surrogate (a name from a non-UTF-8 file name) is written escaped
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as status:
            status.write(line)
    except OSError as exc:
        warn(f"stabledrl: warning: cannot report to {path}: {exc}\n")


class RecordingFailure:
    """Recording must never break the training it observes: the first failure of a recording
    is reported once, as a warning on stderr and to the parent `stabledrl record`
    (`report_failure`); from then on recording is off and training goes on. `log_policy_batch`,
    the TRL integration and the verl integration all report through one of these."""

    def __init__(self) -> None:
        self.off = False

    def fail(self, exc: BaseException, context: str) -> str | None:
        """Warns once and tells `stabledrl record`; recording is off from now on. A tool
        error keeps its exit code; anything else the Recorder could not take is bad input.
        -> the message reported, None when recording was off already."""
        if self.off:
            return None
        self.off = True
        if isinstance(exc, StabledrlError):
            code, reason = exc.exit_code, str(exc)
        else:
            code, reason = InputError.exit_code, f"{type(exc).__name__}: {exc}"
        message = f"{context}: {reason}"
        warn(f"stabledrl: warning: {message}; recording is off, training continues\n")
        report_failure(code, message)
        return message

    def stopped(self, reason: str | None, context: str) -> bool:
        """After a `log_step`: when the Recorder stopped itself (`on_write_error="warn"`: it
        has warned already and noted it in the manifest), recording is off and `stabledrl
        record` is told, with no second warning. -> whether recording is off."""
        if reason is not None and not self.off:
            self.off = True
            report_failure(WriteError.exit_code, f"{context}: {reason}")
        return self.off


_failure = RecordingFailure()


STATUS_LIMIT = 1 << 20
"""Characters of the status file `read_status` reads: its lines, one a failing process, take
far less."""


def _exit_code(text: str) -> int | None:
    """The exit code (1 to 255) that `text` spells in ASCII digits, else None."""
    if not (text.isascii() and text.isdigit() and len(text) <= 3):
        return None
    return int(text) if 0 < int(text) < 256 else None


def read_status(path: str | os.PathLike[str]) -> tuple[list[tuple[int, str]], list[int]]:
    """The status file `report_failure` writes: the (exit code, reason) of each recording
    failure, and the exit code of each tool error that ended a process of the command. The
    command may write to the file too: a line that is not of that form is left out, and
    nothing past STATUS_LIMIT is read. OSError when the file cannot be read or is no regular
    file (a FIFO put in its place is never waited on)."""
    failures, fatal = [], []
    try:
        handle, _ = open_regular(path)  # a FIFO with no writer: no wait
    except NotRegularFile:
        raise OSError(errno.EINVAL, "not a regular file") from None
    with io.TextIOWrapper(handle, encoding="utf-8", errors="replace") as status:
        text = status.read(STATUS_LIMIT)
    for line in text.splitlines():
        mark, _, reason = line.partition("\t")
        code = _exit_code(mark[len(FATAL) :] if mark.startswith(FATAL) else mark)
        if code is not None and mark.startswith(FATAL):
            fatal.append(code)
        elif code is not None and reason:
            failures.append((code, reason))
    return failures, fatal


def _reported_fatal(path: str) -> bool:
    """Whether a process of the command reported a tool error that ended it."""
    try:
        return bool(read_status(path)[1])
    except OSError:
        return False


def uncaught_error(exc: BaseException) -> bool:
    """The sitecustomize audit hook's part under `record -- CMD` (module docstring): a
    stabledrl error is reported and, unless STABLEDRL_DEBUG is set, printed as one line;
    torchrun's failure after such a rank is silenced. -> whether sys.excepthook (the
    traceback) is to be skipped."""
    global _interrupted
    path = os.environ.get(ENV_STATUS_FILE)
    if not path:
        return False
    _interrupted = exc if _interrupted is None else _interrupted
    debug = os.environ.get(ENV_DEBUG, "") not in ("", "0")
    if isinstance(exc, StabledrlError):
        exc = task_cause(exc) or exc
        message = " ".join(str(exc).split())
        report_failure(exc.exit_code, message, fatal=True)
        if debug:
            return False
        warn(f"error: {rank_prefix()}{message}\n")
        return True
    kind = type(exc)
    child_failed = f"{kind.__module__}.{kind.__qualname__}" == _CHILD_FAILED
    return child_failed and not debug and _reported_fatal(path)


def _tool_error(handled: BaseException) -> StabledrlError | None:
    """The stabledrl error that `handled` is, or that is its direct cause (`raise X from
    error`, as far down as such causes go), else None. An exception raised while handling
    one (its `__context__` alone) is a failure of its own, not the tool's error."""
    seen: set[int] = set()
    exc: BaseException | None = handled
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StabledrlError):
            return task_cause(exc) or exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


_SYSTEM_EXIT_CODE: Any = SystemExit.__dict__["code"]
"""SystemExit's own `code` attribute (a member descriptor), which `_ReportedExit` wraps."""


class _ReportedExit(SystemExit):
    """The SystemExit of `sys.exit(1)` called while a stabledrl error was being handled
    (`reported_exit`): the interpreter reads its `code` when it ends the process with it,
    with no Python frame left on the stack; the error is then reported as uncaught
    (`uncaught_error`). A read from Python code (a script that caught it) reports nothing."""

    def __init__(self, status: object, error: StabledrlError) -> None:
        super().__init__(status)
        self.error = error
        self._reported = False

    @property  # type: ignore[override]
    def code(self) -> object:
        if not self._reported:
            try:
                sys._getframe(1)  # the caller is Python code: the exit was caught
            except ValueError:  # the interpreter itself, ending the process
                self._reported = True
                with contextlib.suppress(Exception):  # never stand in the way of the exit
                    uncaught_error(self.error)
        return _SYSTEM_EXIT_CODE.__get__(self)

    @code.setter
    def code(self, value: object) -> None:
        _SYSTEM_EXIT_CODE.__set__(self, value)

    def __reduce__(self) -> tuple[type[SystemExit], tuple[Any, ...]]:
        """A copy (pickled to another process, say) is Python's own SystemExit: the report
        is this process's end."""
        return SystemExit, self.args


def reported_exit(handled: BaseException, status: object) -> SystemExit | None:
    """The sitecustomize's sys.exit under `record -- CMD` (module docstring): when `status`
    ends the process with 1 while `handled`, the exception being handled, is a stabledrl
    error (`_tool_error`), the SystemExit to raise in place of Python's, which reports that
    error when the process ends with it; else None (Python's own sys.exit). Also None in any
    thread but the main one: a SystemExit there ends that thread alone, and threading ignores
    it silently only when its type is SystemExit itself."""
    if not os.environ.get(ENV_STATUS_FILE) or not (isinstance(status, int) and status == 1):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    error = _tool_error(handled)
    return _ReportedExit(status, error) if error is not None else None


HOOKS_SOURCE = {"kind": "optimizer-hooks"}
"""The manifest's `source` of a run that the optimizer hooks opened."""


def rank_prefix() -> str:
    """`rank R: ` for a line on stderr of one rank of a run of several (torchrun's RANK and
    WORLD_SIZE), which tells the ranks' lines apart; else ''."""
    world_size = os.environ.get(ENV_TORCH_WORLD_SIZE, "1")
    return f"rank {os.environ.get(ENV_TORCH_RANK)}: " if world_size not in ("", "1") else ""


def _launcher_rank() -> dict[str, int]:
    """{"rank", "world_size"} from torch.distributed's RANK and WORLD_SIZE (set by torchrun),
    else from the default process group this process initialized (ranks that
    torch.multiprocessing.spawn started, which gave init_process_group their rank
    themselves), else {} (one process). A value that is not an integer is a UsageError."""
    rank, world_size = os.environ.get(ENV_TORCH_RANK), os.environ.get(ENV_TORCH_WORLD_SIZE)
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")  # (never imported here)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
        return {}
    try:
        return {"rank": int(rank), "world_size": int(world_size)}
    except ValueError:
        raise UsageError(
            f"{ENV_TORCH_RANK}={rank!r} and {ENV_TORCH_WORLD_SIZE}={world_size!r} must be integers"
        ) from None


@dataclass
class _Step:
    """A step being written: its number and its two halves (Recorder.log_step keywords)."""

    number: Any
    batch: dict[str, Any] | None = None
    hooks: dict[str, Any] | None = None
    hooks_first: bool = field(init=False)
    """Whether the optimizer's half came first (the step was made with it)."""

    def __post_init__(self) -> None:
        self.hooks_first = self.hooks is not None

    def fields(self) -> dict[str, Any]:
        """Both halves as one set of log_step keywords; the batch's win, scalars merged: a
        scalar the batch gives in `scalars` (step_time, say) that the hooks give as a keyword
        is the batch's alone (log_step refuses one given both ways)."""
        hooks, batch = dict(self.hooks or {}), dict(self.batch or {})
        batch_scalars = dict(batch.pop("scalars", None) or {})
        scalars = {**(hooks.pop("scalars", None) or {}), **batch_scalars}
        merged = {name: v for name, v in hooks.items() if name not in batch_scalars}
        merged.update(batch)
        if scalars:
            merged["scalars"] = scalars
        return merged


_last: _Step | None = None
"""The last step written (its halves are kept until the next step starts)."""
_hooks_first: bool | None = None
"""Whether the loop's optimizer step comes before its batch: the order of the first step
that paired both halves (None until one has)."""
_held: _Step | None = None
"""The hooks' first step, waiting for the next event to open the run (module docstring)."""
_integration = False
"""Whether an integration records this process (`integration_records`)."""
_hooks_start = 0
"""The run's step of the hooks' optimizer step 0: in a run the script resumes, the first step
it records again (or appends)."""
_closed = False
"""Whether `close` ran: a step logged after it (a daemon thread's, still training as the
process exits) is left out, where it opened the run again, which the closing Recorder (or the
run it closed) refused: a recording failure after a training that ended well."""


_closed_at_child_end = False
"""Whether `close` runs as this process's target returns, in a child of multiprocessing."""


def _forked() -> None:
    """In a child forked from this process: the held step is the parent's to write (the child
    would open the run with it at its exit, and the parent then fail to), as are the queued
    steps that `_written_at_exit` writes (the Recorder refuses a child's flush), and the lock
    may have been held by another thread of the parent, which the child does not have."""
    global _held, _lock, _closed_at_child_end
    _held, _lock, _closed_at_child_end = None, threading.Lock(), False
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


def _records_its_out() -> str:
    """What a Recorder of record's --out refused in this process is told
    (`holds_in_this_process`): record's own Recorder holds it, and how to record with one's
    own instead."""
    if os.environ.get(ENV_OPTIMIZER_HOOKS) == "0":
        how = "log_policy_batch; a script that opens a Recorder of its own there calls none"
    else:
        how = (
            "its optimizer hooks; a script that opens a Recorder of its own there runs under "
            "`stabledrl record --no-optimizer-hooks`"
        )
    return f"`stabledrl record` records its --out with {how}"


def _child_stepped(started: str, recorded_by: str) -> UsageError:
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
    return _child_stepped(
        f"started from pid {recording_pid}", f"pid {recording_pid} records the run's optimizer"
    )


def _refuse_child_of_recording(run_dir: str, rank: int) -> None:
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
    error = _child_stepped(
        f"started by multiprocessing from pid {parent.pid}",
        f"rank {rank} of the run is recorded by another process",
    )
    raise UsageError(f"{run_dir}: {error}")


def _open(
    policy: str | PolicyLike | None,
    recorder_kwargs: dict[str, Any],
    *,
    batch: bool,
    hooks: bool,
) -> Recorder:
    """The run's Recorder, opened by the first step to write: a step with a policy `batch`
    needs a policy; one with the `hooks`' half marks the run's source and writes its steps
    from the Recorder's thread (`async_writes`)."""
    global _recorder, _hooks_start
    if _recorder is not None:
        return _recorder
    _close_at_child_end()
    run_dir = os.environ.get(ENV_RUN_DIR)
    if not run_dir:
        raise UsageError(f"{ENV_RUN_DIR} is not set (run the script under `stabledrl record`)")
    from pathlib import Path

    from stabledrl_cli.dump._setup import RunNotEmpty, refuse_in_the_way

    refuse_in_the_way(Path(run_dir))
    given = os.environ.get(ENV_POLICY) or None
    if policy is not None and given is not None:
        _warn_policies_differ(policy, given)
    policy = policy or given
    if policy is None and batch:
        raise UsageError(NO_POLICY)
    from stabledrl_cli.dump import Recorder  # the training script may never log a step
    from stabledrl_cli.dump._writer_lock import holds_in_this_process

    holds_in_this_process(run_dir, _records_its_out())
    _refuse_unknown(recorder_kwargs, "__init__", "a key of recorder_kwargs")
    recorder_kwargs.setdefault("on_write_error", "warn")  # a full disk never stops training
    for name, value in _launcher_rank().items():
        recorder_kwargs.setdefault(name, value)
    if hooks:
        from stabledrl_cli._child_end import in_pool_worker  # (multiprocessing: not at start-up)

        recorder_kwargs.setdefault("source", HOOKS_SOURCE)
        # The training thread never waits for the disk; but a pool's worker, which ends by a
        # SIGTERM, has each step written before step() returns.
        recorder_kwargs.setdefault("async_writes", not in_pool_worker())
    # --force lets the command record into a non-empty directory: the Recorder replaces the
    # run, or continues the one the script resumes (resume=True), and takes the switch.
    try:
        _recorder = Recorder(run_dir, policy=policy, **recorder_kwargs)
    except UsageError as exc:
        if hooks:
            _refuse_child_of_recording(run_dir, recorder_kwargs.get("rank", 0))
        if isinstance(exc, RunNotEmpty) and records_out(run_dir):
            raise exc.for_record() from None  # the user typed a command: name record's --force
        raise
    if recorder_kwargs.get("resume") and _recorder.last_step is not None:
        _hooks_start = _recorder.last_step + 1
    if _announce_rank is not None:
        _announce_rank(_recorder.rank, _recorder.world_size)
    if _closed_last:
        _recorder.closed_by_caller_at_exit()
        atexit.register(_written_at_exit)
    else:
        atexit.register(close)
    return _recorder


RECORD_SETS = ("path", "policy", "overwrite")
"""The Recorder's arguments that `record` gives it itself: the run directory (--out), the
policy (log_policy_batch's `policy`, else --policy) and overwrite (--force)."""


def _refuse_unknown(given: Iterable[str], method: str, what: str) -> None:
    """UsageError naming the first of `given` that is no keyword of `Recorder.<method>` a
    script may pass (a misspelt field: `logpp=`), with the name it resembles if any."""
    import difflib
    import inspect

    from stabledrl_cli.dump._writer import Recorder

    parameters = inspect.signature(getattr(Recorder, method)).parameters
    taken = [n for n in parameters if n not in ("self", "step", *RECORD_SETS)]
    unknown = sorted(set(given).difference(taken))
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, taken, n=1)
    if name in RECORD_SETS:
        hint = "record sets it: --out, log_policy_batch's policy or --policy, --force"
    elif close:
        hint = f"did you mean {close[0]!r}?"
    else:
        hint = f"one of: {', '.join(taken)}"
    raise UsageError(f"{name!r} is not {what} ({hint})")


def _write(step: _Step, recorder: Recorder, *, replace: bool) -> bool:
    """Logs the step (a rewrite of the last one when `replace`); False when recording is off."""
    global _last, _hooks_first
    if not replace and _last is not None:
        _refuse_parted(step, _last, recorder.resumed_after)
    if step.batch is not None and step.hooks is not None:
        if _hooks_first is None:
            _hooks_first = step.hooks_first
        elif _hooks_first and not step.hooks_first:
            _warn_order_turned(step.number)
    _last = step
    log = recorder.rewrite_step if replace else recorder.log_step
    log(step.number, **step.fields())
    return not _failure.stopped(recorder.stopped, _stopped_at(recorder, step.number))


_NUMBERED_BY_STEPS = (
    "under the optimizer hooks, a batch's number is its optimizer step's (the run optimizer's "
    "step() calls, from 0): number the batches so, or record with --no-optimizer-hooks"
)


_warned_order = False


def _warn_policies_differ(scripts: str | PolicyLike, given: str) -> None:
    """Warns when the script's `log_policy_batch(policy=...)` names another policy than
    `record --policy` (`$STABLEDRL_POLICY`): the script's is recorded. Specs that do not
    resolve are left to the Recorder's refusal."""
    from stabledrl_cli.policies import resolve_spec

    ours = scripts if isinstance(scripts, str) else scripts.spec
    try:
        (entry, config), (other, other_config) = resolve_spec(ours), resolve_spec(given)
    except UsageError:
        return
    if (entry.name, config) != (other.name, other_config):
        warn(
            f"stabledrl: warning: log_policy_batch(policy=...) names {ours}, record --policy "
            f"{given}: the run records the script's, {ours}\n"
        )


def _warn_order_turned(number: Any) -> None:
    """Warns once that step `number` paired its batch before its optimizer step, where the
    loop's first step paired it after: what a loop that logs after the step and skipped one
    shows (each later batch then pairs with the next iteration's step), or one that changed
    its order."""
    global _warned_order
    if _warned_order:
        return
    _warned_order = True
    warn(
        f"stabledrl: warning: log_policy_batch({number}) came before its optimizer step, where "
        "the loop's first batch came after its own: if the loop skipped an optimizer.step() "
        "(an inf gradient, without a GradScaler), each batch from there on is recorded with "
        f"the next iteration's optimizer step; {_NUMBERED_BY_STEPS}\n"
    )


_first_batch_logged = False
"""Whether log_policy_batch was called (`_warn_numbered_from_1` looks at the first batch)."""


def _warn_numbered_from_1(number: int) -> None:
    """Warns when the run's first batch, `number`, which pairs with no optimizer step yet,
    comes right after the optimizer step before it, which had no batch: what a loop shows
    whose batches are numbered from 1 (a global_step counted after the update) and logged
    after the step (each batch then pairs with the next iteration's optimizer step), or one
    that logs its first batch at step 1, before its step."""
    if _last is None or _last.batch is not None or _last.number != number - 1:
        return
    warn(
        f"stabledrl: warning: the loop's first batch, log_policy_batch({number}), came after "
        f"optimizer step {number - 1}, which had none: a loop that numbers its batches from 1 "
        "(a global_step counted after the update) has each batch recorded with the next "
        f"iteration's optimizer step; {_NUMBERED_BY_STEPS}\n"
    )


def _refuse_parted(step: _Step, last: _Step, resumed_after: int | None) -> None:
    """UsageError when `step`, one half alone, does not follow `last`, the run's last step,
    which holds only the other half: the loop's batch numbers and its optimizer steps have
    parted (an optimizer.step() the loop skipped, optimizer steps before its first batch, a
    training resumed from a checkpoint before `resumed_after`, the last step of the run the
    Recorder resumed without resume_from), or when `step` is a batch of the number `last`'s
    batch has (a loop that logs each micro-batch or accumulation round of a step). Another half
    behind one of its own kind is left to the Recorder's refusal."""
    from stabledrl_cli.dump._schema import step_number  # loaded with the Recorder already
    from stabledrl_cli.dump._writer import resumed_before

    number, behind = step_number(step.number), step_number(last.number)
    if number > behind:
        return
    if number == behind and step.batch is not None and last.batch is not None:
        raise UsageError(
            f"log_policy_batch({number}) was called twice: a step is one call, after its last "
            "backward(), its micro-batches' (or accumulation rounds') arrays concatenated, "
            "micro_batch= naming each sequence's"
        )
    if step.hooks is not None and last.hooks is None:
        parted = f"optimizer step {number} comes after log_policy_batch({behind})"
    elif step.batch is not None and last.batch is None:
        parted = f"log_policy_batch({number}) comes after optimizer step {behind}"
    else:
        return
    if resumed_after is not None and number <= resumed_after:
        keyword = "recorder_kwargs resume_from"
        raise UsageError(parted + resumed_before(resumed_after, number, keyword))
    raise UsageError(f"{parted}: {_NUMBERED_BY_STEPS}")


def _stopped_at(recorder: Recorder, noticed: int | None) -> str:
    """Where recording stopped: at the step whose write failed, which the Recorder knows; else
    at step `noticed` (the one being logged), or at the end of the run (None). A write in the
    background fails unseen until a later step is logged, or the run closes."""
    step = noticed if recorder.stopped_step is None else recorder.stopped_step
    return "recording stopped " + ("at the end of the run" if step is None else f"at step {step}")


def _snapshot(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` (log_step keywords) with each array, tensor and list copied into a numpy
    array of its own: a batch that waits for its optimizer step's half is written again then,
    and the script may have reused its buffers since `log_policy_batch` returned."""
    from stabledrl_cli.dump._inputs import to_numpy  # loaded with the Recorder already

    def copy(name: str, value: Any) -> Any:
        return (
            value
            if value is None or isinstance(value, (int, float))
            else to_numpy(value, name).copy()
        )

    out = {name: copy(name, value) for name, value in fields.items() if name != "scalars"}
    scalars = fields.get("scalars")
    if scalars is not None:
        out["scalars"] = {k: copy(f"scalars[{k!r}]", v) for k, v in dict(scalars).items()}
    return out


def _release_held(policy: str | PolicyLike | None, recorder_kwargs: dict[str, Any]) -> None:
    """Writes the held first hook step, if any, opening the run (with `policy`, if any)."""
    global _held
    held, _held = _held, None
    if held is not None:
        recorder = _open(policy, recorder_kwargs, batch=held.batch is not None, hooks=True)
        held.number += _hooks_start
        _write(held, recorder, replace=False)


_warned_no_token = False


def _no_token(step: int, fields: dict[str, Any], recorder: Recorder) -> bool:
    """Whether `fields` is a batch with no token in a one-rank run, a step the format has no
    place for (`Recorder.log_step` refuses it): the first one warns that such batches are not
    recorded. A rank's empty part of a multi-rank step is recorded."""
    global _warned_no_token
    logp = fields.get("logp")
    if logp is None or recorder.world_size > 1:
        return False
    from stabledrl_cli.dump._inputs import element_count  # loaded with the Recorder already

    if element_count(logp, "logp"):
        return False
    if not _warned_no_token:
        _warned_no_token = True
        warn(
            f"stabledrl: warning: log_policy_batch at step {step}: a batch with no token is "
            "not recorded (nor the next ones, without another warning); recording goes on\n"
        )
    return True


def log_policy_batch(
    step: int,
    *,
    policy: str | PolicyLike | None = None,
    recorder_kwargs: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Log one optimizer step to the run that `stabledrl record -- CMD` set up.

    `fields` are `Recorder.log_step`'s keyword arguments (logp, logp_old, advantages, mask,
    seq_id, group_id, reward, grad_norm, loss, ...). `policy` (a spec such as
    "dapo:eps_high=0.28", or a catalogue policy; else STABLEDRL_POLICY) and `recorder_kwargs`
    (unit, estimator, meta, ...) are used by the call that opens the Recorder. Under the
    optimizer hooks, step n is merged with the n-th optimizer step (module docstring).
    Returns True when the step was recorded: written, or, in a run that the optimizer hooks
    opened (asynchronous writes), handed to the Recorder's writer thread, whose failure
    shows at a later call (False) and in `record`'s exit code. False also for a batch with no
    token in a one-rank run: the format has no such step, so it is skipped (the first one
    warns) and recording goes on; under the hooks its step stays the optimizer's scalar step.
    A field or a `recorder_kwargs` key the Recorder does not take is a usage error (exit 2),
    named, as the steps `log_step` refuses are. Never raises.
    """
    global _first_batch_logged
    if _failure.off or _closed:
        return False
    held = None  # a held optimizer step before this one, written (and the run opened) first
    try:
        _refuse_unknown(fields, "log_step", "a field of log_policy_batch")
        if recorder_kwargs is not None and not isinstance(recorder_kwargs, Mapping):
            raise UsageError(
                f"recorder_kwargs must be a dict, got {type(recorder_kwargs).__name__}"
            )
        with _lock:
            first_batch, _first_batch_logged = not _first_batch_logged, True
            kwargs = dict(recorder_kwargs or {})
            pairs_held = _held is not None and _held.number == step
            if not pairs_held:
                held = _held
                _release_held(policy, kwargs)
                held = None
            recorder = _open(policy, kwargs, batch=True, hooks=pairs_held)
            if _no_token(step, fields, recorder):
                _release_held(policy, kwargs)  # the optimizer's half alone
                return False
            if _held is not None:  # (pairs_held)
                _held.batch = fields
                _release_held(policy, kwargs)
                return not _failure.off
            if _last is not None and _last.number == step and _last.batch is None:
                _last.batch = fields
                return _write(_last, recorder, replace=True)
            if first_batch:
                _warn_numbered_from_1(step)
            return _write(_Step(step, batch=_snapshot(fields)), recorder, replace=False)
    except Exception as exc:  # named by the first step it loses: the held one's, if not written
        _failure.fail(
            exc,
            f"log_policy_batch failed at step {step}"
            if held is None
            else f"recording optimizer step {held.number}",
        )
        return False


def log_hook_step(step: int, fields: dict[str, Any]) -> None:
    """Records the optimizer hooks' step `step` (Recorder.log_step keywords), paired with a
    `log_policy_batch` of the same number (module docstring). Never raises."""
    global _held
    if not hooks_wanted() or _closed:
        return
    held = None  # the held first step, written (and the run opened) with this one
    try:
        with _lock:
            _close_at_child_end()
            if _recorder is None and _held is None:
                # The Recorder imported now, not when the held step is written at exit: a
                # library imported during the interpreter's exit may crash it (h5py did:
                # SIGSEGV in libhdf5's exit handler).
                import stabledrl_cli.dump._writer  # noqa: F401

                _held = _Step(step, hooks=fields)
                return
            held = _held
            _release_held(None, {})
            held = None
            recorder = _open(None, {}, batch=False, hooks=True)
            step += _hooks_start
            if _last is not None and _last.number == step and _last.hooks is None:
                _last.hooks = fields
                _write(_last, recorder, replace=True)
            else:
                _write(_Step(step, hooks=fields), recorder, replace=False)
    except Exception as exc:  # named by the first step it loses: the held one's, if not written
        _failure.fail(exc, f"recording optimizer step {step if held is None else held.number}")


def refuse_another_run_dir(out: str | os.PathLike[str], given_as: str, leave_out: str) -> None:
    """UsageError when `stabledrl record --out` set $STABLEDRL_RUN_DIR and `out`, the run
    directory an integration was given, names another directory: record's optimizer hooks
    stand down for the integration, so record would find no step in its own. `given_as`: how
    `out` was given (`install(out=mine)`); `leave_out`: how to leave it out."""
    env = os.environ.get(ENV_RUN_DIR)
    if env and os.path.realpath(out) != os.path.realpath(env):
        raise UsageError(
            f"{given_as} is not the run directory of `stabledrl record --out` "
            f"(${ENV_RUN_DIR}), {env}: {leave_out} (it defaults to record's --out) or give "
            "both the same directory"
        )


def integration_records() -> None:
    """An integration (TRL, verl) records this process's steps itself: the optimizer hooks
    stand down here, so that they never write step files beside its own."""
    global _integration
    _integration = True


def recorded_into(directory: str | os.PathLike[str]) -> bool:
    """Whether this process recorded steps of record's run (the optimizer hooks' of a warm-up,
    say, or `log_policy_batch`'s; the hooks' first step held included) and that run is
    `directory`: an integration's steps, numbered from 1 again, cannot go beside them."""
    with _lock:
        if _recorder is not None:
            run = os.fspath(_recorder.path)
        elif _held is not None:
            run = os.environ.get(ENV_RUN_DIR, "")
        else:
            return False
    return bool(run) and os.path.realpath(run) == os.path.realpath(directory)


def hooks_wanted() -> bool:
    """Whether the optimizer hooks should record in this process."""
    return not _failure.off and not _integration


def hooks_installed() -> None:
    """Called once the optimizer hooks are in: the held step (if any) is written at exit, by
    os._exit (`_os_exit`), and with the queued steps on a SIGTERM that would end the process
    at once (`_sigterm`)."""
    atexit.register(_written_at_exit if _closed_last else close)
    steps_written_on_sigterm(_written_at_exit)
    os._exit = _os_exit


_python_os_exit = os._exit


def _os_exit(status: int) -> NoReturn:
    """os._exit under the optimizer hooks: a script that ends so after its first optimizer
    step (no exit handler runs) has the step the hooks hold written first, from a thread of
    its own (the caller may hold the recording lock: a signal handler that calls it), for
    WRITE_SECONDS at most. Written steps are on disk already."""
    if _held is not None:
        writing = threading.Thread(target=_written_at_exit, name="stabledrl-exit", daemon=True)
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


def _written_at_exit() -> None:
    """Under `closed_last`, the exit handler registered as the hooks are installed and as the
    run opens: the held step and every queued one are written, the run left open. An exit
    handler registered before it that ends the process (`os._exit`) or never returns then
    loses no finished step, and one that logs a step still has it recorded (the run is
    closed last). A SIGTERM that ends the process writes its steps with it too."""
    if _failure.off:
        return
    try:
        with _lock:
            _release_held(None, {})
            recorder = _recorder
        if recorder is not None:
            recorder.flush()
            _failure.stopped(recorder.stopped, _stopped_at(recorder, None))
    except Exception as exc:
        _failure.fail(
            WriteError(str(exc)) if isinstance(exc, OSError) else exc, "writing the last steps"
        )


def hook_failed(exc: BaseException, context: str) -> None:
    """The optimizer hooks failed: warn once, recording off (RecordingFailure)."""
    _failure.fail(exc, context)


def close() -> None:
    """Write a held step, close the Recorder (registered with atexit; safe to call twice). A
    close that a Ctrl-C cuts short while the Recorder's queue drains is finished before the
    KeyboardInterrupt goes on: at exit under `record` nothing closes the run after this
    (`closed_last`), and the steps still queued would be lost."""
    global _recorder, _closed
    if not _failure.off:
        try:
            with _lock:
                _release_held(None, {})
        except Exception as exc:
            _failure.fail(exc, "recording the last optimizer step")
    with _lock:
        recorder, _recorder, _closed = _recorder, None, True
    if recorder is not None:
        if _interrupted is not None:  # after the held step: it is whole, and recorded
            recorder.note_interrupted(_interrupted)
        try:
            try:
                recorder.close()
            except KeyboardInterrupt:
                recorder.close()  # (the Recorder finishes an interrupted close)
                raise
            _failure.stopped(recorder.stopped, _stopped_at(recorder, None))
        except Exception as exc:
            _failure.fail(
                WriteError(str(exc)) if isinstance(exc, OSError) else exc, "closing the run"
            )
