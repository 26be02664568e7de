"""`stabledrl check RUN`: a CI gate on a recorded run's replay.

Replays the run, then checks absolute gates (per policy: --max-collapsed, --max-discard-frac,
--max-nonfinite; on the recorded run: --fail-on-collapse, --max-spikes, --max-nonfinite,
--max-lost-steps) and
regressions against a baseline file (--baseline; the format in replay/baseline.py and
docs/ci.md), whose `recorded` section gates the run's recorded scalar series. A scalar run (no
policy batch: an imported log, an optimizer-hook recording) is not replayed: its run-level
gates and baseline sections are checked alone. Every gate is evaluated and printed, passed or
tripped; then the exit code says whether any tripped. The run is a path or an fsspec URL, and
`--engine ray` shards the replay across a Ray cluster's workers, as `replay` does.

Exit codes: 0 every gate holds; 1 a gate tripped (each named with its figure); 2 usage error
(no gate given, a replay setting that contradicts the baseline, an unknown policy, plot extra
missing, a policy gate or --policy or --plot on a scalar run, a URL that cannot be read at all,
--engine ray without ray); 3 bad input (a missing or corrupt run, a URL with nothing there, a
run with no readable step, a malformed baseline, one of a newer version or one that gates
nothing, a baseline naming a policy the run cannot replay, a baseline of policies replayed with
another loss_norm); 4 an output that cannot be written
(after the results and the verdict are shown). Unreadable step files, and steps whose data
cannot be replayed, are skipped with a line on stderr (how many, and why); a check never passes
on zero steps.

The replay engine (torch) is imported where it runs: `--help` never loads torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stabledrl_cli._url import redacted
from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._options import (
    BaselineCollapseWindowOpt,
    BaselineDriftThresholdOpt,
    BaselineWindowOpt,
    DeviceOpt,
    EngineOpt,
    FailOnCollapseOpt,
    FormatOpt,
    MaxCollapsedOpt,
    MaxDiscardFracOpt,
    MaxLostStepsOpt,
    MaxNonfiniteOpt,
    MaxSpikesOpt,
    MemoryBudgetOpt,
    PlotOpt,
    PolicyOpt,
    RayAddressOpt,
    RunSourceArg,
    ThreadsOpt,
    WorkersOpt,
    local_file,
    number_option,
    report_path,
)
from stabledrl_cli.cli._output import err, out, print_json
from stabledrl_cli.cli._writes import raise_unwritten, write_outputs
from stabledrl_cli.cli.inspect import series_table
from stabledrl_cli.cli.replay import (
    check_outputs,
    check_policy_specs,
    note_skipped,
    note_stopped,
    option_names,
    replay_engine,
    replay_with_progress,
    same_file,
    warn_damaged,
)
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import Gap, integrity_warnings_ignored, missing_count
from stabledrl_cli.dump._live import live_read
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.errors import InputError, UsageError, counted
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay._format import format_figure
from stabledrl_cli.replay.baseline import Baseline, check_settings
from stabledrl_cli.replay.baseline_read import load_baseline
from stabledrl_cli.replay.baseline_write import baseline_dict, baseline_figure, write_baseline
from stabledrl_cli.replay.config import (
    DEFAULT_SPIKE_FACTOR,
    ReplayConfig,
    parse_size,
    replay_config,
)
from stabledrl_cli.replay.figures import policy_metrics
from stabledrl_cli.replay.gate import GateResult, Gates, LostSteps, evaluate
from stabledrl_cli.replay.junit import write_junit
from stabledrl_cli.replay.observed import Observed, observe
from stabledrl_cli.replay.plot import plot_replay
from stabledrl_cli.replay.recorded import RecordedRun, recorded_run
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.run_facts import (
    is_scalar_run,
    no_steps_message,
    print_own_policy_note,
    refuse_recorded_again,
    replayed_loss_norm,
    run_gaps,
    skipped_reasons,
    steps_skipped,
)
from stabledrl_cli.spec import wrap_spec
from stabledrl_cli.tables import (
    fold_specs,
    print_fitted,
    print_legend,
    spec_room,
    stacked_width,
    table_width,
    whole_widths,
)

_CELL_PADDING = 3  # a column's padding and its right edge
_MIN_DETAIL = 12
_MIN_GATE = 12
"""The narrowest the gate column of a grouped table gets, its names folded: on a narrower
terminal the table overflows rather than lose them."""
_HEADERS = ("policy", "gate", "status", "figure", "limit")
"""The columns shown whole (the detail takes what is left of the width)."""
_BASELINE_PREFIX = "baseline."
_INDENT = "  "
Row = tuple[str, ...]
"""A gate's cells: policy, gate, status, figure, limit, detail."""


