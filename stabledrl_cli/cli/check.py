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
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from stabledrl_cli.cli._check_baseline import (
    baseline_loss_norm_agrees,
    baseline_policies_replayable,
    compare_step_counts,
)
from stabledrl_cli.cli._check_view import print_figures, print_recorded, print_table, print_verdict
from stabledrl_cli.cli._live import note_live
from stabledrl_cli.cli._option_names import option_names
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
from stabledrl_cli.cli._output import err, print_json
from stabledrl_cli.cli._replay_notes import note_skipped, note_stopped, warn_damaged
from stabledrl_cli.cli._replay_outputs import check_outputs, same_file
from stabledrl_cli.cli._replay_run import check_policy_specs, replay_engine, replay_with_progress
from stabledrl_cli.cli._writes import raise_unwritten, write_outputs
from stabledrl_cli.dump import Run
from stabledrl_cli.dump._integrity import Gap, integrity_warnings_ignored, missing_count
from stabledrl_cli.dump._live import live_read
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.errors import InputError, UsageError, counted
from stabledrl_cli.replay.baseline import check_settings
from stabledrl_cli.replay.baseline_read import load_baseline
from stabledrl_cli.replay.baseline_write import baseline_dict, write_baseline
from stabledrl_cli.replay.config import (
    DEFAULT_SPIKE_FACTOR,
    ReplayConfig,
    parse_size,
    replay_config,
)
from stabledrl_cli.replay.evaluation import evaluate
from stabledrl_cli.replay.gate import Gates, LostSteps
from stabledrl_cli.replay.junit import write_junit
from stabledrl_cli.replay.observed import Observed, observe
from stabledrl_cli.replay.plot import plot_replay
from stabledrl_cli.replay.recorded import recorded_run
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
    check_outputs(
        run,
        plot,
        {"--write-baseline": write_baseline_path, "--junit": junit},
        json_results=output_format == "json",
    )
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
    named = opened.location  # as replay's and inspect's reports name it, a URL redacted
    started = time.perf_counter()
    result: ReplayResult | None = None
    if is_scalar_run(opened):
        policy_options = gates.policy_gates + (["--policy"] if policy else [])
        scalar_options = policy_options + (["--plot"] if plot else [])
        observed, skipped, missing = _scalar_observed(opened, config, scalar_options)
    else:
        if baseline is not None:
            baseline_loss_norm_agrees(opened, baseline)
        if baseline is not None and not policy:
            baseline_policies_replayable(opened, baseline)
        result = replay_with_progress(opened, specs, config, chosen, plot=plot)
        print_own_policy_note(opened, err)
        note_skipped(result)
        observed, skipped, missing = result.observed, result.skipped, result.missing
    live = result.live if result is not None else live_read(opened)
    note_live(live, run, "the check read", "check")
    note_stopped(opened, named)  # a run cut short passes its gates on fewer steps
    with integrity_warnings_ignored():
        recorded = recorded_run(opened, observed)
    steps = result.steps if result is not None else recorded.steps
    short_of_baseline = (
        compare_step_counts(named, steps, recorded.training_steps, baseline)
        if baseline is not None
        else None
    )
    two_sided = strict or (baseline is not None and baseline.strict)
    lost = LostSteps(skipped=len(skipped), missing=missing_count(missing))
    results = evaluate(
        result,
        gates,
        baseline,
        strict=two_sided,
        recorded=recorded,
        lost=lost,
        short_of_baseline=short_of_baseline,
    )
    seconds = time.perf_counter() - started
    policies = result.policies if result is not None else []

    # An output that cannot be written ends the check with exit 4, after its verdict is shown.
    def baseline_file(path: Path) -> str:
        # Strict as the baseline checked against is: rewriting a golden one keeps it golden.
        # Its policies too, unless --policy names others: the catalogue replayed for a baseline
        # that names none is not written into it.
        kept = result
        if result is not None and baseline is not None and not policy:
            in_baseline = [p for p in result.policies if p.spec in baseline.policies]
            kept = replace(result, policies=in_baseline)
        written = baseline_dict(
            kept,
            settings,
            strict=two_sided,
            recorded=recorded,
            loss_norm=replayed_loss_norm(opened),
        )
        write_baseline(written, path)
        series, gated = written.get("recorded"), written["policies"]
        count = len(series) if isinstance(series, dict) else 0
        total = len(gated) if isinstance(gated, dict) else 0
        return f"wrote baseline {path} ({counted(total, 'policy')}, {count} recorded series)"

    def junit_file(path: Path) -> str:
        write_junit(results, named, path, seconds=seconds)
        return f"wrote {path}"

    def plot_file(path: Path) -> str:
        assert result is not None
        plot_replay(result, path, opened)
        return f"wrote {path}"

    wrote, unwritten = write_outputs({
        "baseline": ("--write-baseline", write_baseline_path, baseline_file),
        "junit": ("--junit", junit, junit_file),
        "plot": ("--plot", plot if result is not None else None, plot_file),
    })  # fmt: skip

    tripped = [r for r in results if not r.ok]
    if output_format == "json":
        print_json({
            "run": named,
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
        print_table(results, named)
    elif result is not None:
        print_figures(result)
    else:
        print_recorded(recorded)
    print_verdict(results)
    raise_unwritten(unwritten)
    if tripped:
        raise typer.Exit(1)
