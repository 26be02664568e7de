"""`stabledrl pack RUN OUT.h5`: the whole run in one HDF5 file that every command reads.

RUN is a path or an fsspec URL (`memory://`, `file://`, `s3://`...), read in place; OUT.h5 is a
local path.

Exit codes: 0 packed (a run with integrity findings is packed too: its readable steps, with the
findings carried into the archive and named on stderr; a run being recorded now, the steps
listed when the pack began, with a warning; a run directory with more than its manifest and
steps, such as checkpoints/, with a warning naming what the archive leaves out); 2 OUT exists
without --force, or is a directory or a name ending in / (which names one), or its directory is
missing, or it is inside the run's directory or another run's or is the archive packed (with
--force too), or OUT is a URL, or RUN is a URL that cannot be read (an unknown scheme, a missing
package, a chained or `reference://` URL); 3 a missing, non-run or unreadable RUN, or one with
no readable step (none recorded, or every one damaged: no archive written); 4 OUT could not be
written (a full disk, a name longer than the file system takes); 143 stopped by SIGTERM (as by
Ctrl-C, 130: the temporary file is removed, OUT is as it was).
"""

from __future__ import annotations

from typing import Annotated

import typer

from stabledrl_cli._url import redacted
from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._local import local_output
from stabledrl_cli.cli._options import FormatOpt, RunSourceArg
from stabledrl_cli.cli._output import (
    err,
    is_standard_output,
    out,
    print_json,
    progress,
    refuse_standard_error,
)
from stabledrl_cli.cli._signals import stopped_by_sigterm
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.dump._schema import GRAM_KEY
from stabledrl_cli.dump._versions import FORMAT_VERSION
from stabledrl_cli.errors import UsageError, counted, quoted
from stabledrl_cli.vocab import PackCompression

UNKNOWN_SHOWN = 10
"""Names of arrays the archive leaves out that pack's warning shows (a step holds up to 1,000)."""


