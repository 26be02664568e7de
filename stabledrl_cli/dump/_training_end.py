"""How a training that a Recorder records ended: its script's normal end (`normal_end`), or
cut short, in a few words for its run's stop note (`cut_short`); the exception that ends the
script as the exit handlers run (`uncaught_at_exit`); a failed write as the process ends, one
warning line (`warned_at_the_end`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from stabledrl_cli.errors import WriteError, clipped, warn


def normal_end(exc: BaseException) -> bool:
    """Whether an exception that ends a training is the script's own normal end, which notes
    no stop: sys.exit(0) (or sys.exit() alone), or GeneratorExit, a generator of steps whose
    consumer took no more (a `break` out of its loop, its `close()`), no failure of them."""
    if isinstance(exc, GeneratorExit):
        return True
    return isinstance(exc, SystemExit) and exc.code in (None, 0)


def cut_short(cause: BaseException) -> str:
    """How an exception that ended a training cut it short, in a few words for its run's stop
    note: `interrupted (Ctrl-C)`, `ended by sys.exit(2)`, `stopped by RuntimeError: CUDA out
    of memory` (its message's first line, at most `_CAUSE_SHOWN` characters; its type alone
    when its str() raises, which must not replace it)."""
    if isinstance(cause, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(cause, SystemExit):
        return f"ended by sys.exit({cause.code!r})"
    try:
        text = str(cause)
    except Exception:
        text = ""
    lines = text.strip().splitlines()
    message = clipped(lines[0], _CAUSE_SHOWN) if lines else ""
    return f"stopped by {type(cause).__name__}" + (f": {message}" if message else "")


_CAUSE_SHOWN = 200
"""The most characters of an exception's message a stop note gives."""


def uncaught_at_exit() -> BaseException | None:
    """The uncaught exception that ends the script (Python keeps it as `sys.last_value` as it
    prints it, before the exit handlers run), else None. None in an interactive session too
    (the REPL, IPython), where it is an error shown earlier that ended nothing, and for one
    that did not come up through the script's top level (`sys.last_traceback`'s first frame has
    a caller): an error that ended nothing, kept there by what showed it (pytest keeps a failed
    test's, `code.InteractiveInterpreter` a command's)."""
    if hasattr(sys, "ps1") or sys.flags.interactive or "IPython" in sys.modules:
        return None
    uncaught = getattr(sys, "last_value", None)
    trace = getattr(sys, "last_traceback", None)
    if trace is None or trace.tb_frame.f_back is not None:
        return None
    return uncaught if isinstance(uncaught, BaseException) else None


@contextmanager
def warned_at_the_end() -> Iterator[None]:
    """A WriteError as the process ends is one warning line: no caller is left to raise it to."""
    try:
        yield
    except WriteError as error:
        warn(f"stabledrl: warning: {error}\n")
