"""Domain errors, each with its exit code (docs/exit-codes.md).

0 ok; 1 a check failed (gate tripped); 2 usage error; 3 unreadable or corrupt input; 4 an
output could not be written (disk full, permission denied); 71 the machine's limits (a
worker process of a replay died, often at the out-of-memory killer's hand, or memory ran out);
70 a bug of the tool. Library code raises
these in the library's own terms (`window must be >= 1`, not a flag name); `exit_code_for`
maps any exception to its exit code and line, which `cli/app.py` (and the example's module)
print on stderr.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import sys
from pathlib import Path

from stabledrl_cli._process import SIGNALLED

DEBUG_ENV = "STABLEDRL_DEBUG"
"""Set (not 0), a command or the example's module shows a traceback in place of the line."""
INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)
"""An unexpected exception: a bug of the tool, not a tripped gate (1) nor bad input (3)."""
OS_ERROR = 71  # EX_OSERR (sysexits.h)
"""The machine's limits stopped the command: a worker process died, or memory ran out."""
INTERRUPTED = SIGNALLED + signal.SIGINT  # 130
"""Ctrl-C: as a shell reports a process SIGINT ended."""


class StabledrlError(Exception):
    """Base class of every error the tool reports to a user."""

    exit_code: int = 1


class UsageError(StabledrlError, ValueError):
    """A bad spec, option or argument: the caller's mistake (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A replay, gate, guard or example setting out of range (exit 2), naming the setting
    (`field`) so a front end can name its own option for it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        """The setting's name, as the library spells it (`window`, `step_range`)."""
        self.problem = problem
        """What is wrong with it, without the name ("must be an integer >= 1")."""


class InputError(StabledrlError):
    """A run, step or report that is missing, unreadable, corrupt or of a wrong version (exit 3)."""

    exit_code = 3


class WriteError(StabledrlError):
    """An output (a run, an archive, a report, a baseline) could not be written (exit 4)."""

    exit_code = 4


class WorkerDiedError(StabledrlError):
    """A worker process ended before it finished its share of the work: killed by a signal
    (SIGKILL is often the out-of-memory killer) or exited, or could not be started (fork
    refused); neither the input's fault nor a bug the tool raised (exit 71, EX_OSERR of
    sysexits.h beside the internal error's 70)."""

    exit_code = OS_ERROR


class MissingExtraError(UsageError):
    """An optional extra is not installed; the message carries the install command."""


def install_command(extra: str) -> str:
    """The command that adds an optional extra, in any directory and with any pip: its pinned
    packages as the installed stabledrl's metadata names them (`pip install 'matplotlib<4,>=3.7'`),
    so that pip never looks the unpublished name `stabledrl` up on a package index; from a
    checkout run without installing it, that checkout with the extra (`pip install -e
    '/path/to/checkout[plot]'`); the extra by name when neither says."""
    import importlib.metadata  # not at start-up: only a missing extra's message reads it

    try:
        declared = importlib.metadata.requires("stabledrl") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    wanted = [r.split(";")[0].strip() for r in declared if marker.search(r.partition(";")[2])]
    if wanted:
        return "pip install " + " ".join(f"'{requirement}'" for requirement in wanted)
    checkout = _checkout_root()
    if checkout is not None:
        return f"pip install -e {shlex.quote(f'{checkout}[{extra}]')}"
    return f"pip install 'stabledrl[{extra}]'"


def _checkout_root() -> Path | None:
    """The checkout this module runs from (the directory whose pyproject.toml declares
    stabledrl beside the package), or None: an installed copy has none."""
    root = Path(__file__).resolve().parent.parent
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return root if re.search(r"""^name\s*=\s*["']stabledrl["']""", text, re.M) else None


REASON_LIMIT = 300
"""Characters of another library's error message kept in one of ours."""


def task_cause(exc: BaseException) -> StabledrlError | None:
    """The stabledrl error a Ray task raised, when `exc` is Ray's copy of it raised again in the
    caller (`RayTaskError(UsageError)`, whose text is the task's whole traceback, in colour):
    its `cause`; else None."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, StabledrlError) else None


def one_line(message: BaseException | str) -> str:
    """Another library's error message (an exception, or its text) on one line, at most
    `REASON_LIMIT` characters (it may span lines, or quote a whole request)."""
    return clipped(" ".join(str(message).split()), REASON_LIMIT)


def described(exc: BaseException) -> str:
    """Another library's error as `Type: message` on one line (`one_line`), or `Type` alone
    when it says nothing more (a timeout: `FSTimeoutError`, not `FSTimeoutError: `)."""
    message = one_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


QUOTE_LIMIT = 40
"""Characters of a user's value quoted in an error line; a longer one is cut (its length said)."""