def _add_detail(table: Table, used: int) -> bool:
    """The detail column, in the width the `used` columns leave, its text wrapped onto the
    lines below (a word longer than the column folded): nothing of it is lost. Not added
    (False) when fewer than `_MIN_DETAIL` columns are left."""
    room = out.width - used - _CELL_PADDING
    if room < _MIN_DETAIL:
        return False
    table.add_column("detail", overflow="fold", max_width=room)
    return True


def _flat_table(rows: list[Row], widths: list[int]) -> Table:
    """A line per gate naming its policy, the columns `widths` wide, then the detail."""
    table = Table()
    for header, width in zip(_HEADERS, widths, strict=True):
        table.add_column(header, no_wrap=True, min_width=width)
    _add_detail(table, table_width(widths))
    for row in rows:
        table.add_row(*row)
    return table


def _grouped_table(rows: list[Row]) -> tuple[Table, list[str]]:
    """A line per policy, under it a line per gate of the policy (a baseline gate shown by
    its key in the baseline file), then the detail if at least `_MIN_DETAIL` columns are
    left; only a gate name too long for the terminal is folded (in `_MIN_GATE` columns at
    least). The table and the legend lines that say so."""
    by_policy: dict[str, list[Row]] = {}
    for policy, gate, *cells in rows:
        shown = _INDENT + gate.removeprefix(_BASELINE_PREFIX)
        by_policy.setdefault(policy, []).append((shown, *cells))
    widths = whole_widths(_HEADERS[1:], [line for group in by_policy.values() for line in group])
    widths[0] = max(widths[0], *map(len, by_policy))
    table = Table()
    table.add_column(_HEADERS[1], overflow="fold")
    for header, width in zip(_HEADERS[2:], widths[1:], strict=True):
        table.add_column(header, no_wrap=True, min_width=width)
    narrowest = table_width([min(widths[0], _MIN_GATE), *widths[1:]])
    if narrowest > out.width:  # else the gate column shrinks to nothing
        table.width = narrowest
    gate_width = max(out.width, narrowest) - table_width(widths[1:]) - _CELL_PADDING
    detailed = _add_detail(table, table_width(widths))
    for policy, group in by_policy.items():
        table.add_row("\n".join(wrap_spec(policy, gate_width)))
        for line in group:
            table.add_row(*(line if detailed else line[:-1]))
        table.add_section()
    legend = []
    if any(row[1].startswith(_BASELINE_PREFIX) for row in rows):
        legend.append(
            f"a baseline gate is shown by its key: {_BASELINE_PREFIX}KEY in JSON, JUnit and stderr"
        )
    if not detailed:
        legend.append("detail: each tripped gate's on stderr, every gate's in --format json")
    return table, legend


GATES_SHOWN = 100
"""Gates the table draws, and tripped gates stderr names, at most (a baseline may hold
thousands of series): past it, the tripped ones first, then a line counting the rest;
`--format json` and `--junit` have every gate."""


def _shown(results: list[GateResult]) -> tuple[list[GateResult], str | None]:
    """The gates the table draws (the tripped first when they are more than GATES_SHOWN), and
    the line counting the others (None when it draws them all)."""
    if len(results) <= GATES_SHOWN:
        return results, None
    ordered = [r for r in results if not r.ok] + [r for r in results if r.ok]
    hidden = ordered[GATES_SHOWN:]
    failed = sum(not r.ok for r in hidden)
    return ordered[:GATES_SHOWN], (
        f"... and {counted(len(hidden), 'more gate')} ({failed} tripped): "
        "--format json and --junit have every gate"
    )


def _print_table(results: list[GateResult], run: str) -> None:
    """A row per gate at any width, at most GATES_SHOWN (`_shown`): naming its policy when the
    policy, gate, status, figure and limit fit whole on a line (the detail takes what is left,
    wrapped onto the row's next lines); else `_grouped_table`."""
    shown, more = _shown(results)
    rows: list[Row] = [
        (r.policy or "(run)", r.gate, "ok" if r.ok else "FAILED", *r.shown(), r.message)
        for r in shown
    ]
    # The title is text, wrapped to the width: a long run path never widens the table.
    out.print(f"stabledrl check {run}", highlight=False, soft_wrap=False)
    widths = whole_widths(_HEADERS, rows)
    if table_width([*widths, _MIN_DETAIL]) <= out.width:
        out.print(_flat_table(rows, widths))
    else:
        table, legend = _grouped_table(rows)
        out.print(table)
        print_legend(legend, out)
    if more is not None:
        out.print(more, highlight=False)


