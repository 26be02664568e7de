"""The Typer app: one factory for shared settings, one registry of commands, one error map."""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.markup import escape

from stabledrl_cli.cli._output import err
from stabledrl_cli.errors import StabledrlError

# name -> module under stabledrl_cli.cli exposing `command`. A new command is one file + one line.
COMMANDS: dict[str, str] = {
    "record": "record",
    "inspect": "inspect",
    "policies": "policies",
    "replay": "replay",
    "pack": "pack",
    "check": "check",
}


def _debug() -> bool:
    return os.environ.get("STABLEDRL_DEBUG", "") not in ("", "0")


# An unexpected exception is a bug of the tool, not a tripped gate (1) nor bad input (3).
INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h)


def _exit_code_for(exc: BaseException) -> tuple[int, str]:
    """The ordered error map: domain errors first, then the OS's, then anything else."""
    if isinstance(exc, StabledrlError):
        return exc.exit_code, str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return 3, f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return INTERNAL_ERROR, (
        f"internal error: {type(exc).__name__}: {exc} (a bug: rerun with --debug for the "
        "traceback, and please report it)"
    )


def _mapped(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turns domain errors into one stderr line and an exit code, for CliRunner and the shell."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if _debug():
                raise
            code, message = _exit_code_for(exc)
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
            raise typer.Exit(code) from None

    return wrapper


def create_app() -> typer.Typer:
    app = typer.Typer(
        name="stabledrl",
        help="Flight recorder and what-if simulator for RL training of (diffusion) LMs.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        debug: Annotated[
            bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
        ] = False,
    ) -> None:
        if debug:
            os.environ["STABLEDRL_DEBUG"] = "1"

    for name, module in COMMANDS.items():
        command = importlib.import_module(f"stabledrl_cli.cli.{module}").command
        app.command(name)(_mapped(command))
    return app


app = create_app()


def main() -> None:
    try:
        app(prog_name="stabledrl")
    except SystemExit as exc:
        sys.exit(exc.code)
