"""A benchmark's optional extra: without it, one line naming its install command (exit 2),
as a stabledrl command says, instead of a traceback once the work has started."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from stabledrl_cli.errors import MissingExtraError, install_command


def require_extra(extra: str, *modules: str) -> None:
    """Exits 2 with one `error:` line on stderr when one of `modules`, which the extra named
    `extra` installs, cannot be imported."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            script = Path(sys.argv[0]).name
            print(
                f"error: {script} needs {module}, which is not installed: {install_command(extra)}",
                file=sys.stderr,
            )
            raise SystemExit(MissingExtraError.exit_code) from None
