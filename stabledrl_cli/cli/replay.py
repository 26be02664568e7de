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

import math
import os
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from stabledrl_cli._atomic import missing_directory, write_error
from stabledrl_cli._url import redacted
from stabledrl_cli.cli._live import note_live
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
    on_command_line,
    report_path,
)
from stabledrl_cli.cli._output import err, is_standard_output, out, progress, stdout_written
from stabledrl_cli.cli._signals import stopped_by_sigterm
from stabledrl_cli.cli._writes import raise_unwritten, write_outputs
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.dump._open import open_snapshot, packed_run
from stabledrl_cli.dump._url_filesystem import inside_local_run
from stabledrl_cli.errors import ConfigError, UsageError, counted
from stabledrl_cli.policies._registry import resolve_spec
from stabledrl_cli.replay.config import (
    DEFAULT_SPIKE_FACTOR,
    MAX_THREADS,
    SPIKE_HISTORY,
    ReplayConfig,
    check_workers,
    format_size,
    format_step_range,
    guard_specs,
    parse_size,
    parse_step_range,
    replay_config,
)
from stabledrl_cli.replay.plot import check_plot_path, plot_replay, require_matplotlib
from stabledrl_cli.replay.report import BEST_RULE, print_detail, print_summary
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.run_facts import scalar_run_refusal
from stabledrl_cli.spec import SPEC_SYNTAX
from stabledrl_cli.vocab import METRIC_GROUPS, MetricGroup, ReplayEngine

if TYPE_CHECKING:
    from stabledrl_cli.dump._integrity import Gap
    from stabledrl_cli.replay.engine import Engine

FLAGS = {"step_range": "--steps"}
"""Library setting -> its option, where the option is not --SETTING-WITH-DASHES."""


@contextmanager
def option_names(flags: Mapping[str, str] = FLAGS) -> Iterator[None]:
    """Turns a `ConfigError` (a setting named as the library spells it) into a usage error
    naming the command's option (`flags`: setting -> option, where it is not
    --SETTING-WITH-DASHES)."""
    try:
        yield
    except ConfigError as exc:
        flag = flags.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise UsageError(f"{flag} {exc.problem}") from None


BINARY_REPORTS = ("--out", "--plot")
"""The report options whose file (HDF5, PNG) is no text to print beside the results."""


def check_outputs(run: str, plot: Path | None, targets: dict[str, Path | None]) -> None:
    """Before the replay: the output files' directories exist (targets: option -> path), none
    lies inside the run read (`run`, a directory or an archive: a report there would replace
    one of its files, or sit among them, as `pack` refuses too), is a directory (its write
    would fail once the replay is done), a packed run (a report replaces the file it names,
    as a CI job rewrites its reports on every run; a run may be kept nowhere else, and `pack`
    replaces a file only with --force) or, for a binary report, the standard output (the
    results printed there would follow it into one stream; a text report is printed beside
    them), no two name one file (the last written
    would replace the other), and a plot can be drawn (a missing extra fails fast, exit 2)."""
    named = [(flag, path) for flag, path in {**targets, "--plot": plot}.items() if path is not None]
    for flag, target in named:
        try:
            inside = inside_local_run(target, run)
            directory = target.is_dir()
            problem = missing_directory(target) if flag != "--plot" else None
        except OSError as exc:  # a name longer than the file system takes, ...
            raise write_error(target, exc) from None
        if inside:
            raise UsageError(
                f"{flag} {target} is inside the run {redacted(run)}; write it outside the run"
            )
        if directory:
            raise UsageError(f"{flag} {target} is a directory; give a file name")
        if (packed := packed_run(target)) is not None:
            raise UsageError(
                f"{flag} {target} is {packed} (stabledrl pack); a report replaces its file, "
                "never a run: give another file"
            )
        if flag in BINARY_REPORTS and is_standard_output(target):
            raise UsageError(
                f"{flag} {target} is the standard output, where the results are printed; "
                "give a file name"
            )
        if problem is not None:
            raise UsageError(f"{flag} {target}: {problem}")
    for i, (flag, target) in enumerate(named):
        for other_flag, other in named[i + 1 :]:
            if same_file(target, other):
                raise UsageError(
                    f"{flag} {target} and {other_flag} {other} name the same file; give each "
                    "report a file of its own"
                )
    if plot is not None:
        try:
            check_plot_path(plot)
        except UsageError as exc:
            raise UsageError(f"--plot {exc}") from None
        require_matplotlib(load=False)  # imported before the replay (replay_with_progress)


def same_file(target: Path, other: Path) -> bool:
    """Whether two reports would replace one file: the same path once links are resolved,
    there or not yet. A device or a FIFO is written in place, not replaced (two reports to
    /dev/null are no clash)."""
    path = os.path.realpath(target)
    if path != os.path.realpath(other):
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # not there yet: both would create it
        return True


