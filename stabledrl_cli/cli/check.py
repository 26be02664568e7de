"""`stabledrl check RUN`: a CI gate on a recorded run's replay.

Replays the run, then checks absolute gates (--max-collapsed, --max-discard-frac,
--max-nonfinite, per policy) and regressions against a baseline file (--baseline; schema in
replay/gate.py and the README). Every gate is evaluated and printed, passed or tripped; then
the exit code says whether any tripped.

Exit codes: 0 every gate holds; 1 a gate tripped (each named with its figure); 2 usage error
(no gate given, a replay setting that contradicts the baseline, an unknown policy, plot extra
missing); 3 bad input (a missing or corrupt run, a malformed baseline or one of a newer version).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stabledrl_cli.cli._options import (
    DeviceOpt,
    DriftThresholdOpt,
    FormatOpt,
    PlotOpt,
    PolicyOpt,
    RunArg,
    WindowOpt,
)
from stabledrl_cli.cli._output import OutputFormat, err, out, print_json
from stabledrl_cli.errors import UsageError


def _settings(
    baseline: Any, spike_factor: float | None, window: int | None, drift: float | None
) -> dict[str, Any]:
    """Replay settings: the baseline's (so a check compares like with like), else the defaults;
    an explicit option that contradicts the baseline is a usage error."""
    from stabledrl_cli.replay.engine import (
        DEFAULT_DRIFT_THRESHOLD,
        DEFAULT_SPIKE_FACTOR,
        DEFAULT_WINDOW,
    )

    given = {"spike_factor": spike_factor, "window": window, "drift_threshold": drift}
    if baseline is None:
        defaults = {
            "spike_factor": DEFAULT_SPIKE_FACTOR,
            "window": DEFAULT_WINDOW,
            "drift_threshold": DEFAULT_DRIFT_THRESHOLD,
        }
        return {k: defaults[k] if v is None else v for k, v in given.items()}
    for key, value in given.items():
        if value is not None and value != baseline.replay[key]:
            raise UsageError(
                f"--{key.replace('_', '-')} {value:g} differs from the baseline's "
                f"{baseline.replay[key]:g} ({baseline.path}); a check compares like with like: "
                "drop the option, or write a new baseline with it"
            )
    return dict(baseline.replay)


def _print_table(results: list[Any], run: str) -> None:
    table = Table(title=f"stabledrl check {run}", title_justify="left")
    for column in ("policy", "gate", "status", "figure", "limit", "detail"):
        table.add_column(column, overflow="fold")
    from stabledrl_cli.replay.gate import format_figure

    for r in results:
        table.add_row(
            r.policy or "(run)",
            r.gate,
            "ok" if r.ok else "FAILED",
            format_figure(r.figure) if r.figure is not None else "n/a",
            format_figure(r.limit) if r.limit is not None else "n/a",
            r.message,
        )
    out.print(table)


def _print_figures(result: Any) -> None:
    """Today's figures per policy (what --write-baseline records)."""
    from stabledrl_cli.replay.gate import POLICY_METRICS, format_figure

    collapse = result.observed.get("first_reward_collapse")
    table = Table(
        title=f"figures of {result.run} (observed collapse: "
        f"{'none' if collapse is None else f'step {collapse}'})",
        title_justify="left",
    )
    table.add_column("policy", overflow="fold")
    for name in POLICY_METRICS:
        table.add_column(name, justify="right")
    for p in result.policies:
        table.add_row(p.spec, *(format_figure(rule.measure(p)) for rule in POLICY_METRICS.values()))
    out.print(table)


