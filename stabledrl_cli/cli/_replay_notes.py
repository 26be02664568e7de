"""The lines on stderr that say what a replay left out or could not do: a rank whose recording
stopped, scalar, skipped and missing steps, sketches that do not join, threads left idle, a
--steps range that selects no step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stabledrl_cli.cli._output import err
from stabledrl_cli.dump import Run
from stabledrl_cli.errors import counted
from stabledrl_cli.replay.config import ReplayConfig, format_size, format_step_range
from stabledrl_cli.replay.result import ReplayResult

if TYPE_CHECKING:
    from stabledrl_cli.dump._integrity import Gap


def note_stopped(run: Run, named: str) -> None:
    """A warning on stderr for each rank whose recording stopped before the training ended
    (an interrupted training, a full disk: the run's `recording_stopped` notes, as `inspect`
    and `watch` show them), at most LIST_LIMIT: a replay, a check or a tune covers the steps
    before it only."""
    from stabledrl_cli.cli._inspect_run_table import stopped_text
    from stabledrl_cli.cli._inspect_tables import LIST_LIMIT

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
