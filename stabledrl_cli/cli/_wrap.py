"""`stabledrl record --out DIR -- CMD`, the parent side: run a training command with the run
directory exported to it, then turn what happened into one exit code. The command's own
failing exit code wins, except that a stabledrl error which ended the command with exit
code 1 (uncaught, or caught by a framework that reported it and called sys.exit(1) in its
except block; reported through the status file, its `error:` line printed by the child)
gives its own code; otherwise a recording failure its bootstrap reported
(capture/bootstrap.py, through the status file), a run the command wrote no step file to, or
a rank the command launched that wrote none (its processes announce their ranks) is an
error.

The directory holding the sitecustomize of capture/_site/ goes first on the command's
PYTHONPATH: every Python process of the command (a torchrun's ranks too) reports an uncaught
stabledrl error in one line and, with the optimizer hooks on (the default), installs the
hooks when it imports torch (capture/optimizer_hooks.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from contextlib import suppress
from pathlib import Path

import typer
from rich.markup import escape

from stabledrl_cli._atomic import write_error
from stabledrl_cli._process import SIGNALLED, how_it_ended, shell_exit_code
from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli._run_env import OVERWRITTEN
from stabledrl_cli.capture._child_processes import ENV_HOOKS_RECORDER
from stabledrl_cli.capture._status import ENV_STATUS_FILE, read_status
from stabledrl_cli.capture._uncaught import ENV_DEBUG
from stabledrl_cli.capture.bootstrap import (
    ENV_FORCE,
    ENV_OPTIMIZER_HOOKS,
    ENV_POLICY,
    ENV_RANKS_DIR,
    ENV_RUN_DIR,
)
from stabledrl_cli.capture.branch_protocol import BRANCHES_DIR, CHECKPOINTS_DIR
from stabledrl_cli.cli._output import err
from stabledrl_cli.cli._signals import signals_handled
from stabledrl_cli.cli._wrap_outcome import announced_ranks, check_ranks, note_exit_code
from stabledrl_cli.dump._manifest_edits import reclose_run, reopen_run
from stabledrl_cli.errors import InputError, UsageError, WriteError
from stabledrl_cli.policies import resolve_spec

SITE_DIR = Path(__file__).resolve().parents[1] / "capture" / "_site"
"""The directory of the sitecustomize that the command's Python processes run."""

UNCAUGHT = 1
"""Python's exit code after an uncaught exception."""

NO_STEP = (
    "the command recorded no step: no torch optimizer.step() ran in a Python process of the "
    "command where the optimizer hooks record it (not with --no-optimizer-hooks, `python -I`, "
    "`-E` or `-S`, nor where the TRL or verl integration records instead: its warnings say "
    "what it did not record) and no call of stabledrl_cli.log_policy_batch(step, ...) "
    "recorded one"
)


def _step_files(out: Path) -> dict[str, tuple[int, int]]:
    """The run's step files (every rank's), each name with its (inode, mtime_ns): a step
    written again is a new file (written atomically), so either moves."""
    # Imported here: the dump package imports torch, which `record --help` never needs.
    from stabledrl_cli.dump._file_names import STEP_FILE_RE, STEPS_DIR

    steps = out / STEPS_DIR
    if not steps.is_dir():
        return {}
    found = {}
    for path in steps.iterdir():
        if STEP_FILE_RE.match(path.name):
            try:
                stat = path.stat()
            except OSError:
                continue
            found[path.name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def _missing_interpreter(program: str) -> str | None:
    """The interpreter a script's `#!` line names, when no file of that name exists; else None
    (not a script, or one its system can start)."""
    try:
        handle, _ = open_regular(program)
    except (OSError, NotRegularFile):
        return None
    with handle:
        first = handle.readline(_SHEBANG_LIMIT)
    words = first[2:].split() if first.startswith(b"#!") else []
    if not words or os.path.exists(words[0]):
        return None
    return os.fsdecode(words[0])


_SHEBANG_LIMIT = 4096
"""Bytes of a script's first line read for its `#!` interpreter."""


def _started(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """CMD started, or a UsageError saying why the system cannot start it (a file that is no
    program it knows, not executable...)."""
    try:
        return subprocess.Popen(cmd, env=env)
    except OSError as exc:
        raise UsageError(f"cannot run {cmd[0]}: {exc.strerror or exc}") from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that ask record to stop, from before its temporary directory exists until its
work is done (`_Stop`)."""


def _not_ignored(signals: tuple[signal.Signals, ...]) -> list[signal.Signals]:
    """Those of `signals` that record's process does not ignore. An ignored one (SIGHUP under
    `nohup`, SIGINT in a shell's background job) stays so for record and for the command,
    which inherits it: a handler of record's would give the command the signal's default."""
    return [signum for signum in signals if signal.getsignal(signum) is not signal.SIG_IGN]


class _Stop:
    """Record's handler of `STOP_SIGNALS`: none of them ends record half-way (its temporary
    directory left behind, the command orphaned, a traceback). Before the command starts, one
    stops record there (`before`: the command is not started); while the command runs, SIGTERM
    and SIGHUP are passed on to it, and record waits for it (Ctrl-C's SIGINT reaches the
    command from the terminal itself: record and CMD are one process group); after it ended,
    record finishes its work and says the signal came too late (`late`). A container's first
    process, or a pod's, is record, and the only one signalled."""

    def __init__(self) -> None:
        self.before: int | None = None
        self.late: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        process = self._process
        if process is None:
            self.before = self.before or signum
        elif process.returncode is not None:
            self.late = self.late or signum
        elif signum != signal.SIGINT:
            process.send_signal(signum)

    def started(self, process: subprocess.Popen[bytes]) -> None:
        """The command started: a signal that came as it started reaches it now."""
        self._process = process
        if self.before not in (None, signal.SIGINT):
            process.send_signal(self.before)


def _call(cmd: list[str], env: dict[str, str], stop: _Stop) -> int:
    """Runs CMD to its end, `stop` passing signals on to it; -> its exit code. Ctrl-C in a
    terminal reaches CMD itself: CMD decides what it does with it, and record waits for it
    (subprocess.call killed it 0.25 s later, before a training's own handler or its Recorder's
    last writes were done)."""
    with _started(cmd, env) as process:
        stop.started(process)
        return process.wait()


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _reports(status: Path) -> tuple[list[tuple[int, str]], list[int]]:
    """`read_status` of the command's status file; none, with a warning, when the command
    left it unreadable (removed it, say): its exit code is still passed on."""
    try:
        return read_status(status)
    except OSError as exc:
        err.print(
            f"warning: cannot read the command's status file {status} ({exc.strerror or exc}): "
            "a recording failure it reported is not known",
            highlight=False,
        )
        return [], []


def _with_site(env: dict[str, str], optimizer_hooks: bool) -> None:
    """Puts the sitecustomize first on the command's PYTHONPATH (its hooks off when not
    `optimizer_hooks`). The command's entries stay as they were, empty ones too: Python puts
    the working directory on sys.path for each."""
    given = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), given] if given else [str(SITE_DIR)])
    env[ENV_OPTIMIZER_HOOKS] = "1" if optimizer_hooks else "0"
    env.pop(ENV_HOOKS_RECORDER, None)  # a record run inside another's command: its own


