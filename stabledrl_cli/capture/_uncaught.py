"""A tool error that ends the command: a stabledrl error (UsageError, InputError, WriteError)
that a process of `stabledrl record -- CMD` does not catch, say an integration refusing a
configuration, is bad input, not a bug of the script.

The sitecustomize's audit hook, which sees every uncaught exception whatever sys.excepthook the
script set (`rich.traceback.install()`), hands it to `uncaught_error`, which prints it as one
line `error: ...` (`rank R: ` first in a multi-rank run; the traceback instead under
STABLEDRL_DEBUG=1, which `record --debug` sets) and appends `E<CODE><TAB>MESSAGE` to the status
file (`_status`). The process still exits 1, as after any uncaught exception; `record` then
exits with CODE. torchrun's own ChildFailedError, raised when such a rank failed, is silenced
the same way (the ranks said why). Every other exception keeps its traceback. A framework that
catches the error, prints its own report and calls `sys.exit(1)` in its except block (hydra's
`@hydra.main`) ends the process the same way: the sitecustomize's `sys.exit` raises
`reported_exit`'s SystemExit, which hands the error to `uncaught_error` when the interpreter
ends the process with it (the framework's report stays, before the line).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

from stabledrl_cli.capture._process_rank import rank_prefix
from stabledrl_cli.capture._status import ENV_STATUS_FILE, read_status, report_failure
from stabledrl_cli.errors import StabledrlError, task_cause, warn

ENV_DEBUG = "STABLEDRL_DEBUG"
_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"

interrupted: BaseException | None = None
"""The first exception that went uncaught in this process (Ctrl-C, an error): it ends, and
`bootstrap.close` notes in the run how its training was cut short (`Recorder.note_interrupted`)."""


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
    global interrupted
    path = os.environ.get(ENV_STATUS_FILE)
    if not path:
        return False
    interrupted = exc if interrupted is None else interrupted
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