def note_stopped(run: Run, named: str) -> None:
    """A warning on stderr for each rank whose recording stopped before the training ended
    (an interrupted training, a full disk: the run's `recording_stopped` notes, as `inspect`
    and `watch` show them), at most LIST_LIMIT: a replay, a check or a tune covers the steps
    before it only."""
    from stabledrl_cli.cli.inspect import LIST_LIMIT, stopped_text

    stops = run.recording_stops
    for note in stops[:LIST_LIMIT]:
        err.print(f"warning: {named}: recording {stopped_text(note)}", highlight=False)
    if len(stops) > LIST_LIMIT:
        more = counted(len(stops) - LIST_LIMIT, "more rank")
        err.print(f"warning: {named}: {more} stopped: inspect has them all", highlight=False)


def note_skipped(result: ReplayResult) -> None:
    """A line on stderr when the run has scalar steps, which hold nothing to replay, the
    warnings of its skipped and missing steps (`warn_damaged`) and the one of sketches its
    ranks recorded with different seeds or widths (`warn_sketches`)."""
    if result.scalar_steps:
        noun = "step has" if result.scalar_steps == 1 else "steps have"
        err.print(
            f"note: {result.scalar_steps} {noun} no policy batch (per-step scalars only) and "
            f"{'was' if result.scalar_steps == 1 else 'were'} not replayed; replayed "
            f"{result.steps}",
            highlight=False,
        )
    warn_damaged(result.run, result.skipped, result.missing, f"replayed {result.steps}")
    warn_sketches(result)


def warn_sketches(result: ReplayResult) -> None:
    """A warning on stderr when the run's ranks recorded sketches with different seeds or
    widths k (two Omegas): they do not join (a joined sketch of two Omegas misses the
    cross-rank terms of the update), so those steps' update norms are coefficient norms."""
    unjoined = result.unjoined
    for kind, values, what, option in (
        ("sketch_seeds_differ", unjoined.seeds, "seeds", "--geometry-seed"),
        ("sketch_widths_differ", unjoined.widths, "widths k", "--geometry-k"),
    ):
        if kind not in unjoined.kinds:
            continue
        distinct = sorted({value for value in values if value is not None})
        more = ", ..." if len(distinct) > VALUES_SHOWN else ""
        shown = ", ".join(map(str, distinct[:VALUES_SHOWN])) + more
        differ = f"{len(distinct)} different {what} ({shown})" if distinct else f"different {what}"
        err.print(
            f"warning: {result.run}: its ranks recorded sketches with {differ}, which do not "
            "join: update norms of those steps are coefficient norms; give every rank the same "
            f"{option} (docs/geometry.md)",
            highlight=False,
        )


VALUES_SHOWN = 4
"""The ranks' different sketch seeds (or widths) a warning names."""


def warn_damaged(run: str, skipped: Sequence[str], missing: Sequence[Gap], done: str) -> None:
    """The warnings on stderr of a run's steps skipped (`skipped`: one reason each: the reader
    could not read them, or the replay could not use their data) and of its steps missing
    between recorded ones; `done`: what was made of the others (`replayed 9`)."""
    from stabledrl_cli.replay.run_facts import shown_reasons

    if skipped:
        count = counted(len(skipped), "unreadable, incomplete or invalid step")
        err.print(
            f"warning: skipped {count} of {run} ({shown_reasons(skipped)}); {done}; "
            "`stabledrl inspect` lists the reader's findings",
            highlight=False,
        )
    if missing:
        err.print(
            f"{missing_line(run, missing)}; {done}; `stabledrl inspect` lists the reader's "
            "findings",
            highlight=False,
        )


def missing_line(run: str, missing: Sequence[Gap]) -> str:
    """The warning that `run` misses steps between its recorded ones (`missing`:
    `run_facts.run_gaps`)."""
    from stabledrl_cli.replay.run_facts import shown_reasons

    reasons = shown_reasons([gap.message for gap in missing])
    return (
        f"warning: {run} misses steps between its recorded ones ({reasons}): never written, or lost"
    )


def metric_groups(names: Sequence[str] | None) -> tuple[MetricGroup, ...]:
    """The --metrics groups, each checked against the vocabulary (a usage error names it)."""
    groups: list[MetricGroup] = []
    for name in names or ():
        group = next((g for g in METRIC_GROUPS if g == name), None)
        if group is None:
            raise UsageError(f"--metrics {name!r} is not one of {', '.join(METRIC_GROUPS)}")
        groups.append(group)
    return tuple(groups)


def check_policy_specs(policies: Sequence[str] | None) -> None:
    """A bad policy spec refused (exit 2) before an engine's module or a replay loads torch,
    which takes a second or more."""
    for spec in policies or ():
        resolve_spec(spec)


