"""The tables of `inspect` after its run table: the integrity findings, the observed behaviour
and the recorded series; and the cuts of long lists that all its tables share (`LIST_LIMIT`,
`SERIES_SHOWN`)."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.table import Table

from stabledrl_cli.cli._output import out
from stabledrl_cli.errors import LINE_BREAKS, counted
from stabledrl_cli.replay._format import format_number, format_steps
from stabledrl_cli.replay.inspection import GuardRecord, RunSummary
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.recorded import SeriesStats
from stabledrl_cli.tables import shortened

LIST_LIMIT = 20
"""Step lists, and integrity rows, longer than this are cut in the table (JSON has them
all)."""


def steps_text(steps: list[int], *, named: bool = False) -> str:
    return format_steps(steps, LIST_LIMIT, empty="none", separator=", ", more=" more", named=named)


def _nonfinite_text(observed: Observed) -> str:
    """The non-finite steps, and a verl recording's training steps that hold them, as verl's
    log numbers them: `8, 9 (training step 3)`."""
    text = steps_text(observed.nonfinite_steps)
    training = observed.nonfinite_training_steps
    if not (training and observed.nonfinite_steps):
        return text
    return f"{text} (training {steps_text(training, named=True)})"


SERIES_SHOWN = 200
"""Rows of a recorded-series table, and names of the run table's scalars row, shown (a step
may hold 10,000 scalars: `--format json` has them all)."""


NAME_SHOWN = 1000
"""Characters of a scalar's name that a table shows: whole for any name a log holds (an import
keeps names of up to 256), cut for a crafted step file's name of megabytes (`--format json`
has it whole)."""


def _name(name: str) -> str:
    """A scalar's name for a table (`shortened` at NAME_SHOWN)."""
    return shortened(name, NAME_SHOWN)


def names_text(names: list[str]) -> str:
    """`names` joined, at most SERIES_SHOWN of them (each `shortened`), the rest counted."""
    text = ", ".join(map(_name, names[:SERIES_SHOWN])) or "none"
    hidden = len(names) - SERIES_SHOWN
    return text if hidden <= 0 else f"{text} ... and {hidden:,} more: --format json has them all"


