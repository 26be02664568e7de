"""The Typer app: one factory for shared settings, one registry of commands, one error map.

A command's module is imported only when that command runs (or its own help is asked for):
the root help lists each command from its registry entry, so `stabledrl --help` imports
neither torch nor any command module. A new command is one file + one line in `COMMANDS`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
import typer.main
from rich.markup import escape
from typer._click import Context, HelpFormatter, Parameter
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperCommand, TyperGroup

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli._version import __version__
from stabledrl_cli.cli import _help
from stabledrl_cli.cli._output import err, silence_broken_stderr, silence_stdout, writing_again
from stabledrl_cli.cli._signals import lost_stops_delivered_again
from stabledrl_cli.errors import DEBUG_ENV, exit_code_for


@dataclass(frozen=True)
class CommandEntry:
    """One command: the module that defines its `command` function, and its one-line help."""

    module: str
    """Module exposing `command` (a Typer command function)."""
    summary: str
    """The command's line in `stabledrl --help` (and its short help everywhere)."""
    examples: tuple[str, ...] = ()
    """Command lines shown under `Examples` in the command's help."""


COMMANDS: dict[str, CommandEntry] = {
    "record": CommandEntry(
        "stabledrl_cli.cli.record",
        "Train and record the built-in example, or record -- CMD.",
        (
            "stabledrl record --out runs/demo --rl-steps 160 --checkpoint-every 40 --force",
            "stabledrl record --out runs/mine --policy dapo -- python train.py",
        ),
    ),
    "import": CommandEntry(
        "stabledrl_cli.cli.import_",
        "Import a log: trainer_state, JSONL, CSV, TensorBoard, W&B, verl.",
        (
            "stabledrl import outputs/trainer_state.json --out runs/logged",
            "stabledrl import runs/tb/ --out runs/tb-run --format json",
        ),
    ),
    "inspect": CommandEntry(
        "stabledrl_cli.cli.inspect",
        "What a run holds: steps, fields, integrity, collapse.",
        ("stabledrl inspect runs/demo", "stabledrl inspect runs/demo.h5 --format json"),
    ),
    "policies": CommandEntry(
        "stabledrl_cli.cli.policies",
        "The policy catalogue, or resolve specs given with -p.",
        ("stabledrl policies", "stabledrl policies -p dapo -p two-sided:delta=4 --format json"),
    ),
    "replay": CommandEntry(
        "stabledrl_cli.cli.replay",
        "Replay a run through policies: what each would have done.",
        (
            "stabledrl replay runs/demo",
            "stabledrl replay runs/demo -p grpo -p dapo --steps 100:200 --plot replay.png",
        ),
    ),
    "tune": CommandEntry(
        "stabledrl_cli.cli.tune",
        "Sweep clip settings over a run: discarded gradient vs risk.",
        (
            "stabledrl tune runs/demo -p 'dapo:eps_high=0.2..0.5:8'",
            "stabledrl tune runs/demo -p 'stabledrl:c=1.5..20:log8' --plot front.png",
        ),
    ),
    "pack": CommandEntry(
        "stabledrl_cli.cli.pack",
        "Pack a run into one HDF5 archive.",
        ("stabledrl pack runs/demo runs/demo.h5 && stabledrl replay runs/demo.h5",),
    ),
    "branch": CommandEntry(
        "stabledrl_cli.cli.branch",
        "Re-train from a checkpoint under each policy: did it collapse?",
        (
            "stabledrl record --out runs/demo --rl-steps 160 --checkpoint-every 40 --force",
            "stabledrl branch runs/demo --at 80 -p grpo -p stabledrl --format json",
        ),
    ),
    "check": CommandEntry(
        "stabledrl_cli.cli.check",
        "Gate a run in CI against rules or a baseline (exit 1).",
        (
            "stabledrl check runs/demo -p grpo --max-collapsed 0 --junit check.xml",
            "stabledrl check runs/demo --write-baseline base.json  # then: -b base.json",
        ),
    ),
    "diff": CommandEntry(
        "stabledrl_cli.cli.diff",
        "Where two runs first part: inputs, log-probs, scalars.",
        (
            "stabledrl diff runs/before runs/after",
            "stabledrl diff runs/demo runs/resumed --until 120 --format json",
        ),
    ),
    "watch": CommandEntry(
        "stabledrl_cli.cli.watch",
        "Follow a run while it is written; --once for cron or CI.",
        (
            "stabledrl watch runs/demo",
            "stabledrl watch runs/demo --once --max-collapsed 0",
        ),
    ),
}

