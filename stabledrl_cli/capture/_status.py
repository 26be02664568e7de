"""The status file through which the processes of `stabledrl record -- CMD` tell `record` what
went wrong (a no-op outside `record`).

`report_failure` appends one line `CODE<TAB>MESSAGE` to the status file (CODE is the exit code
the failure maps to: 2 for a usage error such as a missing policy or arrays log_step refuses,
3 for unreadable input or an exception that is not the tool's, 4 for a run that could not be
written); `E<CODE><TAB>MESSAGE` for a tool error that ended a process (`_uncaught`). After the
command exits, `record` reads that file (`read_status`): a reported failure, or a command that
wrote no step file, makes it exit non-zero with the reason, unless the command's own non-zero
exit code wins.
"""

from __future__ import annotations

import errno
import io
import os

from stabledrl_cli._regular import NotRegularFile, open_regular
from stabledrl_cli.errors import InputError, StabledrlError, WriteError, warn

ENV_STATUS_FILE = "STABLEDRL_STATUS_FILE"
FATAL = "E"
"""Marks a status line of a tool error that ended a process of the command (module docstring)."""


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