def series_table(series: dict[str, SeriesStats], title: str) -> Table:
    """One row per recorded scalar: steps, first, last, min, max (finite values; the number
    of non-finite ones beside the step count, wrapped under it where the width is short), at
    most SERIES_SHOWN of them, then a caption counting the rest.
    Each name is whole on its line: print it with `print_unbroken`."""
    hidden = len(series) - SERIES_SHOWN
    caption = f"... and {hidden:,} more series: --format json has them all" if hidden > 0 else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    rows = [(_name(name), stats) for name, stats in islice(series.items(), SERIES_SHOWN)]
    widest = max((cell_len(name) for name, _ in rows), default=0)
    table.add_column("scalar", no_wrap=True, min_width=widest)
    table.add_column("steps", justify="right")
    for name in ("first", "last", "min", "max"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, stats in rows:
        bad = f", {stats.nonfinite} non-finite" if stats.nonfinite else ""
        table.add_row(
            name,
            f"{stats.steps}{bad}",
            *(
                "n/a" if value is None else format_number(value, 4)
                for value in (stats.first, stats.last, stats.min, stats.max)
            ),
        )
    return table


def print_integrity(s: RunSummary) -> None:
    findings, groups = s.integrity.get("findings"), s.integrity.get("groups")
    if not isinstance(findings, list) or not isinstance(groups, list) or not findings:
        out.print(
            "Integrity: ok (every step whole, checksums match, no gaps)",
            highlight=False,
            soft_wrap=False,  # wrapped to the width
        )
        return
    title = f"Integrity: {len(findings)} finding(s)"
    if len(groups) < len(findings):
        title += " (consecutive steps with the same finding share a row)"
    table = Table(title=title, title_justify="left")
    table.add_column("kind", no_wrap=True)
    for column in ("step", "file", "message"):
        table.add_column(column, overflow="fold")  # a long step or name folds, never cut
    for g in groups[:LIST_LIMIT]:
        path = findings[g["first_finding"]]["path"]
        file, message = _group_file(path, g["steps"]), g["message"]
        # a file name is the run's data: a line break in it shows escaped, never as a line of
        # its own (`step-00000001.safetensors\n` would read as the real step's file)
        row = (file.translate(LINE_BREAKS), message.translate(LINE_BREAKS))
        table.add_row(g["kind"], _group_steps(g), *row)
    out.print(table)
    hidden = _hidden_rows(groups)
    if hidden is not None:
        out.print(hidden, soft_wrap=False)  # wrapped to the width


def _hidden_rows(groups: list[dict[str, Any]]) -> str | None:
    """The line under a table cut at LIST_LIMIT rows: how many rows of each kind it leaves
    out; None when it shows them all."""
    hidden = Counter(g["kind"] for g in groups[LIST_LIMIT:])
    if not hidden:
        return None
    kinds = ", ".join(f"{kind}: {count}" for kind, count in hidden.items())
    return f"... {counted(hidden.total(), 'more row')} ({kinds}): --format json has them all"


def _group_steps(group: dict[str, Any]) -> str:
    first, last = group["first_step"], group["last_step"]
    if first is None:
        return ""
    return str(first) if first == last else f"{first}..{last}"


def _group_file(path: str | None, steps: int) -> str:
    """The file of a row's first finding, and how many more the row holds."""
    if not path:
        return ""
    name = Path(path).name
    return name if steps == 1 else f"{name} (+{steps - 1} more)"


def observed_table(s: RunSummary) -> Table:
    obs, curve = s.observed, s.observed.reward_curve
    table = Table(
        title="Observed behaviour (recorded run)", show_header=False, title_justify="left"
    )
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "reward (rolling mean)",
        f"first {format_number(curve.first, 4)}, best {format_number(curve.best, 4)}, "
        f"last {format_number(curve.last, 4)} (window {curve.window})"
        if curve
        else "no reward recorded"
        if not obs.reward_steps
        else f"none read: {obs.no_reward_draws()}",
    )
    collapse = obs.first_reward_collapse
    warning = obs.collapse_warning
    rows = {
        "first reward collapse": (
            "first_reward_collapse",
            ("none" if collapse is None else f"step {collapse}")
            + f" (window {obs.collapse_window})",
        ),
        "collapse warning": (
            "collapse_warning_first_step",
            "none"
            if warning.first_step is None
            else f"first at step {warning.first_step} ({warning.rule_text}; "
            f"{len(warning.steps)} warning steps)",
        ),
        "grad-norm spikes": ("spike_steps", steps_text(obs.recorded_spike_steps, named=True)),
        "non-finite steps": ("nonfinite_steps", _nonfinite_text(obs)),
    }
    for what, (figure, text) in rows.items():
        unjudged = obs.unjudged(figure)  # "none" would claim a judgement no step had
        table.add_row(what, text if unjudged is None else f"not judged: {unjudged}")
    if obs.unscored_streak is not None:
        table.add_row("no policy-gradient update", obs.unscored_streak.text)
    floor = obs.noise_floor_logratio_std
    table.add_row(
        "noise floor (std log r, inner_step 0)",
        "not recorded"
        if floor is None
        else f"{format_number(floor, 4)} over {obs.noise_floor_units} {s.unit}s",
    )
    if s.guard is not None:
        table.add_row("guard", _guard_text(s.guard))
    return table


def _guard_text(guard: GuardRecord) -> str:
    """'skip, skip-step:window=8: 1 step skipped (step 21), 0 scaled, of 24 recorded'."""
    named = ", ".join(str(x) for x in (guard.mode, guard.rule) if x is not None)

    def done(count: int, what: str, steps: list[int]) -> str:
        return what + (f" ({steps_text(steps, named=True)})" if count else "")

    return (
        (f"{named}: " if named else "")
        + done(guard.skipped, f"{counted(guard.skipped, 'step')} skipped", guard.skipped_steps)
        + ", "
        + done(guard.scaled, f"{guard.scaled} scaled", guard.scaled_steps)
        + f", of {guard.steps} recorded"
    )