ROOT_EXAMPLES = (
    "stabledrl record --out runs/demo --force",
    "stabledrl replay runs/demo",
    "stabledrl check runs/demo --max-collapsed 0",
)
"""Shown under `Examples` in `stabledrl --help`."""

# A reader that closed our stdout (`| head`): exit quietly, as a process killed by SIGPIPE.
BROKEN_PIPE = SIGNALLED + signal.SIGPIPE  # 141
_DEBUG_FLAG = "--debug"
_DEBUG_KEY = "stabledrl.debug"
_SEPARATOR_KEY = "stabledrl.separator"


_PYDANTIC_PREFIX = ": Value error, "
"""What pydantic puts before a ValueError's text, which typer's choice options raise."""


def usage_message(exc: UsageError) -> str:
    """A command line's error in one line, with where its help is (click prints three)."""
    where = exc.ctx.command_path if exc.ctx is not None else "stabledrl"
    message = exc.format_message().replace(_PYDANTIC_PREFIX, ": ", 1)
    return f"{message} ({where} -h for help)"


@contextmanager
def mapped_errors(debug: bool) -> Iterator[None]:
    """Turns any error into one stderr line and its exit code (`debug`: the traceback in place
    of the line, with the same exit code, so a debug run of a CI job fails as it would)."""
    try:
        yield
    except NoArgsIsHelpError:  # the help, which click prints
        raise
    except UsageError as exc:  # click's, from parsing a command line: one line too
        err.print(f"[bold red]error:[/] {escape(usage_message(exc))}", highlight=False, markup=True)
        raise typer.Exit(exc.exit_code) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except BrokenPipeError:
        silence_stdout()
        silence_broken_stderr()
        raise typer.Exit(BROKEN_PIPE) from None
    except (Exception, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):
            writing_again()
        code, message = exit_code_for(exc)
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        else:
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
        raise typer.Exit(code) from None