def command(
    run: RunArg,
    baseline_path: Annotated[
        Path | None,
        typer.Option("--baseline", "-b", help="Fail on a regression against this baseline file."),
    ] = None,
    policy: PolicyOpt = None,
    max_collapsed: Annotated[
        int | None,
        typer.Option("--max-collapsed", help="Fail if a policy has more collapsed steps."),
    ] = None,
    max_discard_frac: Annotated[
        float | None,
        typer.Option("--max-discard-frac", help="Fail if a policy discards a larger fraction."),
    ] = None,
    max_nonfinite: Annotated[
        int | None,
        typer.Option(
            "--max-nonfinite", help="Fail if a policy has more steps with a non-finite update."
        ),
    ] = None,
    write_baseline: Annotated[
        Path | None,
        typer.Option("--write-baseline", help="Record today's figures per policy to this file."),
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write a JUnit XML report (one case a gate).")
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
    output_format: FormatOpt = OutputFormat.table,
    device: DeviceOpt = "auto",
    spike_factor: Annotated[
        float | None,
        typer.Option("--spike-factor", help="Spike threshold (default 10, or the baseline's)."),
    ] = None,
    window: WindowOpt = None,
    drift_threshold: DriftThresholdOpt = None,
) -> None:
    """Gate a run for CI: exit 1 if a policy trips a limit or regresses against a baseline."""
    from stabledrl_cli.dump import open_run
    from stabledrl_cli.replay.engine import ReplayConfig, replay_run
    from stabledrl_cli.replay.gate import (
        Gates,
        baseline_dict,
        evaluate,
        load_baseline,
        write_json,
        write_junit,
    )

    gates = Gates(
        max_collapsed=max_collapsed, max_discard_frac=max_discard_frac, max_nonfinite=max_nonfinite
    )
    if baseline_path is None and not gates.any and write_baseline is None:
        raise UsageError(
            "nothing to check: give --baseline FILE, a --max-collapsed / --max-discard-frac / "
            "--max-nonfinite limit, or --write-baseline FILE"
        )
    for target in (write_baseline, junit):
        if target is not None and not target.parent.is_dir():
            raise UsageError(f"{target}: directory {target.parent} does not exist")
    if plot is not None:
        from stabledrl_cli.replay.plot import check_plot_path, require_matplotlib

        check_plot_path(plot)
        require_matplotlib()  # before the replay: a missing extra fails fast
    baseline = load_baseline(baseline_path) if baseline_path is not None else None
    settings = _settings(baseline, spike_factor, window, drift_threshold)
    specs = list(policy) if policy else (list(baseline.policies) if baseline else None)

    opened = open_run(run)
    started = time.perf_counter()
    config = ReplayConfig(device=device, **settings)
    result = replay_run(opened, specs, config=config)
    if baseline is not None and baseline.run.get("steps") not in (None, result.steps):
        err.print(
            f"note: {run} has {result.steps} steps, the baseline's run had "
            f"{baseline.run['steps']}: step counts are compared as they are",
            highlight=False,
        )
    two_sided = strict or (baseline is not None and baseline.strict)
    results = evaluate(result, gates, baseline, strict=two_sided)
    seconds = time.perf_counter() - started

    if write_baseline is not None:
        write_json(baseline_dict(result, settings, strict=strict), write_baseline)
        err.print(
            f"wrote baseline {write_baseline} ({len(result.policies)} policies)", highlight=False
        )
    if junit is not None:
        write_junit(results, str(run), junit, seconds=seconds)
        err.print(f"wrote {junit}", highlight=False)
    if plot is not None:
        from stabledrl_cli.replay.plot import plot_replay

        plot_replay(result, plot, opened)
        err.print(f"wrote {plot}", highlight=False)

    tripped = [r for r in results if not r.ok]
    if output_format is OutputFormat.json:
        print_json({
            "run": str(run),
            "ok": not tripped,
            "gates_checked": len(results),
            "tripped": len(tripped),
            "baseline": str(baseline_path) if baseline_path is not None else None,
            "replay": settings,
            "policies": [p.spec for p in result.policies],
            "gates": [r.to_dict() for r in results],
            "wrote": {
                "baseline": str(write_baseline) if write_baseline is not None else None,
                "junit": str(junit) if junit is not None else None,
                "plot": str(plot) if plot is not None else None,
            },
        })  # fmt: skip
    elif results:
        _print_table(results, str(run))
    else:
        _print_figures(result)
    if tripped:
        err.print(f"check failed: {len(tripped)} of {len(results)} gates tripped", highlight=False)
        for r in tripped:
            err.print(f"  {r.policy or '(run)'} {r.gate}: {r.message}", highlight=False)
        raise typer.Exit(1)
    if results:
        err.print(f"check passed: {len(results)} gates hold", highlight=False)