def _print_recorded(recorded: RecordedRun) -> None:
    """A scalar run's figures (what --write-baseline records): the observed behaviour, then
    the recorded series."""
    observed = recorded.observed
    spikes = _flagged_count(observed, "spike_steps", observed.recorded_spike_steps)
    nonfinite = _flagged_count(observed, "nonfinite_steps", observed.nonfinite_steps)
    out.print(
        f"observed collapse: {_collapse_text(observed)}; grad-norm spikes: {spikes}; "
        f"non-finite steps: {nonfinite}",
        highlight=False,
    )
    print_fitted(series_table(recorded.series, f"recorded series of {recorded.run}"), out)


def _print_figures(result: ReplayResult) -> None:
    """Today's figures per policy (what --write-baseline records), a column per metric headed
    by its baseline key; where they do not fit the width beside each other, each key's
    words stacked (`update_norm_max` on three lines); `n/a` where it records none."""
    table = Table(
        title=f"figures of {result.run} (observed collapse: {_collapse_text(result.observed)})",
        title_justify="left",
    )
    rules = policy_metrics()
    names = list(rules)
    figures = [[baseline_figure(p, name) for name in names] for p in result.policies]
    rows = [
        [format_figure(f, count=rules[n].integer) for f, n in zip(row, names, strict=True)]
        for row in figures
    ]
    # a spec is folded only where the table does not fit with its headers stacked
    beside = [stacked_width(name, (row[i] for row in rows)) for i, name in enumerate(names)]
    specs, widest = fold_specs([p.spec for p in result.policies], spec_room(beside, out.width))
    table.add_column("policy", no_wrap=True, min_width=widest)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for spec, row in zip(specs, rows, strict=True):
        table.add_row(spec, *row)
    print_fitted(table, out)


def _collapse_text(observed: Observed) -> str:
    """The observed collapse as the figures show it: its step, none, or not judged (what
    `--write-baseline` then leaves out)."""
    if observed.unjudged("first_reward_collapse") is not None:
        return "not judged"
    collapse = observed.first_reward_collapse
    return "none" if collapse is None else f"step {collapse}"


def _note_step_counts(run: str, steps: int, training: int | None, baseline: Baseline) -> None:
    """The note on stderr when the run has another number of steps than the baseline's run
    (`steps`; `training`: a verl recording's training steps, None for any other run, whose
    count verl's imported log has as its steps: either count matching is no note)."""
    theirs = baseline.run.get("steps")
    if theirs in (None, steps, training):
        return
    counts = f"{steps} steps"
    if training is not None:
        counts += f" (optimizer steps; {training} training steps, a line each in verl's log)"
    err.print(
        f"note: {run} has {counts}, the baseline's run had {theirs}: step counts are compared "
        "as they are",
        highlight=False,
    )


def _flagged_count(observed: Observed, name: str, steps: Sequence[int]) -> str:
    """How many steps the run-level rule of `name` flagged, or not judged."""
    return "not judged" if observed.unjudged(name) is not None else str(len(steps))


def _scalar_observed(
    run: Run, config: ReplayConfig, policy_options: list[str]
) -> tuple[Observed, list[str], list[Gap]]:
    """The observed behaviour of a scalar run (nothing to replay), with why each step it
    skipped was skipped and the gaps between its steps (both warned of); UsageError for an
    option that needs replayed policies, InputError for a run with no readable step."""
    with integrity_warnings_ignored():  # counted below
        skipped = skipped_reasons(run)
        if policy_options and skipped:  # the skipped files may have held the policy batches
            raise InputError(
                f"{run.location}: no readable step holds a policy batch "
                f"({steps_skipped(skipped)}); {', '.join(policy_options)} need(s) replayed "
                "policies"
            )
        if policy_options:
            raise UsageError(
                f"{run.location} is a scalar run (per-step scalars only, no policy batch): "
                f"{', '.join(policy_options)} need(s) replayed policies; gate it with "
                "--baseline, --max-spikes, --max-nonfinite, --max-lost-steps or --fail-on-collapse"
            )
        missing = run_gaps(run)
        observed = observe(run, config) if run.step_numbers else None
        refuse_recorded_again(run, "check")
        warn_damaged(run.location, skipped, missing, f"read {len(run.step_numbers)}")
        if observed is None:
            raise InputError(no_steps_message(run, skipped))
        return observed, skipped, missing