def debug_requested(ctx: Context) -> bool:
    """Whether `--debug` or STABLEDRL_DEBUG asks for tracebacks in place of error lines."""
    return bool(ctx.meta.get(_DEBUG_KEY)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def after_separator(ctx: Context) -> list[str] | None:
    """The arguments after the command line's bare `--` (`record --out R -- CMD`), [] for a
    `--` with nothing after it; None without one."""
    after: list[str] | None = ctx.meta.get(_SEPARATOR_KEY)
    return after


def _hoist_debug(args: Sequence[str]) -> list[str]:
    """`--debug` anywhere before a bare `--` moves to the front, where the root parses it."""
    end = args.index("--") if "--" in args else len(args)
    found = [a for a in args[:end] if a == _DEBUG_FLAG]
    rest = [a for a in args[:end] if a != _DEBUG_FLAG]
    return found[:1] + rest + list(args[end:])


class Command(TyperCommand):
    """A command whose help fits the terminal (`_help`): readable metavars, flags without a
    type, options grouped by panel, the registry's examples last."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        params = super().get_params(ctx)
        _help.prepare_params(params)
        return params

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        try:
            parsed: list[str] = super().parse_args(ctx, args)
        except UsageError as exc:  # click's parser leaves some ("requires an argument") unplaced
            exc.ctx = exc.ctx or ctx  # so its line names this command's help
            raise
        return parsed

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        return _help.usage_pieces(ctx, self.get_params(ctx))

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _help.format_params(ctx, self.get_params(ctx), formatter)

    def format_epilog(self, ctx: Context, formatter: HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        entry = COMMANDS.get(self.name or "")
        _help.format_examples(entry.examples if entry else (), formatter)


_loaded: dict[str, Command] = {}


def load_command(name: str) -> Command:
    """Imports the command's module and builds its click command (once)."""
    if name not in _loaded:
        entry = COMMANDS[name]
        function = importlib.import_module(entry.module).command
        single = typer.Typer(add_completion=False, rich_markup_mode=None)
        single.command(name, cls=Command, short_help=entry.summary)(function)
        command = typer.main.get_command(single)
        assert isinstance(command, Command)  # one command, built with cls=Command
        _loaded[name] = command
    return _loaded[name]


class LazyGroup(TyperGroup):
    """The root: lists commands from `COMMANDS`, imports one only to run it or show its help;
    hoists `--debug` from anywhere on the line; maps errors to exit codes."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for name, entry in COMMANDS.items():
            self.commands[name] = _loaded.get(name) or TyperCommand(
                name, short_help=entry.summary, help=entry.summary
            )

    def get_params(self, ctx: Context) -> list[Parameter]:
        params = super().get_params(ctx)
        _help.prepare_params(params)
        return params

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _help.format_params(ctx, self.get_params(ctx), formatter)
        _help.format_commands(
            [(name, entry.summary) for name, entry in COMMANDS.items()], formatter
        )

    def format_epilog(self, ctx: Context, formatter: HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        _help.format_examples(ROOT_EXAMPLES, formatter)

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:  # type: ignore[override]
        hoisted = _hoist_debug(args)
        ctx.meta[_DEBUG_KEY] = _DEBUG_FLAG in hoisted[:1]
        ctx.meta[_SEPARATOR_KEY] = hoisted[hoisted.index("--") + 1 :] if "--" in hoisted else None
        with mapped_errors(debug=False):
            result: list[str] = super().parse_args(ctx, hoisted)
        return result

    def resolve_command(  # type: ignore[override]
        self, ctx: typer.Context, args: list[str]
    ) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if name in COMMANDS:
            command = load_command(name)
        return name, command, rest

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        # A Ctrl-C that Python swallowed in a finalizer is raised again, so it still stops
        with mapped_errors(debug_requested(ctx)), lost_stops_delivered_again():
            return super().invoke(ctx)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"stabledrl {__version__}")
        raise typer.Exit()


def create_app() -> typer.Typer:
    """The `stabledrl` app: shared settings, the lazy command group, root options."""
    app = typer.Typer(
        name="stabledrl",
        cls=LazyGroup,
        help="Flight recorder and what-if simulator for RL training of (diffusion) LMs.\n\n"
        "Record a run (stabledrl record), replay it through a catalogue of clipping and "
        "normalization policies (stabledrl replay), gate it in CI (stabledrl check).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,
        rich_markup_mode=None,
        context_settings={
            "help_option_names": ["-h", "--help"],
            "max_content_width": _help.HELP_MAX_WIDTH,
        },
    )

    @app.callback()
    def _root(
        debug: Annotated[
            bool,
            typer.Option(
                _DEBUG_FLAG,
                help="Show tracebacks instead of one-line errors (anywhere on the line before a "
                "bare --).",
            ),
        ] = False,
        version: Annotated[
            bool,
            typer.Option(
                "--version",
                callback=_show_version,
                is_eager=True,
                help="Print the version and exit.",
            ),
        ] = False,
    ) -> None:
        """The root options; the debug switch is read by `LazyGroup` (see `_hoist_debug`)."""

    return app


app = create_app()


def main() -> None:
    """The `stabledrl` console script."""
    try:
        app(prog_name="stabledrl")
    except SystemExit as exc:
        sys.exit(exc.code)
