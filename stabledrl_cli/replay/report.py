"""The human output of a replay: rich tables on stdout (the per-policy summary, the observed
run, and with `--detail` or `--steps` the per-step rows and the flagged steps' sequences)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from stabledrl_cli.replay import columns
from stabledrl_cli.replay._format import format_number, format_steps
from stabledrl_cli.replay.columns import CellFormat
from stabledrl_cli.replay.config import format_step_range
from stabledrl_cli.replay.observed import CollapseWarning
from stabledrl_cli.replay.result import PolicyResult, ReplayResult
from stabledrl_cli.vocab import MetricGroup

BEST_RULE = (
    "best: fewest bias steps, then the lowest discarded mass, among policies without risk "
    "steps; none when every policy has risk steps or one policy is replayed. risk = steps whose "
    "one-step update is non-finite or spikes; bias = steps where net_push's rolling mean is low"
)
"""The legend line stating the rule that picks `best`."""
LIST_LIMIT = 8
"""Step lists longer than this are cut in the table (JSON has them all)."""
FOOTER = (
    "A replay is a one-step counterfactual: each step's recorded batch and weights, scored by "
    "another policy. It does not simulate the trajectory that policy would have trained."
)
_CAPTIONS = {
    "coef": "* update norm = coefficient norm ||coef||, a proxy: the run recorded no "
    "gradient geometry",
    "mixed": "* on the {uncovered:.0%} of steps without gradient geometry, update norm = "
    "coefficient norm ||coef||, a proxy in other units (spikes compare each step with steps "
    "of its own kind)",
}


def _marks(p: PolicyResult) -> list[str]:
    return [m for m, on in (("own", p.own), ("best", p.best)) if on]


def print_summary(
    result: ReplayResult, console: Console, metrics: Sequence[MetricGroup] = ()
) -> None:
    """One row per policy, the run's own policy and the best one marked; `metrics`: the
    groups of on-request columns to add (their whole-run figures)."""
    caption = _CAPTIONS.get(result.geometry)
    if caption is not None:
        caption = caption.format(uncovered=1 - result.geometry_coverage)
    star = "*" if caption else ""
    table = Table(
        title=f"Replay of {result.run}: {result.steps} steps, geometry {result.geometry} "
        f"(coverage {result.geometry_coverage:.0%})",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    figures = [c.figure for c in columns.gated_columns() if c.figure is not None]
    extra = [c for c in columns.summary_columns() if c.group in metrics and c.table is not None]
    headers = [
        "policy", "discard", "+A/-A", "mass", "clipped", f"norm med{star}", f"norm max{star}",
        "cos own", "spikes", "bias", "risk", *figures,
        *(c.table.header for c in extra if c.table is not None),
    ]  # fmt: skip
    for header in headers:
        table.add_column(header, overflow="fold")
    for p in result.policies:
        s = p.summary
        marks = _marks(p)
        if s.update_norm_approximate:
            marks.append("approx. norm")
        table.add_row(
            p.spec + (f" ({', '.join(marks)})" if marks else ""),
            f"{s.discard_frac:.1%}",
            f"{s.discarded_pos}/{s.discarded_neg}",
            "n/a" if s.discarded_mass_frac is None else f"{s.discarded_mass_frac:.1%}",
            str(s.clipped),
            format_number(s.update_norm_median),
            format_number(s.update_norm_max),
            format_number(s.cosine_to_own_median),
            format_steps(s.spike_steps, LIST_LIMIT),
            str(len(s.drift_steps)),
            format_steps(s.collapsed_steps, LIST_LIMIT),
            *(format_number(s.column_figures.get(name)) for name in figures),
            *(
                _cell(s.column_figures.get(c.name), c.table.format)
                for c in extra
                if c.table is not None
            ),
        )
    console.print(table)
    print_observed(result, console)
    own = result.own
    if own is None:
        note = (
            f"the run's own policy ({result.run_policy_spec or 'not recorded'}) is not among "
            "the replayed policies"
        )
    else:
        s = own.summary
        note = (
            f"own policy {own.spec}: loss parity {format_number(s.loss_parity)} (median "
            f"relative error of -J vs the recorded loss), fidelity {format_number(s.fidelity)}"
            + (" (needs gradient geometry)" if s.fidelity is None else "")
        )
    for line in (note, BEST_RULE, FOOTER):
        console.print(line, highlight=False)


def warning_text(warning: CollapseWarning, collapse: int | None) -> str:
    """The collapse warning in one line, beside the observed collapse (no lead is claimed for
    a policy's one-step risk flags)."""
    fell = f"own-sample likelihood fell by > {warning.drop:g} nats"
    head = "none" if warning.first_step is None else f"first at step {warning.first_step} ({fell})"
    seen = "none" if collapse is None else f"at {collapse}"
    return f"collapse warning: {head}; observed collapse {seen}"


def print_observed(result: ReplayResult, console: Console) -> None:
    """The recorded run's collapse, spikes and noise floor, and the run's collapse warning."""
    obs = result.observed
    collapse = obs.first_reward_collapse
    console.print(
        "observed (recorded run): first reward collapse "
        + ("none" if collapse is None else f"at step {collapse}")
        + "; recorded grad-norm spikes: "
        + format_steps(obs.recorded_spike_steps, LIST_LIMIT)
        + f"; noise floor std log r: {format_number(obs.noise_floor_logratio_std)}",
        highlight=False,
    )
    console.print(warning_text(obs.collapse_warning, collapse), highlight=False)


def _cell(value: object, how: CellFormat) -> str:
    if how == "int":
        return "n/a" if value is None else str(value)
    number = value if isinstance(value, (int, float)) else None
    if how == "percent":
        return "n/a" if number is None or math.isnan(number) else f"{number:.1%}"
    return format_number(number, 4 if how == "number4" else 3)


def print_detail(
    result: ReplayResult, console: Console, metrics: Sequence[MetricGroup] = ()
) -> None:
    """Per-step rows of the reported range, one table a policy (cells and flags as declared
    in `columns.COLUMNS`, with the on-request columns of `metrics`), then the flagged steps'
    top sequences."""
    shown = columns.table_columns(tuple(metrics))
    flags = [c.name for c in columns.reported_columns() if c.flag]
    span = format_step_range(result.step_range)
    for p in result.policies:
        marks = _marks(p)
        table = Table(
            title=f"{p.spec}{' [' + ', '.join(marks) + ']' if marks else ''}: steps {span}",
            title_justify="left",
        )
        for column in shown:
            assert column.table is not None
            table.add_column(column.table.header)
        table.add_column("flags")
        for row in p.series.iter_rows():
            cells = [_cell(row[c.name], c.table.format) for c in shown if c.table is not None]
            table.add_row(*cells, ",".join(name for name in flags if row[name]) or "-")
        console.print(table)
        for number, seqs in sorted(p.detail.items()):
            top = Table(
                title=f"{p.spec} step {number}: sequences contributing most", title_justify="left"
            )
            for header in ("seq id", "group", "reward", "advantage", "log ratio", "contribution"):
                top.add_column(header)
            for seq in seqs:
                top.add_row(
                    str(seq.seq_id),
                    "-" if seq.group is None else str(seq.group),
                    format_number(seq.reward),
                    format_number(seq.advantage),
                    format_number(seq.log_ratio),
                    format_number(seq.contribution),
                )
            console.print(top)