def _baseline_policies_replayable(run: Run, baseline: Baseline) -> None:
    """InputError naming the baseline when a policy it names cannot replay this run (a
    baseline of a run of token units naming stabledrl:level=token, checked against a run of
    sequence units): the input's fault, not a usage error of a --policy never given."""
    from stabledrl_cli.replay.step_data import run_unit  # imports torch

    unit = run_unit(run)
    for spec in baseline.policies:
        try:
            get_policy(spec).required_fields(unit)
        except UsageError as exc:
            raise InputError(f"{baseline.path}: {exc}") from None


def _baseline_loss_norm_agrees(run: Run, baseline: Baseline) -> None:
    """InputError naming the baseline when it gates policies replayed with another loss_norm
    than the run's (a per_rank run against a global run's baseline): equal arrays are other
    losses then, and its figures no limit of this run's."""
    theirs, ours = baseline.run.get("loss_norm"), replayed_loss_norm(run)
    if theirs is None or theirs == ours or not any(baseline.policies.values()):
        return
    raise InputError(
        f"{baseline.path}: its policy figures are of loss_norm {theirs}, {run.location} "
        f"replays as {ours}: other losses, not comparable; write the baseline from a {ours} "
        "run (--write-baseline)"
    )


def command(
    run: RunSourceArg,
    baseline_path: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            "-b",
            parser=local_file,
            help="Fail on a regression against this baseline file.",
        ),
    ] = None,
    policy: PolicyOpt = None,
    max_collapsed: MaxCollapsedOpt = None,
    max_discard_frac: MaxDiscardFracOpt = None,
    max_nonfinite: MaxNonfiniteOpt = None,
    max_spikes: MaxSpikesOpt = None,
    fail_on_collapse: FailOnCollapseOpt = False,
    max_lost_steps: MaxLostStepsOpt = None,
    write_baseline_path: Annotated[
        Path | None,
        typer.Option(
            "--write-baseline",
            parser=report_path,
            help="Record today's figures per policy to this file (replaced if it exists).",
        ),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option(
            "--junit",
            parser=report_path,
            help="Write a JUnit XML report, one case a gate (replaced if it exists).",
        ),
    ] = None,
    plot: PlotOpt = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Golden run: fail on a shift beyond tolerance either way; with "
            "--write-baseline, write float-noise tolerances.",
        ),
    ] = False,
    output_format: FormatOpt = "table",
    device: DeviceOpt = "auto",
    spike_factor: Annotated[
        float | None,
        number_option(
            "--spike-factor",
            kind=float,
            help=f"Spike threshold (default {DEFAULT_SPIKE_FACTOR:g}, or the baseline's).",
        ),
    ] = None,
    window: BaselineWindowOpt = None,
    drift_threshold: BaselineDriftThresholdOpt = None,
    collapse_window: BaselineCollapseWindowOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    threads: ThreadsOpt = None,
    engine: EngineOpt = "local",
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
) -> None:
    """Gate a run for CI: exit 1 if a policy trips a limit or regresses against a baseline."""
    with option_names():
        gates = Gates(
            max_collapsed=max_collapsed,
            max_discard_frac=max_discard_frac,
            max_nonfinite=max_nonfinite,
            max_spikes=max_spikes,
            fail_on_collapse=fail_on_collapse,
            max_lost_steps=max_lost_steps,
        )
    if baseline_path is None and not gates.any and write_baseline_path is None:
        raise UsageError(
            "nothing to check: give --baseline FILE, a --max-collapsed / --max-discard-frac / "
            "--max-nonfinite / --max-spikes / --max-lost-steps limit, --fail-on-collapse, or "
            "--write-baseline FILE"
        )
    if strict and baseline_path is None and write_baseline_path is None:
        raise UsageError(
            "--strict applies to a baseline: give --baseline FILE to compare with, or "
            "--write-baseline FILE to write a golden one"
        )
    check_outputs(run, plot, {"--write-baseline": write_baseline_path, "--junit": junit})
    if baseline_path is not None:
        for flag, report in (("--junit", junit), ("--plot", plot)):
            if report is not None and same_file(report, baseline_path):
                raise UsageError(
                    f"{flag} {report} is the baseline the check reads (-b {baseline_path}); "
                    "give the report a file of its own"
                )
    baseline = load_baseline(baseline_path) if baseline_path is not None else None
    with option_names():
        settings = check_settings(
            baseline,
            spike_factor=spike_factor,
            window=window,
            drift_threshold=drift_threshold,
            collapse_window=collapse_window,
        )
        config = replay_config(
            device=device,
            memory_budget=None if memory_budget is None else parse_size(memory_budget),
            threads=threads,
            spike_factor=settings.spike_factor,
            window=settings.window,
            drift_threshold=settings.drift_threshold,
            collapse_window=settings.collapse_window,
        )
    specs = list(policy or (baseline.policies if baseline else ())) or None
    check_policy_specs(policy)
    chosen = replay_engine(engine, workers, ray_address)

    opened = open_snapshot(run)
    started = time.perf_counter()
    result: ReplayResult | None = None
    if is_scalar_run(opened):
        policy_options = gates.policy_gates + (["--policy"] if policy else [])
        scalar_options = policy_options + (["--plot"] if plot else [])
        observed, skipped, missing = _scalar_observed(opened, config, scalar_options)
    else:
        if baseline is not None:
            _baseline_loss_norm_agrees(opened, baseline)
        if baseline is not None and not policy:
            _baseline_policies_replayable(opened, baseline)
        result = replay_with_progress(opened, specs, config, chosen, plot=plot)
        print_own_policy_note(opened, err)
        note_skipped(result)
        observed, skipped, missing = result.observed, result.skipped, result.missing
    live = result.live if result is not None else live_read(opened)
    note_live(live, run, "the check read", "check")
    note_stopped(opened, redacted(run))  # a run cut short passes its gates on fewer steps
    with integrity_warnings_ignored():
        recorded = recorded_run(opened, observed)
    steps = result.steps if result is not None else recorded.steps
    if baseline is not None:
        _note_step_counts(redacted(run), steps, recorded.training_steps, baseline)
    two_sided = strict or (baseline is not None and baseline.strict)
    lost = LostSteps(skipped=len(skipped), missing=missing_count(missing))
    results = evaluate(result, gates, baseline, strict=two_sided, recorded=recorded, lost=lost)
    seconds = time.perf_counter() - started
    policies = result.policies if result is not None else []

    # An output that cannot be written ends the check with exit 4, after its verdict is shown.
    def baseline_file(path: Path) -> str:
        # Strict as the baseline checked against is: rewriting a golden one keeps it golden.
        written = baseline_dict(
            result,
            settings,
            strict=two_sided,
            recorded=recorded,
            loss_norm=replayed_loss_norm(opened),
        )
        write_baseline(written, path)
        series = written.get("recorded")
        count = len(series) if isinstance(series, dict) else 0
        return (
            f"wrote baseline {path} ({counted(len(policies), 'policy')}, {count} recorded series)"
        )

    def junit_file(path: Path) -> str:
        write_junit(results, redacted(run), path, seconds=seconds)
        return f"wrote {path}"

    def plot_file(path: Path) -> str:
        assert result is not None
        plot_replay(result, path, opened)
        return f"wrote {path}"

    wrote, unwritten = write_outputs({
        "baseline": (write_baseline_path, baseline_file),
        "junit": (junit, junit_file),
        "plot": (plot if result is not None else None, plot_file),
    })  # fmt: skip

    tripped = [r for r in results if not r.ok]
    if output_format == "json":
        print_json({
            "run": redacted(run),
            "ok": not tripped,
            "gates_checked": len(results),
            "tripped": len(tripped),
            "baseline": str(baseline_path) if baseline_path is not None else None,
            "replay": settings.to_dict(),
            "scalar_run": result is None,
            "steps": steps,
            "skipped_steps": lost.skipped,
            "missing_steps": lost.missing,
            "live": None if live is None else live.to_dict(),
            "policies": [p.spec for p in policies],
            "gates": [r.to_dict() for r in results],
            "wrote": {name: None if path is None else str(path) for name, path in wrote.items()},
        })  # fmt: skip
    elif results:
        _print_table(results, redacted(run))
    elif result is not None:
        _print_figures(result)
    else:
        _print_recorded(recorded)
    if tripped:
        err.print(
            f"check failed: {len(tripped)} of {counted(len(results), 'gate')} tripped",
            highlight=False,
        )
        for r in tripped[:GATES_SHOWN]:
            err.print(f"  {r.policy or '(run)'} {r.gate}: {r.message}", highlight=False)
        if len(tripped) > GATES_SHOWN:
            hidden = counted(len(tripped) - GATES_SHOWN, "more tripped gate")
            err.print(f"  ... and {hidden}: --format json and --junit have them all")
    elif results:
        hold = "holds" if len(results) == 1 else "hold"
        err.print(f"check passed: {counted(len(results), 'gate')} {hold}", highlight=False)
    raise_unwritten(unwritten)
    if tripped:
        raise typer.Exit(1)
