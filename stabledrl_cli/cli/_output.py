"""The one output sink: data (tables, JSON) to stdout, everything else to stderr."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.segment import Segment
from rich.text import Text

from stabledrl_cli._atomic import write_error
from stabledrl_cli.errors import LINE_BREAKS, UsageError

# Piped or redirected tables keep their natural width up to this, instead of wrapping at 80.
PIPE_WIDTH = 250

ESCAPED_CONTROLS = {
    code: f"\\x{code:02x}"
    for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))
    if chr(code) not in "\t\n"
}
"""Control characters a console prints escaped (ESC as \\x1b): text from a run (a manifest's
note, a scalar's name) never moves the cursor, clears, retitles or recolours the terminal."""

_LINE_END_PADDING = re.compile(r" +((?:\x1b\[[0-9;]*m)*)(?=\n)")
"""Spaces that end a line, before its closing style codes: rich pads a table's last column and
leaves the space a wrap broke at."""


def plain_text(text: str, *, wrapped: bool = False) -> Text:
    """`text` as a rich Text, its control characters escaped (`ESCAPED_CONTROLS`): a Text
    goes to the console as it is, past `_LiveConsole.render_str`'s escaping. `wrapped`: it
    wraps at the console's width even on a soft-wrapping console, where a live display would
    crop it."""
    if wrapped:
        return Text(text.translate(ESCAPED_CONTROLS), no_wrap=False, overflow="fold")
    return Text(text.translate(ESCAPED_CONTROLS))


class _LiveConsole(Console):
    """A console that takes its width from COLUMNS (or the terminal) when it prints, not when
    it is made: rich reads COLUMNS once at construction, and the CLI's consoles are made at
    import, before a caller (a test runner, an embedding program) may set it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.is_jupyter:  # rich sizes a notebook's output once, on purpose
            self._width = kwargs.get("width")

    def on_broken_pipe(self) -> None:
        """A reader closed the stream (`| head`; `2>&1 | head` for stderr): the CLI's error
        map exits quietly (141), not rich, whose SystemExit(1) would read as a tripped gate."""
        self.quiet = True
        raise BrokenPipeError

    def render_str(self, text: str, **kwargs: Any) -> Text:
        """Every string printed (table cells and titles too) with its control characters
        escaped (`ESCAPED_CONTROLS`); rich's own styling is added after, not escaped."""
        return super().render_str(text.translate(ESCAPED_CONTROLS), **kwargs)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        """What a print writes, no line of it ending in spaces (`_LINE_END_PADDING`): output
        piped to a file or compared with `diff` carries no invisible padding."""
        return _LINE_END_PADDING.sub(r"\1", super()._render_buffer(buffer))


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush cannot fail again."""
    _to_devnull(sys.stdout)


def silence_broken_stderr() -> None:
    """Point stderr at /dev/null when its reader is gone (`2>&1 | head`): what its buffer
    still holds would fail the interpreter's last flush, which exits 120, not 141."""
    try:
        sys.stderr.flush()
    except OSError:
        _to_devnull(sys.stderr)
    except (AttributeError, ValueError):  # no stderr, or a closed one
        pass


def _to_devnull(stream: Any) -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. under CliRunner)
        pass


def is_standard_output(path: Path) -> bool:
    """Whether writing the file at `path` writes this process's stdout: /dev/stdout, or the
    file or pipe stdout goes to under any name; never /dev/null, where any number of outputs
    may go. False under a stdout that is no file (CliRunner's)."""
    return _is_stream(path, sys.stdout)


def refuse_standard_error(path: Path, named: str) -> None:
    """UsageError when writing the file at `path` (given as `named`) writes this process's
    stderr (`is_standard_output` of it), where progress and warnings go among its bytes."""
    if _is_stream(path, sys.stderr):
        raise UsageError(
            f"{named} is the standard error, where progress and warnings are printed; "
            "give a file name"
        )


def _is_stream(path: Path, stream: Any) -> bool:
    """Whether writing the file at `path` writes `stream` (never /dev/null)."""
    try:
        target = os.stat(path)
        written = os.fstat(stream.fileno())
        discarded = os.stat(os.devnull)
    except (AttributeError, OSError, ValueError):
        return False
    return os.path.samestat(target, written) and not os.path.samestat(target, discarded)


@contextmanager
def stdout_written() -> Iterator[None]:
    """Writes to stdout in the block: one the system refuses (`> out.json` on a full disk) is
    an output not written, a WriteError naming stdout (exit 4), not a bug; a reader gone
    (BrokenPipeError) is left to the error map (exit 141), and so is a stdout closed before
    the command started (`>&-`: Python's sys.stdout is None), whose data went nowhere."""
    if sys.stdout is None:
        raise BrokenPipeError
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.filename is not None:
            raise
        silence_stdout()
        raise write_error(Path("stdout"), exc) from None


