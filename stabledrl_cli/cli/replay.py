"""`stabledrl replay RUN`: every policy over a recorded run, side by side.

Exit codes: 0 ok; 2 usage error (an unknown policy spec, a bad option); 3 bad input (a missing
run, a wrong format version, a step missing a field a requested policy needs, a run with no
readable step); 4 an output that cannot be written (--out, --plot: after the results are
shown; the other is still written). Steps with NaN or inf are replayed and
flagged, not refused; unreadable step files, and steps whose data cannot be replayed (arrays
of mismatched lengths, a seq_id out of range), are skipped, and a line on stderr says how many
and why.

The replay engines (torch) are imported where they run: `--help` and the checks of the
options and the run never load torch (tests/test_startup.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._option_names import option_names
from stabledrl_cli.cli._options import (
    ChunkSizeOpt,
    CollapseWindowOpt,
    DeviceOpt,
    DriftThresholdOpt,
    EngineOpt,
    FormatOpt,
    MemoryBudgetOpt,
    PlotOpt,
    RayAddressOpt,
    RunSourceArg,
    ThreadsOpt,
    WindowOpt,
    WorkersOpt,
    number_option,
    report_path,
)
from stabledrl_cli.cli._output import err, out, stdout_written
from stabledrl_cli.cli._replay_notes import note_empty_range, note_skipped, note_stopped
from stabledrl_cli.cli._replay_outputs import check_outputs
from stabledrl_cli.cli._replay_run import check_policy_specs, replay_engine, replay_with_progress
from stabledrl_cli.cli._writes import raise_unwritten, write_outputs
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.config import (
    DEFAULT_SPIKE_FACTOR,
    SPIKE_HISTORY,
    guard_specs,
    parse_size,
    parse_step_range,
    replay_config,
)
from stabledrl_cli.replay.plot import plot_replay
from stabledrl_cli.replay.report import BEST_RULE, print_detail, print_summary
from stabledrl_cli.spec import SPEC_SYNTAX
from stabledrl_cli.vocab import METRIC_GROUPS, MetricGroup


def metric_groups(names: Sequence[str] | None) -> tuple[MetricGroup, ...]:
    """The --metrics groups, each checked against the vocabulary (a usage error names it)."""
    groups: list[MetricGroup] = []
    for name in names or ():
        group = next((g for g in METRIC_GROUPS if g == name), None)
        if group is None:
            raise UsageError(f"--metrics {name!r} is not one of {', '.join(METRIC_GROUPS)}")
        groups.append(group)
    return tuple(groups)


def command(
    run: RunSourceArg,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            "-p",
            metavar="SPEC",
            help=f"Policy spec: {SPEC_SYNTAX} (repeatable; default: the run's own policy, "
            "then the standard catalogue).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    output_format: FormatOpt = "table",
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps",
            metavar="A:B",
            help="Per-step rows for A:B (A <= step < B; either side optional).",
        ),
    ] = None,
    detail: Annotated[
        bool,
        typer.Option("--detail", help="Per-step rows, and the top sequences of each flagged step."),
    ] = False,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            parser=report_path,
            help="Write the per-step arrays to this .h5 (replaced if it exists).",
        ),
    ] = None,
    spike_factor: Annotated[
        float | None,
        number_option(
            "--spike-factor",
            kind=float,
            help=f"Spike: update norm > this x the median of the previous {SPIKE_HISTORY} steps "
            f"(default {DEFAULT_SPIKE_FACTOR:g}).",
        ),
    ] = None,
    window: WindowOpt = None,
    drift_threshold: DriftThresholdOpt = None,
    collapse_window: CollapseWindowOpt = None,
    max_grad_norm: Annotated[
        float | None,
        number_option(
            "--max-grad-norm",
            kind=float,
            help="clip_grad_norm_ bound for clip_scale (spikes use the pre-clip norm; "
            "default: none, clip_scale 1).",
        ),
    ] = None,
    chunk_size: ChunkSizeOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    threads: ThreadsOpt = None,
    guard: Annotated[
        list[str] | None,
        typer.Option(
            "--guard",
            metavar="SPEC",
            help="Adaptive grad-norm guard replayed over the recorded norms: zclip[:key=v,..] "
            "or skip-step[:window=N,sigma=S] (repeatable; default both; none: no guard).",
        ),
    ] = None,
    plot: PlotOpt = None,
    metrics: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics",
            metavar="|".join(METRIC_GROUPS),
            help="Add columns to the tables: trl (TRL's clip ratios), verl (verl's clip "
            "fractions), counts (scored and clipped entries); repeatable.",
        ),
    ] = None,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", help="Every column of the tables (default: the few that fit 80 columns)."
        ),
    ] = False,
    legend: Annotated[
        bool,
        typer.Option(
            "--legend/--no-legend", help="A line per column under each table, and the best rule."
        ),
    ] = True,
    engine: EngineOpt = "local",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Replay a recorded run through the policy catalogue (one-step counterfactuals)."""
    check_outputs(run, plot, {"--out": out_path})
    groups = metric_groups(metrics)
    with option_names():
        config = replay_config(
            device=device,
            chunk_size=chunk_size,
            memory_budget=None if memory_budget is None else parse_size(memory_budget),
            threads=threads,
            spike_factor=spike_factor,
            window=window,
            drift_threshold=drift_threshold,
            max_grad_norm=max_grad_norm,
            collapse_window=collapse_window,
            step_range=parse_step_range(steps),
            detail=detail,
            guards=guard_specs(guard),
        )
    check_policy_specs(policy)
    chosen = replay_engine(engine, workers, ray_address)
    opened = open_snapshot(run)
    result = replay_with_progress(opened, policy, config, chosen, plot=plot)
    note_live(result.live, run, "the replay read", "replay")
    from stabledrl_cli.replay.run_facts import print_own_policy_note

    print_own_policy_note(opened, err)
    note_stopped(opened, result.run)
    note_skipped(result)
    note_empty_range(result)

    # An output that cannot be written ends the replay with exit 4, after its results are shown.
    def report_file(path: Path) -> str:
        from stabledrl_cli.replay.hdf5 import write_hdf5

        write_hdf5(result, path)
        return f"wrote {path}"

    def plot_file(path: Path) -> str:
        plot_replay(result, path, opened)
        return f"wrote {path}"

    _, unwritten = write_outputs({
        "out": ("--out", out_path, report_file),
        "plot": ("--plot", plot, plot_file),
    })  # fmt: skip
    if output_format == "json":
        # Piece by piece: a long run's per-step rows are never all held as Python objects.
        with stdout_written():
            for piece in result.iter_json():
                sys.stdout.write(piece)
            sys.stdout.write("\n")
            sys.stdout.flush()
    else:
        if detail or steps is not None:
            print_detail(result, out, groups, wide=wide, legend=legend)
        print_summary(result, out, groups, wide=wide, legend=legend)
    raise_unwritten(unwritten)


command.__doc__ = (
    "Replay a recorded run through the policy catalogue (one-step counterfactuals).\n\n"
    f"The table marks (own) the run's own policy, and (best) by this rule. {BEST_RULE}."
)
