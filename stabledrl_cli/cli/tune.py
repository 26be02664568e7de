"""`stabledrl tune RUN -p SWEEP ...`: which clip setting would have served this run best.

Every setting of the sweeps (stabledrl_cli.tune.grid) is replayed over the run in one
streamed pass (a step's settings in groups that a memory budget bounds), then ranked by
discarded gradient against risk steps (stabledrl_cli.tune.front). Exit codes: 0 ok; 2 usage
error (a bad sweep, too many settings, plot extra missing); 3 bad input (as replay); 4 a plot
that cannot be written (after the results are shown).

The replay engine (torch) is imported where it runs: `--help` never loads torch.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stabledrl_cli._url import redacted
from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._option_names import option_names
from stabledrl_cli.cli._options import (
    DeviceOpt,
    EngineOpt,
    FormatOpt,
    RayAddressOpt,
    RunSourceArg,
    ThreadsOpt,
    WorkersOpt,
    report_path,
)
from stabledrl_cli.cli._output import err, out, print_json
from stabledrl_cli.cli._replay_notes import note_skipped, note_stopped
from stabledrl_cli.cli._replay_outputs import check_outputs
from stabledrl_cli.cli._replay_run import replay_engine, replay_with_progress
from stabledrl_cli.cli._writes import raise_unwritten, write_outputs
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.errors import counted
from stabledrl_cli.replay.config import (
    DEFAULT_MEMORY_BUDGET,
    format_size,
    parse_size,
    replay_config,
)
from stabledrl_cli.replay.run_facts import own_spec, print_own_policy_note
from stabledrl_cli.spec import wrap_line
from stabledrl_cli.tables import fold_specs, print_fitted, print_legend, spec_room, stacked_width
from stabledrl_cli.tune.front import SettingFigures, TuneReport, percent, rank
from stabledrl_cli.tune.grid import SWEEP_SYNTAX, expand_all

SweepOpt = Annotated[
    list[str],
    typer.Option(
        "--policy",
        "-p",
        metavar="SWEEP",
        help=f"A policy spec whose values may be grids: {SWEEP_SYNTAX} (repeatable; the "
        "keys of one spec sweep as a product).",
    ),
]


TuneMemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-budget",
        metavar="SIZE",
        help="Step arrays held at a time (the chunk computed and the one read ahead, half "
        "each; a step's settings are evaluated in groups of about half as much again, whatever "
        f"their number), e.g. 256M or 1G (default {format_size(DEFAULT_MEMORY_BUDGET)}).",
    ),
]


_OWN_LEGEND = "(own): the policy the run was trained with, shown for reference, not ranked"


_HEADERS = ("", "setting", "risk", "nf/spk/bias", "disc. grad", "disc. tok")
_BESIDE = [(i, header) for i, header in enumerate(_HEADERS) if header != "setting"]
"""The columns beside the setting, whose cells are shown whole."""


def _row(s: SettingFigures, report: TuneReport) -> list[str]:
    mark = "*" if s is report.recommended else ("f" if s.on_front else "")
    return [
        mark,
        s.spec if s.tuned else f"{s.spec} (own)",
        str(len(s.risk_steps)),
        f"{s.nonfinite_steps}/{s.spike_steps}/{s.drift_steps}",
        percent(s.discarded_mass),
        f"{100 * s.discard_frac:.1f}%",
    ]


def _print_table(report: TuneReport) -> None:
    table = Table(
        title=f"tune {report.run}: {counted(report.steps, 'step')}, "
        f"{counted(sum(s.tuned for s in report.settings), 'setting')}",
        title_justify="left",
    )
    rows = [_row(setting, report) for setting in report.settings]
    # a setting is folded only where the table does not fit with its headers stacked
    beside = [stacked_width(header, (row[i] for row in rows)) for i, header in _BESIDE]
    settings, widest = fold_specs([row[1] for row in rows], spec_room(beside, out.width))
    table.add_column("")
    table.add_column("setting", no_wrap=True, min_width=widest)
    for name in _HEADERS[2:]:
        table.add_column(name, justify="right")
    for row, setting in zip(rows, settings, strict=True):
        table.add_row(row[0], setting, *row[2:])
    print_fitted(table, out, lead=2)
    for line in report.unjudged:
        out.print(line, highlight=False, soft_wrap=False)
    own = [_OWN_LEGEND] if not all(s.tuned for s in report.settings) else []
    print_legend(
        [
            "* recommended, f on the front (no other setting has as few risk steps and as "
            "little discarded gradient, and less of one)",
            *own,
            "risk: steps whose replayed update is non-finite, spikes or drifts (nf/spk/bias)",
            "disc. grad: median share of the IS update discarded per step; disc. tok: "
            "discarded eligible tokens",
        ],
        out,
    )
    if report.recommended is not None:  # a spec broken at its commas, never inside a value
        line = f"recommended: {report.recommended.spec}: {report.evidence}"
        for piece in wrap_line(line, out.width, whole=True):
            out.print(piece, highlight=False, soft_wrap=True)


def command(
    run: RunSourceArg,
    sweeps: SweepOpt,
    device: DeviceOpt = "auto",
    output_format: FormatOpt = "table",
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            parser=report_path,
            help="Draw the settings' discarded gradient against risk steps, the front and the "
            "recommendation, replaced if it exists (needs the plot extra).",
        ),
    ] = None,
    keep_own: Annotated[
        bool,
        typer.Option("--own/--no-own", help="Replay the run's own policy beside, as a reference."),
    ] = True,
    threads: ThreadsOpt = None,
    memory_budget: TuneMemoryBudgetOpt = None,
    engine: EngineOpt = "local",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Sweep policy parameters over a run; rank settings by discarded gradient and risk."""
    settings = expand_all(sweeps)  # a bad sweep is refused before torch loads (seconds)
    with option_names():  # a bad option is refused before the run is read or a line printed
        budget = None if memory_budget is None else parse_size(memory_budget)
        config = replace(
            replay_config(device=device, threads=threads, memory_budget=budget), lean=True
        )
    check_outputs(run, plot, {})
    chosen = replay_engine(engine, workers, ray_address)  # a bad value: before torch loads
    if str(config.device) not in ("auto", "cpu"):  # a GPU torch may not see: before the run
        from stabledrl_cli._device import resolve_device

        resolve_device(config.device)
    opened = open_snapshot(run)  # a missing run is refused before torch loads (a second)
    specs = list(settings)
    own = own_spec(opened) if keep_own else None
    if own is not None and own not in specs:
        specs.append(own)
    header = f"tuning {counted(len(settings), 'setting')} over {redacted(run)}"
    result = replay_with_progress(opened, specs, config, chosen, header=header, plot=plot)
    note_live(result.live, run, "the tune read", "tune")
    if keep_own:
        print_own_policy_note(opened, err)
    note_stopped(opened, result.run)
    note_skipped(result)
    report = rank(result, settings)

    # Written before the results are printed (a reader that closes stdout early, `| head`,
    # still gets it); one that cannot be written ends the tune with exit 4 after them.
    def plot_file(path: Path) -> str:
        from stabledrl_cli.tune.plot import plot_front

        plot_front(report, path)
        return f"wrote {path}"

    _, unwritten = write_outputs({"plot": ("--plot", plot, plot_file)})
    if output_format == "json":
        print_json(report.to_dict())
    else:
        _print_table(report)
    raise_unwritten(unwritten)
