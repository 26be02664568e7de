"""`stabledrl inspect RUN`: what was recorded, its integrity, and what the run observably did.

Exit codes: 0 (a corrupt or torn step is a finding, not fatal), 3 for a missing run, a path
that is not a run, an unreadable manifest, a manifest field of the wrong type, or a newer major
format version.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from stabledrl_cli._json import json_safe
from stabledrl_cli.cli._options import FormatOpt, RunArg
from stabledrl_cli.cli._output import OutputFormat, out, print_json
from stabledrl_cli.dump import open_run
from stabledrl_cli.replay._format import format_number, format_steps
from stabledrl_cli.replay.inspection import RunSummary, summarize

LIST_LIMIT = 20
"""Step lists longer than this are cut in the table (JSON has them all)."""


def _steps_text(steps: list[int]) -> str:
    return format_steps(steps, LIST_LIMIT, empty="none", separator=", ", more=" more")


def _print_tables(summary: RunSummary) -> None:
    data = json_safe(summary.to_dict())
    policy = data["policy"] or {}
    tokens = data["tokens_per_step"]
    run = Table(title=f"Run {data['run']}", show_header=False, title_justify="left")
    run.add_column("what", style="bold")
    run.add_column("value")
    rows = [
        ("format", f"v{data['format_version']} (written by stabledrl {data['tool_version']})"),
        ("created", str(data["created"])),
        ("policy", str(policy.get("spec"))),
        ("unit", data["unit"]),
        ("estimator", ", ".join(f"{k}={v}" for k, v in data["estimator"].items()) or "not given"),
        ("reward range", str(data["reward_range"]) if data["reward_range"] else "not given"),
        ("world size", str(data["world_size"])),
        ("geometry", str(data["geometry"]) if data["geometry"] else "none"),
        (
            "steps",
            f"{data['steps']} ({data['first_step']}..{data['last_step']})"
            if data["steps"]
            else "0",
        ),
        (
            f"scored {data['unit']}s / step",
            f"min {tokens['min']}, median {tokens['median']:g}, max {tokens['max']}"
            if tokens
            else "n/a",
        ),
        ("fields", ", ".join(data["fields"]) or "none"),
        ("scalars", ", ".join(data["scalars"]) or "none"),
        ("size on disk", f"{data['size_bytes'] / 1e6:.2f} MB"),
    ]
    rows += [
        (f"meta.{k}", v if isinstance(v, str) else json.dumps(v)) for k, v in data["meta"].items()
    ]
    for row in rows:
        run.add_row(*row)
    out.print(run)

    findings = data["integrity"]["findings"]
    if findings:
        table = Table(title=f"Integrity: {len(findings)} finding(s)", title_justify="left")
        for column in ("kind", "step", "file", "message"):
            table.add_column(column)
        for f in findings:
            name = Path(f["path"]).name if f["path"] else ""
            step = "" if f["step"] is None else str(f["step"])
            table.add_row(f["kind"], step, name, f["message"])
        out.print(table)
    else:
        out.print("Integrity: ok (every step file complete, checksums match, no gaps)")

    obs = data["observed"]
    curve = obs["reward_curve"]
    table = Table(
        title="Observed behaviour (recorded run)", show_header=False, title_justify="left"
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "reward (rolling mean)",
        f"first {format_number(curve['first'], 4)}, best {format_number(curve['best'], 4)}, "
        f"last {format_number(curve['last'], 4)} (window {curve['window']})"
        if curve
        else "no reward recorded",
    )
    collapse = obs["first_reward_collapse"]
    table.add_row("first reward collapse", "none" if collapse is None else f"step {collapse}")
    table.add_row("grad-norm spikes", _steps_text(obs["recorded_spike_steps"]))
    table.add_row("non-finite steps", _steps_text(obs["nonfinite_steps"]))
    floor = obs["noise_floor_logratio_std"]
    table.add_row(
        "noise floor (std log r, inner_step 0)",
        "not recorded"
        if floor is None
        else f"{floor:.4g} over {obs['noise_floor_units']} {data['unit']}s",
    )
    out.print(table)


def command(run: RunArg, output_format: FormatOpt = OutputFormat.table) -> None:
    """Show what a run recorded, its integrity, and its observed behaviour."""
    summary = summarize(open_run(run))
    if output_format == "json":
        print_json(summary.to_dict())
    else:
        _print_tables(summary)
