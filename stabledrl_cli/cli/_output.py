"""The one output sink: data (tables, JSON) to stdout, everything else to stderr."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Any

from rich.console import Console, ConsoleDimensions

# Piped or redirected tables keep their natural width up to this, instead of wrapping at 80.
PIPE_WIDTH = 250


class _DataConsole(Console):
    """stdout: when it is not a terminal and COLUMNS is unset, tables are not squeezed to 80."""

    @property  # type: ignore[misc]  # read-only here: nothing sets a data console's size
    def size(self) -> ConsoleDimensions:
        size = super().size
        if not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(max(size.width, PIPE_WIDTH), size.height)
        return size

    def on_broken_pipe(self) -> None:
        """A reader closed stdout (`| head`): the CLI's error map exits quietly, not rich."""
        self.quiet = True
        raise BrokenPipeError


# Consoles resolve sys.stdout / sys.stderr at print time, so CliRunner captures them.
out = _DataConsole(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, Enum):
    """Deprecated: `--format` is `vocab.OutputFormat` (plain strings) now; kept only until
    check, inspect and replay default to "table" instead of `OutputFormat.table`."""

    table = "table"
    json = "json"


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (numpy and non-finite values made JSON-safe)."""
    # Imported here: json_safe imports numpy (~50 ms), which `--help` and tables never need.
    from stabledrl_cli._json import json_safe

    sys.stdout.write(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    """Progress bars only when stderr is a terminal (and never under CI)."""
    return sys.stderr.isatty() and not os.environ.get("CI")