def replay_engine(engine: ReplayEngine, workers: int | None, address: str | None) -> Engine | None:
    """The --engine's engine, None for the local one (the replay's default, loading torch only
    when a step is replayed): --workers or --ray-address on the command line without --engine
    ray is a usage error (RAY_ADDRESS in the environment alone is not: people export it for
    every command, and the local engine ignores it), and so are --engine ray without ray
    installed and an empty --ray-address (an unset variable; an empty RAY_ADDRESS is none)."""
    if engine == "local":
        if workers is not None:
            raise UsageError("--workers needs --engine processes or ray")
        if on_command_line("ray_address"):
            raise UsageError("--ray-address needs --engine ray")
        return None
    if workers is not None and workers < 1:
        raise UsageError("--workers must be an integer >= 1")
    if engine == "processes":
        if on_command_line("ray_address"):
            raise UsageError("--ray-address needs --engine ray")
        with option_names():
            check_workers(workers, MAX_THREADS)  # before the engine's module loads torch
        from stabledrl_cli.replay.process_engine import ProcessEngine

        return ProcessEngine(workers=workers)
    if not (address or "").strip() and on_command_line("ray_address"):
        raise UsageError(
            "--ray-address is empty: give the cluster's address (host:6379, or auto), or leave "
            "the option out for a local cluster started for this run"
        )
    from stabledrl_cli.replay.ray_engine import RayEngine, require_ray

    require_ray()
    return RayEngine(address=address, workers=workers)


def replay_with_progress(
    run: Run,
    policies: Sequence[str] | None,
    config: ReplayConfig,
    engine: Engine | None = None,
    *,
    header: str | None = None,
    plot: Path | None = None,
) -> ReplayResult:
    """`replay_run` with its progress on stderr: a bar in a terminal, a line per tenth (at
    least every 30 s) without one. A setting the engine refuses as it starts (more local Ray
    workers than CPUs) is named by its option. `header`, a line on stderr, comes once the
    first step is computed (or the replay returns): a run refused before, such as a run with
    nothing to replay, gets its one error line alone. Given the `plot` to draw after it,
    matplotlib is imported once the run is found to hold something to replay: an install
    that fails to import is refused before the replay, not after it."""
    if str(config.device) in ("auto", "cpu"):  # a device named is checked first, by torch
        with integrity_warnings_ignored():  # the refusal names the skipped step files
            refusal = scalar_run_refusal(run)
        if refusal is not None:  # before torch loads (a second)
            raise refusal
    if plot is not None:
        require_matplotlib()
    from stabledrl_cli.replay.engine import replay_run
    from stabledrl_cli.replay.ray_engine import RayEngine

    pending = [] if header is None else [header]

    def say_header() -> None:
        while pending:
            err.print(pending.pop(), highlight=False)

    with (
        option_names(),
        # SIGTERM stops a Ray replay as Ctrl-C does, so that the cluster it started is stopped
        stopped_by_sigterm(as_interrupt=True) if isinstance(engine, RayEngine) else nullcontext(),
        progress("replaying", len(run.listed_whole_step_numbers), complete=True) as report,
    ):

        def advance(n: int) -> None:
            say_header()
            report(n)

        result = replay_run(run, policies, config=config, progress=advance, engine=engine)
        say_header()  # a replay that reported no step
    note_idle_threads(result, config)
    return result


def note_idle_threads(result: ReplayResult, config: ReplayConfig) -> None:
    """A line on stderr when chunks closed with fewer steps than `--threads`, so that some
    threads never computed, with the option that lets them all work: a chunk's steps are
    computed side by side, and a chunk holds about half `--memory-budget` of step arrays,
    at most `--chunk-size` steps."""
    widest, threads = result.widest_chunk, result.threads
    if not 0 < widest < threads:
        return
    if config.chunk_size is not None and config.chunk_size < threads:
        remedy = f"--chunk-size {threads} or more lets all {threads} work"
    else:
        budget = math.ceil(config.memory_budget * threads / widest / 2**20)
        remedy = (
            f"a chunk holds about half --memory-budget "
            f"({format_size(config.memory_budget)}); --memory-budget {budget}M lets all "
            f"{threads} work"
        )
    err.print(
        f"note: --threads {threads} computed at most {counted(widest, 'step')} side by side, "
        f"as a chunk held no more; {remedy}",
        highlight=False,
    )


def note_empty_range(result: ReplayResult) -> None:
    """A line on stderr when `--steps` selects no step of the run."""
    if result.step_range == (None, None) or not result.policies:
        return
    if len(result.policies[0].series) == 0:
        err.print(
            f"warning: --steps {format_step_range(result.step_range)} selects no step of "
            f"{result.run} ({counted(result.steps, 'step')} replayed); no per-step rows",
            highlight=False,
        )


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

    _, unwritten = write_outputs({"out": (out_path, report_file), "plot": (plot, plot_file)})
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