SCRATCH_REMOVALS = 3
"""Tries at removing record's renamed temporary directory (`_remove_scratch`)."""


def _remove_scratch(scratch: Path) -> None:
    """Removes record's temporary directory, which a process the command left running (a rank
    still stopping, a detached worker) may still write to: renamed first, so that no such
    process can create a file in it by the paths it was given (its status file, its ranks
    directory), then removed. A file that an open already under way when it was renamed creates
    after the removal listed the directory makes that removal fail: it is tried again
    (`SCRATCH_REMOVALS` times in all, since no new file can appear once those opens are done);
    what still stays is no error."""
    with suppress(OSError):
        scratch = scratch.rename(scratch.with_name(scratch.name + "-removed"))
    for _ in range(SCRATCH_REMOVALS):
        shutil.rmtree(scratch, ignore_errors=True)
        if not os.path.lexists(scratch):
            return


def run_command(
    out: Path,
    cmd: list[str],
    force: bool,
    policy: str | None,
    optimizer_hooks: bool = True,
    *,
    debug: bool = False,
) -> None:
    """Run CMD with the run directory exported and the sitecustomize on its path (its hooks
    on with `optimizer_hooks`); an uncaught stabledrl error's code, else CMD's failing exit
    code becomes ours (said with the number of step files the run holds), else a recording
    failure or a command that wrote no step file (one it held before, under --force, is not its
    own) is an error (capture/bootstrap.py). `debug` (`--debug`):
    the command's uncaught stabledrl error shows its traceback too."""
    program = shutil.which(cmd[0])
    if program is None and not (os.sep in cmd[0] and os.path.lexists(cmd[0])):
        raise UsageError(f"command not found: {shlex.quote(cmd[0])}")
    # A path that is there but not executable: exec says why (`_started`).
    interpreter = None if program is None else _missing_interpreter(program)
    if interpreter is not None:  # exec would say the script itself is missing
        raise UsageError(
            f"cannot run {cmd[0]}: its #! line names {interpreter}, which does not exist"
        )
    if policy is not None:
        resolve_spec(policy)  # a bad spec is a usage error here, not a warning in the child
    elif os.environ.get(ENV_POLICY):  # the command inherits it, and records with it
        try:
            resolve_spec(os.environ[ENV_POLICY])
        except UsageError as exc:
            where = f"${ENV_POLICY} in the environment (record's --policy)"
            raise UsageError(f"{where}: {exc}") from None
    stop = _Stop()
    with signals_handled(stop, *_not_ignored(STOP_SIGNALS)):
        try:
            _record(out, cmd, force, policy, optimizer_hooks, debug, stop)
        finally:
            if stop.late is not None:
                err.print(
                    f"{_signal_name(stop.late)} came after the training command ended: its "
                    "outcome stands",
                    highlight=False,
                )


