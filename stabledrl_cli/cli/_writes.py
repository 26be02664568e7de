"""A command's several outputs (`--out`, `--plot`, `--junit`, `--write-baseline`): each written
that can be, the ones that cannot ending the command with exit 4 after its results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stabledrl_cli.cli._output import err
from stabledrl_cli.errors import WriteError


def write_outputs(
    outputs: dict[str, tuple[str, Path | None, Callable[[Path], str]]],
) -> tuple[dict[str, Path | None], list[WriteError]]:
    """Writes each output asked for (name -> the option that asks for it, its path, None when
    not asked for, and its writer, which returns the line on stderr that says so): the paths
    written, None for the others, and the writes that failed, each named by its option (two
    reports to one full disk read apart). One that fails keeps no other from being written (a
    baseline on a full disk, the JUnit report of the gates beside it)."""
    wrote: dict[str, Path | None] = dict.fromkeys(outputs)
    failed: list[WriteError] = []
    for name, (option, path, write) in outputs.items():
        if path is None:
            continue
        try:
            err.print(write(path), highlight=False)
        except WriteError as exc:
            failed.append(WriteError(f"{option} {exc}"))
        else:
            wrote[name] = path
    return wrote, failed


def raise_unwritten(failed: list[WriteError]) -> None:
    """Ends the command with exit 4 on the last write that failed, one error line before it
    for each other; nothing when every output was written."""
    for other in failed[:-1]:
        err.print(f"error: {other}", highlight=False)
    if failed:
        raise failed[-1]
