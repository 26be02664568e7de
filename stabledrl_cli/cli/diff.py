"""`stabledrl diff RUN_A RUN_B`: where two runs first part (docs/diff.md).

Exit codes: 0 the runs do not part before --until (identical, within tolerance, or parting
only at or after it; without --until, they never part); 1 they part before --until (without
it: at all); 2 usage error (a negative tolerance or context, a URL that cannot be read at all);
3 a missing or corrupt run (or a URL with nothing there), or two runs that share no readable
step. Each run is a path or an fsspec URL.
"""

from __future__ import annotations

import textwrap
import warnings
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._option_names import option_names
from stabledrl_cli.cli._options import RUN_SOURCE_HELP, DeviceOpt, FormatOpt, number_option
from stabledrl_cli.cli._output import err, out, plain_text, print_json
from stabledrl_cli.dump import RunIntegrityWarning
from stabledrl_cli.dump._live import live_read
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.errors import counted
from stabledrl_cli.replay._format import format_cell
from stabledrl_cli.replay.config import SPIKE_MIN_HISTORY, ReplayConfig
from stabledrl_cli.replay.diff.result import DiffResult, Parting
from stabledrl_cli.replay.diff.runs import DEFAULT_ATOL, DEFAULT_CONTEXT, DEFAULT_RTOL, diff_runs
from stabledrl_cli.tables import print_fitted
from stabledrl_cli.vocab import DiffKind

KIND_NAMES: dict[DiffKind, str] = {
    "arrays": "arrays",
    "inputs": "inputs",
    "logprobs": "log-probs",
    "scalars": "scalars",
}


MIN_WRAP = 40
"""Columns a line is wrapped to at the least (past its indent), however narrow the width."""
RANGES_SHOWN = 8
"""Ranges of steps in one run only listed in the table (the JSON has them all)."""


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges[:RANGES_SHOWN])
    rest = len(ranges) - RANGES_SHOWN
    return f"{shown} (+{rest} more: --format json has them all)" if rest > 0 else shown


def _parting_lines(name: str, parting: Parting | None, compared: int, holds: str) -> list[str]:
    """The kind's line and its fields; `arrays` (bits) *differ*, the other kinds *part*;
    `holds`: which run holds scalars only, when none of the kind was compared."""
    if parting is None and not compared:
        return [f"{name:<11} not compared: {holds} scalars only"]
    if parting is None:
        every = "the" if compared == 1 else "all"
        return [f"{name:<11} equal on {every} {counted(compared, 'compared step')}"]
    verb = "differ" if name == KIND_NAMES["arrays"] else "part"
    lines = [f"{name:<11} {verb} at step {parting.step}"]
    lines += [f"{'':<13}{d.field}: {d.what}" for d in parting.fields]
    if parting.more:
        lines.append(f"{'':<13}(+{parting.more} more {'field' if parting.more == 1 else 'fields'})")
    return lines


def _unshared_text(name: str, result: DiffResult) -> str:
    """A scalar one run alone records at some compared steps, with the steps it was compared
    at where both record it."""
    steps = result.unshared_compared.get(name)
    if steps is None:
        return name
    return f"{name} (compared at the {counted(steps, 'step')} both record it)"


