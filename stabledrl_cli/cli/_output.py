"""The one output sink: data (tables, JSON) to stdout, everything else to stderr."""

from __future__ import annotations

import json
import math
import os
import sys
from enum import Enum
from typing import Any

from rich.console import Console

# Consoles resolve sys.stdout / sys.stderr at print time, so CliRunner captures them.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


def _json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: they become null (the `nonfinite` flags carry the fact)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    """Progress bars only when stderr is a terminal (and never under CI)."""
    return sys.stderr.isatty() and not os.environ.get("CI")
