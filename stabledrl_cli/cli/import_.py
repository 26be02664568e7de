"""`stabledrl import SRC --out RUN`: a run that was only logged, as a scalar run.

Exit codes: 0 imported; 2 RUN holds a run and --force was not given, or a bad option; 3 SRC is
missing, unreadable, of an unknown format, malformed, past a bound, or has no training step;
4 RUN could not be written; 143 stopped by SIGTERM (as by Ctrl-C, 130: no run is left at RUN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stabledrl_cli.cli._local import local_output
from stabledrl_cli.cli._options import FormatOpt, local_file
from stabledrl_cli.cli._output import err, out, print_json
from stabledrl_cli.cli._signals import stopped_by_sigterm
from stabledrl_cli.dump._recorder_args import reward_range_text
from stabledrl_cli.dump._run_target import check_out, check_replaceable, directory_or_nothing
from stabledrl_cli.errors import LINE_BREAKS, UsageError, counted
from stabledrl_cli.importers import ImportSummary, import_log
from stabledrl_cli.importers._names import listed
from stabledrl_cli.importers._table import dropped_text, skipped_text
from stabledrl_cli.vocab import ImportFormat


def command(
    source: Annotated[
        Path,
        typer.Argument(
            help="The log: trainer_state.json (or its directory), a .jsonl or .csv file, a "
            "TensorBoard event file or a directory of them, TensorBoard's per-tag .json export, "
            "verl's console output, a W&B run file (run-<id>.wandb, or its wandb/run-... "
            "directory).",
            show_default=False,
            metavar="SRC",
            parser=local_file,
        ),
    ],
    out_arg: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="The run directory to write, a local path.", metavar="RUN"
        ),
    ],
    format_in: Annotated[
        ImportFormat | None,
        typer.Option(
            "--format-in",
            metavar="FORMAT",
            help="The log's format: trainer_state, jsonl, csv, tfevents, tensorboard_json, "
            "verl_console or wandb (default: from its name and content).",
        ),
    ] = None,
    step_key: Annotated[
        str | None,
        typer.Option(
            "--step-key",
            metavar="NAME",
            help="jsonl, csv, W&B or a JSON array of rows: the key or column holding the step "
            "(default: step, global_step, train/global_step, trainer/global_step, Step or "
            "_step).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace RUN if it holds a run.")] = False,
    reward_range: Annotated[
        str | None,
        typer.Option(
            "--reward-range",
            metavar="LOW,HIGH",
            help="The range the logged reward spans (0,1 for a success rate): the floor the "
            "collapse rule measures a fall against (default: the run's own lowest reward).",
        ),
    ] = None,
    output_format: FormatOpt = "table",
) -> None:
    """Import a logged run (TRL/transformers trainer_state.json, JSON lines, CSV, TensorBoard,
    a W&B run file, verl's console output) as a scalar run that inspect and check read: known
    metrics under the run's standard names, the others kept as extra scalars."""
    span = None if reward_range is None else reward_range_text(reward_range, "--reward-range")
    run = local_output(out_arg, "import", "its run")
    check_out(run)
    if directory_or_nothing(run, str(run)) and any(run.iterdir()):
        # another tool's manifest: --force would not replace it
        check_replaceable(run, "import into another --out")
        if not force:
            raise UsageError(
                f"{run} exists and is not empty; pass --force to replace the run in it"
            )
    old: list[Path] = []
    if force:  # the example's checkpoints and branch runs: refused before the run changes
        from stabledrl_cli.example.old_run import old_run_files, remove_old_run_files

        old = old_run_files(run)
    with stopped_by_sigterm():
        summary = import_log(
            source,
            run,
            log_format=format_in,
            step_key=step_key,
            overwrite=force,
            reward_range=span,
        )
    if old:  # a run imported over another keeps no checkpoint or branch run of it
        remove_old_run_files(old)
    for warning in summary.warnings:
        err.print(f"warning: {warning}", highlight=False)
    if output_format == "json":
        print_json(summary.to_dict())
        return
    _print_table(summary)


def _print_table(summary: ImportSummary) -> None:
    out.print(
        f"imported {counted(summary.steps, 'step')} ({summary.first_step}..{summary.last_step}) of "
        f"{summary.source} ({summary.format}) into {summary.out}".translate(LINE_BREAKS),
        highlight=False,
        soft_wrap=False,
    )
    table = Table("scalar", "from", box=None, pad_edge=False)
    table.add_column("steps", justify="right")
    table.add_column("non-finite", justify="right")
    for standard, name in summary.mapped.items():
        table.add_row(
            standard, name, str(summary.counts.get(standard, 0)),
            str(summary.nonfinite.get(standard, 0)),
        )  # fmt: skip
    out.print(table)
    lines = []
    if summary.extra:
        kept = list(summary.extra.values())
        scalars = "an extra scalar" if len(kept) == 1 else "extra scalars"
        lines.append(f"kept {counted(len(kept), 'other metric')} as {scalars}: {listed(kept)}")
    left_out = {n: why for n, why in summary.not_imported.items() if why != "bookkeeping"}
    if left_out:
        lines.append(f"left out {len(left_out)} ({_reasons(left_out)}): {listed(list(left_out))}")
    if summary.skipped_rows:
        lines.append(skipped_text(summary.skipped_rows))
    if summary.non_numeric:
        lines.append(dropped_text(summary.non_numeric))
    if summary.replaced:
        replaced = counted(summary.replaced, "value")
        lines.append(f"{replaced} replaced by a later row of the same step")
    if summary.logging_steps is not None and summary.logging_steps > 1:
        lines.append(
            f"written every {summary.logging_steps} steps (logging_steps): a row's loss and "
            "TRL's metrics are means over the steps since the row before, its grad_norm and "
            "lr its step's own"
        )
    if summary.preempted:
        lines.append(
            f"{counted(summary.preempted, 'value')} dropped: steps after the step a restarted run "
            "logged again"
        )
    for line in lines:  # wrapped at the terminal's width; a line break of a logged name
        # escaped (stdout's console escapes the other control characters): one line a note
        out.print(line.translate(LINE_BREAKS), highlight=False, soft_wrap=False)


def _reasons(left_out: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for why in left_out.values():
        counts[why] = counts.get(why, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
