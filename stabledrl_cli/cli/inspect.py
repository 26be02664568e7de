"""`stabledrl inspect RUN`: what was recorded, its integrity, and what the run observably did.

Exit codes: 0 (a corrupt or torn step is a finding, not fatal), 3 for a missing run, a path
that is not a run, an unreadable manifest, a manifest field of the wrong type, or a newer major
format version.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from stabledrl_cli.cli._options import FormatOpt, RunArg
from stabledrl_cli.cli._output import OutputFormat, out, print_json
from stabledrl_cli.dump import Run, RunIntegrityWarning, open_run
from stabledrl_cli.replay.observed import observe

_LIST_LIMIT = 20  # step lists longer than this are cut in the table (JSON has them all)


def summarize(run: Run) -> dict[str, Any]:
    """Everything `inspect` reports, as JSON-ready data."""
    integrity = run.integrity  # checks every file in full first, so the rest reads trusted data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunIntegrityWarning)  # already in `integrity`
        headers = list(run.step_headers())
        observed = observe(run)
    manifest = run.manifest
    scored = np.array([s.num_scored_tokens for s in headers], dtype=np.int64)
    tokens = (
        {"min": int(scored.min()), "median": float(np.median(scored)), "max": int(scored.max())}
        if scored.size
        else None
    )
    return {
        "run": str(run.path),
        "format_version": manifest.get("format_version"),
        "tool_version": manifest.get("tool_version"),
        "created": manifest.get("created"),
        "meta": manifest.get("meta") or {},
        "policy": manifest.get("policy"),
        "unit": run.unit,
        "estimator": manifest.get("estimator") or {},
        "reward_range": list(run.reward_range) if run.reward_range else None,
        "world_size": manifest.get("world_size"),
        "geometry": run.geometry,
        "steps": len(headers),
        "first_step": headers[0].step if headers else None,
        "last_step": headers[-1].step if headers else None,
        "tokens_per_step": tokens,
        "fields": sorted(set().union(*(s.fields for s in headers))),
        "scalars": sorted(set().union(*(s.scalars for s in headers))),
        "size_bytes": run.size_bytes,
        "integrity": integrity.to_dict(),
        "observed": observed.to_dict(),
    }


def _steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    shown = ", ".join(str(s) for s in steps[:_LIST_LIMIT])
    more = len(steps) - _LIST_LIMIT
    return f"{shown} (+{more} more)" if more > 0 else shown


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _print_tables(data: dict[str, Any]) -> None:
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
        f"first {_number(curve['first'])}, best {_number(curve['best'])}, "
        f"last {_number(curve['last'])} (window {curve['window']})"
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
    data = summarize(open_run(run))
    if output_format is OutputFormat.json:
        print_json(data)
    else:
        _print_tables(data)