def _print_table(result: DiffResult, until: int | None) -> None:
    out.print(f"stabledrl diff {result.run_a} {result.run_b}", highlight=False, soft_wrap=False)
    lines = [
        f"steps: A {result.steps_a}, B {result.steps_b}, both {result.common} "
        f"(compared {result.compared})",
    ]
    if result.only_a:
        lines.append(f"only in A: {_ranges_text(result.only_a)}")
    if result.only_b:
        lines.append(f"only in B: {_ranges_text(result.only_b)}")
    for run, unreadable in (("A", result.unreadable_a), ("B", result.unreadable_b)):
        if unreadable:
            lines.append(f"unreadable in {run}, not compared: {_ranges_text(unreadable)}")
    if result.scalars_only:
        steps = counted(result.scalars_only, "compared step")
        lines.append(f"scalars only in one run: {steps} (the other's batch not compared)")
    alone = [
        f"by {side.upper()} only: {', '.join(_unshared_text(name, result) for name in names)}"
        for side, names in result.unshared.items()
        if names
    ]
    if alone:
        lines.append(f"not compared, recorded {'; '.join(alone)}")
    lines += [f"note: {note}" for note in result.notes]
    holds = "one run holds" if result.scalars_only else "both runs hold"
    for kind, name in KIND_NAMES.items():
        batches = kind in ("inputs", "logprobs")  # not compared where a run holds scalars only
        compared = result.batches_compared if batches else result.compared
        lines += _parting_lines(name, result.first[kind], compared, holds)
    if result.identical:
        verdict = "identical: every array of every step equal, bit for bit"
    elif result.parted_at is None:
        verdict = "they never part: "
        if result.first["arrays"] is None:
            partial = result.scalars_only or any(result.unshared.values())
            held = "value both record" if partial else "step both hold"
            verdict += f"every {held} equal, bit for bit"
        else:
            verdict += (
                f"bits first differ at step {result.first['arrays'].step}, within "
                f"atol {result.atol:g}, rtol {result.rtol:g}"
            )
            if result.bits_only:
                verdict += f" but for {', '.join(result.bits_only)} (compared bit for bit only)"
    else:
        verdict = f"parted at step {result.parted_at}"
        if until is not None:
            verdict += f" ({'before' if result.parted_at < until else 'at or after'} {until})"
    lines.append(verdict)
    for line in lines:  # wrapped at the width, a field's next lines under its first
        body = line.lstrip(" ")
        indent = " " * (len(line) - len(body))
        width = max(out.width - len(indent), MIN_WRAP)
        for piece in textwrap.wrap(body, width, break_long_words=False, break_on_hyphens=False):
            out.print(plain_text(indent + piece))
    if not result.around:
        return
    specs = result.own_policy
    focus = result.parted_at
    if focus is None and result.first["arrays"] is not None:  # equal within the tolerance
        focus = result.first["arrays"].step
    table = Table(
        title=f"around step {focus}: "
        f"discard and risk of each run's own policy (A {specs['a'] or 'n/a'}, "
        f"B {specs['b'] or 'n/a'})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    for header in ("step", *(f"{h} {side}" for h in ("rew", "gnorm", "disc", "risk")
                             for side in ("A", "B"))):  # fmt: skip
        table.add_column(header, justify="right", no_wrap=True)
    unjudged = False
    for row in result.around:
        cells = [str(row.step)]
        for name in ("reward_draw", "grad_norm", "discard_frac", "risk"):
            for side in (row.a, row.b):
                if name == "risk" and side.get("risk_judged") is False:
                    unjudged = True
                    cells.append("n/j")
                    continue
                cells.append(
                    format_cell(side.get(name), percent=name == "discard_frac", yes="RISK", no="ok")
                )
        table.add_row(*cells)
    print_fitted(table, out, named=True)  # a figure is never cut, nor the terminal overflowed
    if unjudged:
        note = (
            f"n/j: not judged, the spike rule judges a step after {SPIKE_MIN_HISTORY} finite, "
            "nonzero update norms of one kind before it"
        )
        for piece in textwrap.wrap(note, max(out.width, MIN_WRAP), break_on_hyphens=False):
            out.print(plain_text(piece))


def command(
    run_a: Annotated[
        str,
        typer.Argument(
            help=f"{RUN_SOURCE_HELP} A in the output.", show_default=False, metavar="RUN_A"
        ),
    ],
    run_b: Annotated[
        str,
        typer.Argument(
            help=f"{RUN_SOURCE_HELP} B in the output.", show_default=False, metavar="RUN_B"
        ),
    ],
    until: Annotated[
        int | None,
        number_option(
            "--until",
            kind=int,
            min=0,
            metavar="STEP",
            help="Exit 1 only when the runs part before STEP (default: at any step).",
        ),
    ] = None,
    atol: Annotated[
        float,
        number_option("--atol", kind=float, help="Absolute tolerance of log-probs and scalars."),
    ] = DEFAULT_ATOL,
    rtol: Annotated[
        float,
        number_option("--rtol", kind=float, help="Relative tolerance of log-probs and scalars."),
    ] = DEFAULT_RTOL,
    context: Annotated[
        int,
        number_option(
            "--context", kind=int, metavar="N", help="Steps shown before and after the parting."
        ),
    ] = DEFAULT_CONTEXT,
    output_format: FormatOpt = "table",
    device: DeviceOpt = "auto",
) -> None:
    """Where two runs first part: inputs, log-probs, scalars, and the figures around it."""
    first, second = open_snapshot(run_a), open_snapshot(run_b)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RunIntegrityWarning)
        try:
            with option_names():  # a bad tolerance named by its option (--atol)
                result = diff_runs(
                    first,
                    second,
                    atol=atol,
                    rtol=rtol,
                    context=context,
                    config=ReplayConfig(device=device),
                )
        finally:  # before an error too: skipped steps can be why the runs share none
            for warning in caught:
                err.print(f"warning: {warning.message}", highlight=False)
    lives = [live_read(first), live_read(second)]
    for live, given in zip(lives, (run_a, run_b), strict=True):
        note_live(live, given, "the diff read", "diff")
    parted = result.parted_before(until)
    if output_format == "json":
        data = result.to_dict()
        data["until"] = until
        data["parted_before_until"] = parted
        for key, live in zip(("live_a", "live_b"), lives, strict=True):
            data[key] = None if live is None else live.to_dict()
        print_json(data)
    else:
        _print_table(result, until)
    if parted:
        raise typer.Exit(1)
