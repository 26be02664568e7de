"""Help pages in the style of ruff and pytest: plain text wrapped to the terminal, so no option
name is ever cut; readable metavars (INT, FLOAT, PATH, a|b|c) instead of `<list[str]>`; flags
without a type; options grouped under their panel (`rich_help_panel`); usage examples last.

The app's commands call these from their `format_*` hooks (`cli.app.Command`, `LazyGroup`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from typer._click import Context, HelpFormatter, Parameter
from typer.core import TyperArgument, TyperOption

HELP_MAX_WIDTH = 120
"""Help wraps at the terminal width, but never wider than this (long lines read badly)."""
OPTIONS_PANEL = "Options"
_UNBREAKABLE = {" ": "\u00a0", "-": "\u2011"}
"""Characters a wrap breaks at, and the look-alikes it does not break at (no-break space,
non-breaking hyphen)."""
_CLOSING_NOTE = re.compile(r"\[[^\[\]]*\]$")
"""The note click ends an option's help with: `[default: table]`, `[required]`, `[x>=0]`."""


_BARE_TYPES = {"int": "INT", "float": "FLOAT", "str": "TEXT", "bool": "BOOL"}


def type_metavar(param: TyperOption | TyperArgument) -> str:
    """A readable placeholder for one value of `param` (choices spelled out)."""
    desc = param.type_descriptor
    if desc.choices is not None:
        return "|".join(str(choice) for choice in desc.choices)
    if desc.is_path:
        return {"directory": "DIR", "file": "FILE"}.get(desc.path_type, "PATH")
    bare = param.bare_type().removeprefix("list[").removesuffix("]")
    return _BARE_TYPES.get(bare, bare.upper())


def prepare_params(params: Iterable[Parameter]) -> None:
    """Flags take no value (no type beside them); every other parameter without a metavar gets
    a readable one: an argument its name in capitals, an option its type's placeholder."""
    for param in params:
        if param.metavar is not None:
            continue
        if isinstance(param, TyperOption) and (param.is_flag or param.count):
            param.metavar = ""
        elif isinstance(param, TyperArgument):
            param.metavar = (param.name or "arg").upper()
        elif isinstance(param, TyperOption):
            param.metavar = type_metavar(param)


def argument_usage(param: TyperArgument) -> str:
    """`RUN`, `[RUN]` when optional, `...` when it takes several values."""
    name = param.metavar or (param.name or "arg").upper()
    if param.nargs != 1 and not name.endswith("..."):
        name += "..."
    return name if param.required else f"[{name}]"


def usage_pieces(ctx: Context, params: Sequence[Parameter]) -> list[str]:
    """The usage line after the command's name: `[OPTIONS]`, then each argument."""
    pieces = ["[OPTIONS]"] if any(isinstance(p, TyperOption) for p in params) else []
    return pieces + [argument_usage(p) for p in params if isinstance(p, TyperArgument)]


def _argument_record(param: TyperArgument) -> tuple[str, str]:
    help_text = getattr(param, "help", None) or ""
    return param.metavar or (param.name or "arg").upper(), help_text


def write_records(formatter: HelpFormatter, records: Sequence[tuple[str, str]]) -> None:
    """`formatter.write_dl(records)`, each help's closing note kept whole on one line (wrapped
    as one word, never `[default:` at a line's end and `table]` under it)."""
    start = len(formatter.buffer)
    whole = str.maketrans(_UNBREAKABLE)
    formatter.write_dl(
        [
            (name, _CLOSING_NOTE.sub(lambda note: note[0].translate(whole), text))
            for name, text in records
        ]
    )
    back = str.maketrans({kept: char for char, kept in _UNBREAKABLE.items()})
    formatter.buffer[start:] = [piece.translate(back) for piece in formatter.buffer[start:]]


def format_params(ctx: Context, params: Sequence[Parameter], formatter: HelpFormatter) -> None:
    """An `Arguments` section, then one section per panel (the unpanelled ones: `Options`),
    each a two-column list that wraps its help and puts it under a long name."""
    arguments = [_argument_record(p) for p in params if isinstance(p, TyperArgument)]
    panels: dict[str, list[tuple[str, str]]] = {OPTIONS_PANEL: []}
    for param in params:
        record = param.get_help_record(ctx) if isinstance(param, TyperOption) else None
        if record is not None:
            panel = getattr(param, "rich_help_panel", None) or OPTIONS_PANEL
            panels.setdefault(panel, []).append(record)
    if arguments:
        with formatter.section("Arguments"):
            write_records(formatter, arguments)
    for panel, records in panels.items():
        if records:
            with formatter.section(panel):
                write_records(formatter, records)


def format_commands(commands: Sequence[tuple[str, str]], formatter: HelpFormatter) -> None:
    """The `Commands` section: each name with its whole summary (wrapped, never cut)."""
    if commands:
        with formatter.section("Commands"):
            formatter.write_dl(list(commands))


def format_examples(examples: Sequence[str], formatter: HelpFormatter) -> None:
    """The `Examples` section: each command line as written (never rewrapped)."""
    if examples:
        with formatter.section("Examples"):
            for example in examples:
                formatter.write(f"{'':>{formatter.current_indent}}{example}\n")
