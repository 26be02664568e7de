"""The one output sink: data (tables, JSON) to stdout, everything else to stderr."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from typing import Any

from rich.console import Console

from stabledrl_cli._json import json_safe

# Consoles resolve sys.stdout / sys.stderr at print time, so CliRunner captures them.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    """Progress bars only when stderr is a terminal (and never under CI)."""
    return sys.stderr.isatty() and not os.environ.get("CI")