def _record(
    out: Path,
    cmd: list[str],
    force: bool,
    policy: str | None,
    optimizer_hooks: bool,
    debug: bool,
    stop: _Stop,
) -> None:
    """`run_command`'s work once CMD is known to start, under `stop`."""
    old = _example_files(out) if force else []  # refused before anything changes
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a file, read-only, ...: an output that cannot be written
        raise write_error(out, exc) from None
    scratch = Path(tempfile.mkdtemp(prefix="stabledrl-record-"))
    try:
        status = scratch / "status"
        status.touch()
        ranks_dir = scratch / "ranks"
        ranks_dir.mkdir()
        env = dict(os.environ)
        env[ENV_RUN_DIR] = str(out.resolve())
        env[ENV_FORCE] = "1" if force else "0"
        env[ENV_STATUS_FILE] = str(status)
        env[ENV_RANKS_DIR] = str(ranks_dir)
        if policy is not None:
            env[ENV_POLICY] = policy
        if debug:
            env[ENV_DEBUG] = "1"
        _with_site(env, optimizer_hooks)
        if stop.before is not None:
            err.print(
                f"stopped by {_signal_name(stop.before)} before the training command started: "
                "nothing recorded",
                highlight=False,
            )
            raise typer.Exit(SIGNALLED + stop.before)
        # recorded again: a watch of it must not end on the run it holds now, closed or killed
        closed = reopen_run(out) if force else None
        dead = _take_dead_locks(out) if force else {}
        err.print(
            f"recording [bold]{escape(shlex.join(cmd))}[/] into {escape(str(out))}",
            highlight=False,
            markup=True,
        )
        before = _step_files(out)
        try:
            code = _call(cmd, env, stop)
        finally:  # a command that changed no step file leaves the run closed as it was
            changed = _step_files(out) != before
            if closed is not None and not changed:
                reclose_run(out, closed)
            if not changed:
                _put_back(dead)
            if old and os.path.lexists(ranks_dir / OVERWRITTEN):  # the command replaced the run
                from stabledrl_cli.example.old_run import remove_old_run_files

                remove_old_run_files(old)
        failures, fatal = _reports(status)
        launched = announced_ranks(ranks_dir)
    finally:
        _remove_scratch(scratch)
    if code == UNCAUGHT and fatal:  # a tool error ended the command: its line is out already
        raise typer.Exit(fatal[0])
    if code != 0:
        after = _step_files(out)
        files = list(after)
        if code > 0 and changed:
            note_exit_code(out, code, files)
        for _, reason in failures:
            err.print(
                f"[yellow]warning:[/] recording failed: {escape(reason)}",
                highlight=False,
                markup=True,
            )
        new = [name for name, stamp in after.items() if before.get(name) != stamp]
        check_ranks(out, files, new, launched, failed=True)
        steps = len(files)
        held = f"{steps} step file(s): `stabledrl inspect {out}`" if steps else "no step file"
        err.print(
            f"the training command {how_it_ended(code)}; the run holds {held}", highlight=False
        )
        raise typer.Exit(shell_exit_code(code))
    if failures:
        code, reason = failures[0]
        error = {UsageError.exit_code: UsageError, InputError.exit_code: InputError}.get(
            code, WriteError
        )
        raise error(f"recording failed: {reason}")
    after = _step_files(out)
    new = [name for name, stamp in after.items() if before.get(name) != stamp]
    if not new:
        earlier = (
            f"; {out} holds only the {len(after)} step file(s) it held before" if after else ""
        )
        raise UsageError(NO_STEP + earlier)
    check_ranks(out, list(after), new, launched)


def _take_dead_locks(out: Path) -> dict[Path, bytes]:
    """Removes the lock files of the run's Recorders that died (`writer_states`: released; a
    killed recording leaves them): a watch takes them for a recording that ended, and would
    stop on the old run while the command starts. -> each one removed, with its bytes."""
    from stabledrl_cli.dump._file_names import STEPS_DIR, writer_lock_name
    from stabledrl_cli.dump._writer_lock import writer_states

    steps = out / STEPS_DIR
    taken = {}
    for rank, state in (writer_states(steps) or {}).items():
        path = steps / writer_lock_name(rank)
        if state == "released":
            with suppress(OSError):
                text = path.read_bytes()
                path.unlink()
                taken[path] = text
    return taken


def _put_back(locks: dict[Path, bytes]) -> None:
    """Writes back the lock files `_take_dead_locks` removed (a command that changed no step
    file leaves the run as it was: killed), but where one is there again. Best effort."""
    for path, text in locks.items():
        with suppress(OSError), open(path, "xb") as lock:
            lock.write(text)


def _example_files(out: Path) -> list[Path]:
    """The built-in example's checkpoints and branch runs in `out` (`old_run_files`), which a
    command that replaces the run there must not leave in its run; refused as `record` refuses
    them for the example (a symlink, what is no branch run's in RUN/branches)."""
    if not any(os.path.lexists(out / name) for name in (BRANCHES_DIR, CHECKPOINTS_DIR)):
        return []
    from stabledrl_cli.example.old_run import old_run_files

    return old_run_files(out)