class _DataConsole(_LiveConsole):
    """stdout: when it is not a terminal and COLUMNS is unset, tables are not squeezed to 80;
    a write the system refuses is a WriteError (`stdout_written`)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        with stdout_written():
            super().print(*objects, **kwargs)

    @property  # type: ignore[misc]  # read-only here: nothing sets a data console's size
    def size(self) -> ConsoleDimensions:
        size = super().size
        if not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)
        return size


class _LineConsole(_LiveConsole):
    """stderr: every string printed is one line, its line breaks escaped too (`LINE_BREAKS`):
    a run path or value holding a newline (`no such run: /tmp/nl\\nzz`) never splits an error,
    warning or note across lines, nor starts a line of its own. (A table's rows are lines of
    their own; a line break inside a cell shows escaped.)"""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(text.translate(LINE_BREAKS), **kwargs)


# Consoles resolve sys.stdout / sys.stderr at print time, so CliRunner captures them. Strings
# are text, never rich markup nor emoji codes: they carry paths, specs and recorded names
# ("runs/lr[1e-5]", "[/x]" would be eaten or crash, "a:x:b" would print an emoji); the few
# styled lines pass markup=True and escape the rest (rich's escape leaves emoji codes alone).
out = _DataConsole(soft_wrap=True, markup=False, emoji=False)
err = _LineConsole(stderr=True, soft_wrap=True, markup=False, emoji=False)


def writing_again() -> None:
    """Makes the CLI's consoles write again after a stop (Ctrl-C, SIGTERM) that a print was cut
    by: one raised as rich entered or left its buffer (a signal's handler runs at any call)
    leaves the buffer's depth a step too deep, and every later line (the watch's last view,
    `stopped (N steps seen)`, `error: interrupted`) would stay buffered, never written. Called
    outside any print, where the depth is 0: what was buffered is written with the next line."""
    for console in (out, err):
        console._buffer_index = 0


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (numpy and non-finite values made JSON-safe)."""
    # Imported here: json_safe imports numpy (~50 ms), which `--help` and tables never need.
    from stabledrl_cli._json import json_safe

    with stdout_written():
        sys.stdout.write(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
        sys.stdout.flush()


def progress_enabled() -> bool:
    """Progress bars only when stderr is a terminal (and never under CI); a stderr closed as
    the command started (`2>&-`: Python's sys.stderr None) is none, its lines dropped."""
    return sys.stderr is not None and sys.stderr.isatty() and not os.environ.get("CI")


class ProgressLines:
    """Progress where no bar is drawn (no terminal, CI): a short stderr line each time the
    work crosses a tenth of its total, and at least every `every_seconds` while it runs, so a
    CI log shows life at a bounded rate (at most ten lines plus one per interval)."""

    def __init__(self, what: str, total: int, every_seconds: float = 30.0) -> None:
        self.what, self.total, self.every_seconds = what, max(total, 1), every_seconds
        self._tenths = 0
        self._last = time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        """`done` of `total` units finished (past it, the total grows to it: work that found
        more than it counted at its start, a run that grew as it was read); `note` is appended
        (e.g. "reward 0.61")."""
        self.total = max(self.total, done)
        tenths = min(10, done * 10 // self.total)
        now = time.monotonic()
        if tenths <= self._tenths and now - self._last < self.every_seconds:
            return
        self._tenths, self._last = max(tenths, self._tenths), now
        detail = f", {note}" if note else ""
        err.print(
            f"{self.what}: {done}/{self.total} ({100 * done // self.total}%){detail}",
            highlight=False,
        )


Advance = Callable[[int], None]
"""Reports `n` more units of work done."""


@contextmanager
def progress(what: str, total: int | None, *, complete: bool = False) -> Iterator[Advance]:
    """Progress of `total` units of work (None: unknown) while the block runs; yields `advance`.
    With `complete`, the units not reported when the block ends normally count as done (units
    the work skipped: a step file a reader found damaged, say).

    In a terminal: a bar on stderr (a spinner when `total` is unknown), gone when done, its
    total raised to the units done should they pass it (as `ProgressLines`'). Without
    one (a pipe, CI): `ProgressLines`, a short stderr line per tenth and at least every 30 s
    (nothing when `total` is unknown: there is no fraction to report).
    """
    if complete and total is not None:
        with progress(what, total) as report:
            reported = 0

            def counted(n: int) -> None:
                nonlocal reported
                reported += n
                report(n)

            yield counted
            if reported < total:
                report(total - reported)
        return
    if progress_enabled():
        columns = (
            (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeRemainingColumn())
            if total is not None
            else (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        )  # fmt: skip
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(what, total=total)
            shown = 0

            def step(n: int) -> None:
                nonlocal shown
                shown += n
                grown = None if total is None else max(total, shown)  # None: left as it is
                bar.update(task, completed=shown, total=grown)

            yield step
        return
    if total is None:
        yield lambda n: None
        return
    lines = ProgressLines(what, total)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        lines.update(done)

    yield advance