SPEC_QUOTE_LIMIT = 120
"""Characters of a policy, guard or sweep spec quoted: a spec is quoted whole up to it (three
times `QUOTE_LIMIT`: a spec past 40 characters is common, one past 120 rare), so that two
specs that part late, their keys sorted, are told apart; a longer one is cut as any value."""


def cut(text: str, limit: int, said: str = "") -> str:
    """`text` whole up to `limit` characters, else its first `limit`, "..." and its length
    (`1111... (5,000 characters)`, `said` after the length): a value of an input, or a
    text made of one, never goes whole into a line."""
    return text if len(text) <= limit else text[:limit] + _length_said(text, said)


def clipped(text: str, limit: int) -> str:
    """`text` whole up to `limit` characters, else its first `limit - 3` and "...": at most
    `limit` characters, where a line has room for no more (`cut` says the length too)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _length_said(text: str, said: str = "") -> str:
    """What `cut` puts after a text's first characters."""
    return f"... ({len(text):,} characters{said})"


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` quoted for an error line (`'abc'`), its first `limit` characters if longer
    (`'1111'... (5,000 characters)`, as `cut` cuts): a value pasted by mistake stays one
    short line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + _length_said(text)


def key_shown(name: str, limit: int = QUOTE_LIMIT) -> str:
    """A key an input names (a baseline's policy spec or recorded series, an archive's object)
    in an error line or a gate's name: as it is, or quoted (and cut at `limit`) when it is
    longer or holds a character that is not printable (a newline would split the line)."""
    return name if name.isprintable() and len(name) <= limit else quoted(name, limit)


def quoted_spec(spec: str) -> str:
    """A policy, guard or sweep spec `quoted`, whole up to `SPEC_QUOTE_LIMIT` characters (two
    long specs that differ at their end stay apart); a longer one is no spec anyone typed, and
    is cut as any pasted value."""
    return quoted(spec, SPEC_QUOTE_LIMIT if len(spec) <= SPEC_QUOTE_LIMIT else QUOTE_LIMIT)


SHOWN_LIMIT = 60
"""Characters of a bad value of a JSON input that a message shows."""


def shown(value: object) -> str:
    """`value` (parsed from a JSON input) as JSON for an error line, cut at `SHOWN_LIMIT`
    characters: a value pasted by mistake stays one short line."""
    return clipped(json.dumps(value), SHOWN_LIMIT)


def type_name(value: object) -> str:
    """The name of `value`'s type for a message, with its module unless it is Python's own:
    numpy's bool is `numpy.bool`, not `bool` (a switch given np.True_ is not refused as 'not
    bool')."""
    kind = type(value)
    module = kind.__module__
    return kind.__name__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and its noun for a message: '1 gate', '2 gates', '3 policies', '2 unreadable
    steps'; `plural` when adding s (or y -> ies) does not make it ('step files were')."""
    if count == 1:
        return f"1 {noun}"
    if plural is None:
        plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{count} {plural}"


LINE_BREAKS = {ord("\n"): "\\n", 0x2028: "\\u2028", 0x2029: "\\u2029"}
"""Line breaks, as a message on stderr shows them (`\\n`): a path or value that holds one never
splits an error or a warning across lines."""


def warn(line: str) -> None:
    """Writes `line` (ending with a newline) to stderr at once, as one line (`LINE_BREAKS`
    and a carriage return escaped inside it); nothing when the process has no stderr (closed:
    `2>&-` leaves sys.stderr None) or it cannot be written: a recording's warning never breaks
    the training it observes."""
    body, end = (line[:-1], "\n") if line.endswith("\n") else (line, "")
    try:
        sys.stderr.write(body.translate({**LINE_BREAKS, ord("\r"): "\\x0d"}) + end)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says memory ran out: Python's MemoryError, torch's OutOfMemoryError (a
    device's) or its CPU allocator's RuntimeError."""
    if isinstance(exc, MemoryError):
        return True
    if any(kind.__name__ == "OutOfMemoryError" for kind in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(
        exc
    )


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    """The ordered error map: domain errors first, then the OS's, then anything else."""
    if isinstance(exc, StabledrlError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return 3, f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted"
    if _out_of_memory(exc):
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return OS_ERROR, (
            f"out of memory: {what} (the machine's memory or this process's limit ran out, "
            "not a bug: free memory or ask for less)"
        )
    return INTERNAL_ERROR, (
        f"internal error: {type(exc).__name__}: {exc} (a bug: rerun with --debug for the "
        "traceback, and please report it)"
    )