def command(
    run: RunSourceArg,
    archive: Annotated[
        str,
        typer.Argument(
            help="The .h5 file to write, a local path.", show_default=False, metavar="OUT.h5"
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    compression: Annotated[
        PackCompression,
        typer.Option(
            "--compression",
            help="fast: compress only the fields a deflate halves (masks, ids, advantages "
            "repeated per token), so replay reads the archive near the directory's speed; "
            "small: gzip on every field (with shuffle where it helps), the smallest file "
            "(log-probabilities shrink by a fifth), about 2.5x slower to read than fast.",
        ),
    ] = "fast",
    output_format: FormatOpt = "table",
) -> None:
    """Pack a run (a path or a URL) into one HDF5 file (chunked, checksummed, compressed);
    open_run, replay and check read it."""
    local_output(archive, "pack", "OUT.h5")  # not a URL, not empty
    opened = open_snapshot(run)  # its manifest: a missing run is named first
    # The writer (h5py) loads once the run is there: a missing one is refused without it.
    from stabledrl_cli.dump._packer import check_pack_target, pack_run

    # Before any step is read; from the name as given: a trailing / names a directory.
    target = check_pack_target(archive, opened, force, to_force="pass --force")
    # An archive piped on (`pack RUN /dev/stdout --force | ...`): its summary goes to stderr.
    piped = is_standard_output(target)
    refuse_standard_error(target, str(archive))
    if piped and output_format == "json":
        raise UsageError(
            f"{archive} is the standard output, where --format json prints the summary; "
            "give a file name, or drop --format json (the summary then goes to stderr)"
        )
    listed = opened.listed_whole_step_numbers  # what is packed, and the bar's total
    with stopped_by_sigterm(), progress("packing", len(listed)) as advance:
        summary = pack_run(
            opened, target, force=force, progress=advance, compression=compression, listed=listed
        )
    note_live(summary.live, run, "the archive holds", "pack")
    if summary.left_out:
        branch = " (stabledrl branch reads checkpoints/ there)"
        branch = branch if "checkpoints/" in summary.left_out else ""
        err.print(
            f"warning: {redacted(run)}: the archive holds its manifest and steps, not "
            f"{', '.join(summary.left_out)} ({sum(summary.left_out.values()) / 1e6:.2f} MB): "
            f"keep the run directory for them{branch}",
            highlight=False,
        )
    if summary.unknown_fields:
        unknown = summary.unknown_fields
        names = ", ".join(map(quoted, unknown[:UNKNOWN_SHOWN]))
        names += f" and {len(unknown) - UNKNOWN_SHOWN} more" if len(unknown) > UNKNOWN_SHOWN else ""
        err.print(
            f"warning: {redacted(run)}: its steps hold {counted(len(unknown), 'array')} "
            f"that run format {FORMAT_VERSION}, the newest this stabledrl reads, does not name "
            f"({names}: a newer version's fields); the archive leaves them out: pack the run "
            "with the stabledrl that recorded it to keep them",
            highlight=False,
        )
    for name, steps in summary.unjoined_geometry.items():
        what = (
            f"its ranks' Gram matrices ({name}, {counted(steps, 'step')}) do not combine"
            if name == GRAM_KEY
            else f"its ranks' sketches ({name}, {counted(steps, 'step')}) do not join (only "
            "some ranks recorded one, or with other seeds or widths k)"
        )
        err.print(
            f"warning: {redacted(run)}: {what}; the archive leaves them out, as replay does",
            highlight=False,
        )
    if summary.findings:
        kinds = sorted({f.kind for f in summary.findings})
        err.print(
            f"warning: {redacted(run)} has {len(summary.findings)} integrity finding(s) "
            f"({', '.join(kinds)}); packed its {summary.steps} readable steps"
            + (f", left out {summary.damaged_steps} damaged" if summary.damaged_steps else "")
            + " and carried the findings into the archive (stabledrl inspect shows them)",
            highlight=False,
        )
    if output_format == "json":
        print_json(summary.to_dict())
        return
    change = _size_change(summary.source_bytes, summary.archive_bytes)
    # no token: steps of scalars only (a batch holds at least one), an imported log say
    held = counted(summary.tokens, opened.unit) if summary.tokens else "scalars only"
    if summary.damaged_steps:
        held += f"; {summary.damaged_steps} damaged left out"
    (err if piped else out).print(
        f"packed {counted(summary.steps, 'step')} ({held}) of "
        f"{summary.source} into "
        f"{summary.out}: {summary.source_bytes / 1e6:.2f} MB -> "
        f"{summary.archive_bytes / 1e6:.2f} MB ({change})",
        highlight=False,
        soft_wrap=False,  # wrapped at the terminal's width, as import's lines are
    )


def _size_change(source_bytes: int, archive_bytes: int) -> str:
    """How the archive's size compares with the run's: `3.1x smaller`, `9.4x larger`, `110x
    larger`, `1.5% larger` under 1.1x (`1x` hid the change; `under 0.01% larger`), `same size`
    (a ratio alone read both ways: 0.11x said an archive nine times the run's size)."""
    if source_bytes == archive_bytes:
        return "same size"
    if not source_bytes or not archive_bytes:
        return "n/a"
    if 10 * abs(archive_bytes - source_bytes) < source_bytes:
        change = 100 * abs(archive_bytes - source_bytes) / source_bytes
        shown = f"{change:.2g}%" if change >= 0.01 else "under 0.01%"  # never 5e-07%
        return f"{shown} {'smaller' if archive_bytes < source_bytes else 'larger'}"
    if archive_bytes < source_bytes:
        return f"{_times(source_bytes / archive_bytes)} smaller"
    return f"{_times(archive_bytes / source_bytes)} larger"


def _times(ratio: float) -> str:
    """`ratio` (>= 1) as `3.1x` or `110x`: two significant digits below 10, never 1.1e+02x."""
    return f"{ratio:.2g}x" if ratio < 10 else f"{ratio:.0f}x"
