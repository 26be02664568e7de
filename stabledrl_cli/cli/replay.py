"""`stabledrl replay RUN`: every policy over a recorded run, side by side.

Exit codes: 0 ok; 2 usage error (an unknown policy spec, a bad option); 3 bad input (a missing
run, a wrong format version, arrays of mismatched lengths, a step missing a field a requested
policy needs). Steps with NaN or inf are replayed and flagged, not refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stabledrl_cli.cli._options import (
    DeviceOpt,
    DriftThresholdOpt,
    FormatOpt,
    PlotOpt,
    PolicyOpt,
    RunArg,
    WindowOpt,
)
from stabledrl_cli.cli._output import OutputFormat, err, out, progress_enabled
from stabledrl_cli.errors import UsageError


def command(
    run: RunArg,
    policy: PolicyOpt = None,
    device: DeviceOpt = "auto",
    output_format: FormatOpt = OutputFormat.table,
    steps: Annotated[
        str | None,
        typer.Option(
            "--steps", help="Per-step rows for A:B (A <= step < B; either side optional)."
        ),
    ] = None,
    detail: Annotated[
        bool,
        typer.Option("--detail", help="Per-step rows, and the top sequences of each flagged step."),
    ] = False,
    out_path: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the per-step arrays to this .h5.")
    ] = None,
    spike_factor: Annotated[
        float,
        typer.Option(
            "--spike-factor",
            help="Spike: update norm > this x the median of the previous 20 steps.",
        ),
    ] = 10.0,
    window: WindowOpt = None,
    drift_threshold: DriftThresholdOpt = None,
    max_grad_norm: Annotated[
        float | None,
        typer.Option(
            "--max-grad-norm",
            help="clip_grad_norm_ bound for clip_scale (spikes use the pre-clip norm).",
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", help="Steps moved to the device at a time.")
    ] = 64,
    plot: PlotOpt = None,
) -> None:
    """Replay a recorded run through the policy catalogue (one-step counterfactuals)."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import (
        DEFAULT_DRIFT_THRESHOLD,
        DEFAULT_WINDOW,
        ReplayConfig,
        parse_step_range,
        replay_run,
    )
    from stabledrl_cli.replay.report import print_detail, print_summary, write_hdf5

    if out_path is not None and not out_path.parent.is_dir():
        raise UsageError(f"--out {out_path}: directory {out_path.parent} does not exist")
    if plot is not None:
        from stabledrl_cli.replay.plot import check_plot_path, require_matplotlib

        check_plot_path(plot)
        require_matplotlib()  # before the replay: a missing extra fails fast (exit 2)
    config = ReplayConfig(
        device=device,
        chunk_size=chunk_size,
        spike_factor=spike_factor,
        window=DEFAULT_WINDOW if window is None else window,
        drift_threshold=DEFAULT_DRIFT_THRESHOLD if drift_threshold is None else drift_threshold,
        max_grad_norm=max_grad_norm,
        step_range=parse_step_range(steps),
        detail=detail,
    )
    opened = open_run(run)
    result = _replay_with_progress(opened, policy, config, replay_run)
    if out_path is not None:
        write_hdf5(result, out_path)
        err.print(f"wrote {out_path}", highlight=False)
    if plot is not None:
        from stabledrl_cli.replay.plot import plot_replay

        plot_replay(result, plot, opened)
        err.print(f"wrote {plot}", highlight=False)
    if output_format is OutputFormat.json:
        # Piece by piece: a long run's per-step rows are never all held as Python objects.
        for piece in result.iter_json():
            sys.stdout.write(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    if detail or steps is not None:
        print_detail(result, out)
    print_summary(result, out)


def _replay_with_progress(opened, policy, config, replay_run):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not progress_enabled(),
        transient=True,
    )
    with progress:
        task = progress.add_task("replay", total=len(opened))
        return replay_run(
            opened, policy, config=config, progress=lambda n: progress.advance(task, n)
        )
