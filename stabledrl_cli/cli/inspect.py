"""`stabledrl inspect RUN`: what was recorded, its integrity, what the run observably did, and
its recorded series (any run, a scalar run of per-step scalars only included).

The run is a path or an fsspec URL (`memory://`, `file://`, `s3://`...), read in place.

Exit codes: 0 (a corrupt or torn step, or one whose data a replay cannot use, is a finding, not
fatal); 2 for a URL that cannot be read at all (an unknown or refused scheme, a filesystem
package not installed); 3 for a missing run (or a URL with nothing there), a path that is not a
run, an unreadable manifest, a manifest field of the wrong type, or a newer major format
version.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.table import Table

from stabledrl_cli.cli._options import FormatOpt, RunSourceArg
from stabledrl_cli.cli._output import out, print_json
from stabledrl_cli.dump._open import open_snapshot
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.dump._stop_notes import STOP_RESUMED
from stabledrl_cli.errors import LINE_BREAKS, counted, one_line
from stabledrl_cli.replay._format import format_number, format_steps
from stabledrl_cli.replay.inspection import PositiveLogp, RunSummary, SketchWidth, summarize
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.recorded import SeriesStats
from stabledrl_cli.replay.run_facts import SKIPPED_KINDS
from stabledrl_cli.tables import fold_specs, print_fitted, print_title, spec_room, stacked_width

LIST_LIMIT = 20
"""Step lists, and integrity rows, longer than this are cut in the table (JSON has them
all)."""


def _steps_text(steps: list[int], *, named: bool = False) -> str:
    return format_steps(steps, LIST_LIMIT, empty="none", separator=", ", more=" more", named=named)


def _nonfinite_text(observed: Observed) -> str:
    """The non-finite steps, and a verl recording's training steps that hold them, as verl's
    log numbers them: `8, 9 (training step 3)`."""
    text = _steps_text(observed.nonfinite_steps)
    training = observed.nonfinite_training_steps
    if not (training and observed.nonfinite_steps):
        return text
    return f"{text} (training {_steps_text(training, named=True)})"


def _writer_text(tool_version: object) -> str:
    """Which stabledrl wrote the run, as its manifest says (a rewritten one may not)."""
    if isinstance(tool_version, str):
        return f"written by stabledrl {tool_version}"
    return "writer not recorded"


def _format_text(s: RunSummary) -> str:
    """The run's format version and writer, then a packed archive's own version; of a newer
    minor version than this stabledrl knows, that what it adds is not read."""
    text = f"v{s.format_version} ({_writer_text(s.tool_version)})" + _newer(s.format_known)
    if s.archive_version is None:
        return text
    return f"{text}; archive v{s.archive_version}" + _newer(s.archive_known)


def _newer(known: str | None) -> str:
    """What a version newer than the `known` one this stabledrl reads leaves unread; "" of a
    version it knows (`known` None)."""
    if known is None:
        return ""
    return (
        f"; newer than the v{known} this stabledrl reads: fields it adds are not read "
        "(upgrade stabledrl)"
    )


def _world_text(s: RunSummary) -> str:
    """The world size, and of several ranks what a replay normalises over (loss_norm)."""
    if not isinstance(s.world_size, int) or s.world_size < 2:
        return str(s.world_size)
    if s.loss_norm == "per_rank":
        return f"{s.world_size} (loss_norm per_rank: each rank over its own part)"
    return f"{s.world_size} (loss_norm global: over every rank's part)"


def _reward_range_text(s: RunSummary) -> str:
    """The declared range; one the recorded rewards fall below says so, and that the collapse
    rule measures from their lowest instead (docs/collapse.md)."""
    if not s.reward_range:
        return "not given"
    rewards = s.series.get("reward_mean")
    lowest = None if rewards is None else rewards.min
    if lowest is None or lowest >= s.reward_range[0]:
        return str(s.reward_range)
    return (
        f"{s.reward_range}; the rewards fall below it (reward_mean {format_number(lowest)}): "
        "the collapse rule measures from their lowest"
    )


def _positive_text(positive: PositiveLogp) -> str:
    """The steps whose scored log-probabilities hold a positive value, and the first's."""
    first = f"{positive.first_field} up to {format_number(positive.first_largest)}"
    return (
        f"positive in {counted(len(positive.steps), 'step')} ({_steps_text(positive.steps)}; "
        f"{first} at step {positive.steps[0]}): a log-probability is <= 0: logits, or a sign "
        "flipped?"
    )


def _run_table(s: RunSummary) -> Table:
    counts = s.tokens_per_step
    spec = str((s.policy or {}).get("spec", "not known"))
    rows = [
        ("format", _format_text(s)),
        ("created", s.created if isinstance(s.created, str) else "not recorded"),
        ("run id", s.run_id or "not recorded (a run recorded before run ids)"),
        ("policy", spec),
        ("source", _source_text(s.source) if s.source else "recorded in the training loop"),
        *([("recording", _recording_text(s))] if _recording_told(s) else []),
        ("unit", s.unit),
        ("estimator", ", ".join(f"{k}={v}" for k, v in s.estimator.items()) or "not given"),
        ("reward range", _reward_range_text(s)),
        ("world size", _world_text(s)),
        ("geometry", _geometry_row(s)),
        ("steps", _steps_row(s)),
        (
            f"scored {s.unit}s / step",
            f"min {counts.min}, median {counts.median:g}, max {counts.max}"
            if counts
            else f"n/a ({_no_counts_reason(s)})",
        ),
        *([("log-probabilities", _positive_text(s.positive_logp))] if s.positive_logp else []),
        ("fields", ", ".join(s.fields) or "none"),
        ("scalars", _names_text(s.scalars)),
        ("size on disk", f"{s.size_bytes / 1e6:.2f} MB"),
    ]
    rows += _meta_rows(s.meta)
    labels = [what for what, _ in rows]
    room = spec_room([min(max(map(len, labels)), WHAT_WIDTH)], out.width)
    (policy,), widest = fold_specs([spec], room)  # broken at its commas, never in a value
    narrowest = min(
        stacked_width("", (word for what in labels for word in what.split())), WHAT_WIDTH
    )
    whole = min(max(widest, len(s.run_id or "")), spec_room([narrowest], out.width))
    table = Table(title=f"Run {s.run}", show_header=False, title_justify="left")
    # a meta key (the run's own text) past WHAT_WIDTH folds, so the values keep their room;
    # the labels wrap at their spaces for the run id and the policy's lines to be whole
    labels_width = min(WHAT_WIDTH, spec_room([whole], out.width))
    table.add_column("what", style="bold", overflow="fold", max_width=labels_width)
    table.add_column("value", overflow="fold", min_width=whole)  # a long list folds, never cut
    for what, value in rows:
        table.add_row(what, policy if what == "policy" else value)
    return table


def _no_counts_reason(s: RunSummary) -> str:
    """Why a run has no scored-entry counts: its steps are scalar ones, none could be read
    (a finding of a step the reader skips), or it has none."""
    if s.steps:
        return "no policy batch"
    findings = s.integrity.get("findings")
    skipped = isinstance(findings, list) and any(f["kind"] in SKIPPED_KINDS for f in findings)
    return "no readable step" if skipped else "no step"


def _recording_told(s: RunSummary) -> bool:
    """Whether the run says how its recording ended, or that it goes on."""
    return bool(
        s.recording_stops
        or s.recording_closed
        or s.recording_live
        or s.recording_died
        or s.recording_when_packed
    )


def _recording_text(s: RunSummary) -> str:
    """How the recording ended, as the run says: stopped (a failed write, a step the verl
    integration could not record: a line a rank
    that stopped, at most LIST_LIMIT), closed; or that a Recorder's process died without
    closing it, or that it goes on (as this machine's locks show); of an archive, how it stood
    when packed."""
    whose = "every rank's Recorder" if isinstance(s.world_size, int) and s.world_size > 1 else None
    closed = f"closed: {whose or 'its Recorder'} finished, the run gains no step"
    lines = []
    if s.recording_live:
        lines.append(f"under way: {_ranks(s.recording_live)} recording now")
    if s.in_flight_steps:
        flying = s.in_flight_steps
        lines.append(
            f"in flight: {counted(len(flying), 'step')} ({_steps_text(flying)}) a live rank has "
            "not written yet (no integrity finding)"
        )
    if s.recording_died:
        lines.append(f"ended unclosed: the process recording {_ranks(s.recording_died)} died")
    packed = s.recording_when_packed or {}
    if packed.get("live"):
        lines.append(
            f"under way when packed: {_ranks(packed['live'])} recording then; the archive "
            "holds the steps written by then"
        )
    if packed.get("died"):
        lines.append(
            f"ended unclosed when packed: the process recording {_ranks(packed['died'])} had died"
        )
    stops = [stopped_text(note) for note in s.recording_stops[:LIST_LIMIT]]
    hidden = len(s.recording_stops) - len(stops)
    if hidden:
        stops.append(f"... {counted(hidden, 'more rank')} stopped: --format json has them all")
    if s.recording_closed:
        stops = [f"{stops[-1]}; {closed}"] if len(stops) == 1 else [*stops, closed]
    return "\n".join([*lines, *stops])


def _ranks(ranks: list[int]) -> str:
    """`rank 0`, `ranks 0, 1`: at most LIST_LIMIT named, the rest counted."""
    named = ", ".join(map(str, ranks[:LIST_LIMIT]))
    more = f" and {len(ranks) - LIST_LIMIT} more" if len(ranks) > LIST_LIMIT else ""
    return f"rank {named}" if len(ranks) == 1 else f"ranks {named}{more}"


def stopped_text(stopped: dict[str, object]) -> str:
    """The manifest's recording_stopped in one line: where, and why (its reason, an error's
    text that may name a path holding a newline, on one line). A note of no step (null: the
    training stopped before its first step, as its reason says) names none; one a resume of
    its rank marked (`STOP_RESUMED`) says so, the later steps that rank wrote being in the run."""
    step = stopped.get("step")
    where = "" if step is None else f"at step {step} "
    after = (
        "resumed since, its rank's later steps appended"
        if stopped.get(STOP_RESUMED) is True
        else "the training's later steps are not in the run"
    )
    reason = one_line(str(stopped.get("reason")))
    return f"stopped {where}(rank {stopped.get('rank')}): {reason}; {after}"


def _source_text(source: dict[str, object]) -> str:
    """The manifest's source entry in one line: its kind, then its other keys."""
    rest = ", ".join(f"{k}={v}" for k, v in source.items() if k != "kind")
    return f"{source.get('kind')}" + (f" ({rest})" if rest else "")


def _steps_row(s: RunSummary) -> str:
    if not s.steps:
        return "0"
    text = f"{s.steps} ({s.first_step}..{s.last_step})"
    if s.scalar_steps == s.steps:
        return f"{text}, scalars only: nothing to replay"
    if s.scalar_steps:
        return f"{text}, {s.scalar_steps} of them scalars only"
    return text


SERIES_SHOWN = 200
"""Rows of a recorded-series table, and names of the run table's scalars row, shown (a step
may hold 10,000 scalars: `--format json` has them all)."""


def _names_text(names: list[str]) -> str:
    """`names` joined, at most SERIES_SHOWN of them, the rest counted."""
    text = ", ".join(names[:SERIES_SHOWN]) or "none"
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
    series = dict(islice(series.items(), SERIES_SHOWN))
    widest = max((cell_len(name) for name in series), default=0)
    table.add_column("scalar", no_wrap=True, min_width=widest)
    table.add_column("steps", justify="right")
    for name in ("first", "last", "min", "max"):
        table.add_column(name, justify="right", no_wrap=True)
    for name, stats in series.items():
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


def _geometry_text(s: RunSummary, geometry: dict[str, object]) -> str:
    """The manifest's geometry entry in one line (kind, cadence, storage, coverage), with the
    steps that hold geometry where some do not, and the widths k the steps' sketches have
    where they are not the manifest's one (a run resumed with another k; a Gram over more
    units than `max_gram_units`, captured as a sketch); the covered parameter list is in
    `--format json`."""
    kind = geometry.get("kind")
    parts = [str(kind or "?")]
    every = geometry.get("every")
    if isinstance(every, int) and every > 1:
        parts.append(f"every {every} steps")
    if kind != "none" and s.geometry_steps not in (s.steps, _cadence_steps(s, every)):
        parts.append(f"on {s.geometry_steps} of {counted(s.steps, 'step')}")
    widths = s.sketch_widths
    sketch = geometry.get("sketch")
    declared = sketch.get("k") if kind == "sketch" and isinstance(sketch, dict) else None
    if widths and {w.k for w in widths} != {declared}:
        held = ", ".join(f"k={w.k} on {_width_steps(w)}" for w in widths[:LIST_LIMIT])
        if len(widths) > LIST_LIMIT:
            held += f" ... and {len(widths) - LIST_LIMIT} more widths: --format json has them all"
        parts.append(f"a sketch {held} (over max_gram_units)" if kind == "gram" else held)
    elif declared is not None:
        parts.append(f"k={declared}")
    if "storage_dtype" in geometry:
        parts.append(str(geometry["storage_dtype"]))
    covered, numel = geometry.get("covered"), geometry.get("covered_numel")
    if isinstance(covered, list) and isinstance(numel, int):
        parts.append(f"{len(covered)} tensors, {numel:,} parameters covered")
    return ", ".join(parts)


def _cadence_steps(s: RunSummary, every: object) -> int | None:
    """The steps a geometry `every` N steps is on (step % N == 0) in a run of steps in a row;
    None where that cannot be told (a gap, no cadence)."""
    first, last = s.first_step, s.last_step
    if first is None or last is None or s.steps != last - first + 1:
        return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        return s.steps if every is None else None
    return last // every - (first + every - 1) // every + 1


def _width_steps(width: SketchWidth) -> str:
    """`steps 3..5` of steps in a row, `2 steps (3..7)` of steps between others, `step 3`."""
    first, last = width.first_step, width.last_step
    if width.steps == 1:
        return f"step {first}"
    if width.steps == last - first + 1:
        return f"steps {first}..{last}"
    return f"{counted(width.steps, 'step')} ({first}..{last})"


GEOMETRY_FIELDS = {GRAM_KEY: "gram", SKETCH_KEY: "sketch"}
"""The step fields that hold gradient geometry, and its kind."""


def _logged_geometry(fields: list[str]) -> str:
    """The geometry of a run whose manifest declares none: what its steps hold (a loop of
    one's own may log a Gram or a sketch without declaring it to the Recorder), else none."""
    kinds = [kind for field, kind in GEOMETRY_FIELDS.items() if field in fields]
    if not kinds:
        return "none"
    return f"{' and '.join(kinds)} on its steps (the manifest declares none)"


UNJOINED_TEXT = {
    "per_rank_grams": "the ranks recorded Gram matrices, which do not combine across ranks",
    "partial_sketches": "only some of the ranks recorded a sketch",
    "sketch_seeds_differ": "the ranks recorded sketches of different seeds, which do not join",
    "sketch_widths_differ": "the ranks recorded sketches of different widths k, which do not join",
}
"""What the ranks recorded where their join leaves it out, by `RunSummary.unjoined_geometry`."""


def _geometry_row(s: RunSummary) -> str:
    """The run's geometry: the manifest's entry or what its steps hold, and the steps whose
    ranks' geometry does not join (replay measures those with coefficient norms)."""
    joined = _geometry_text(s, s.geometry) if s.geometry else _logged_geometry(s.fields)
    unjoined = [
        f"on {counted(steps, 'step')} {UNJOINED_TEXT[kind]}"
        for kind, steps in s.unjoined_geometry.items()
    ]
    if not unjoined:
        return joined
    if joined == "none":
        joined = "the manifest declares none"
    return f"{joined}; {'; '.join(unjoined)} (replay uses coefficient norms there)"


WHAT_WIDTH = 32
"""The run table's first column at its widest (every label of its own fits)."""
META_KEYS_SHOWN = 50
"""Meta keys the run table shows (a config flattened into meta may hold 40,000: rich takes
0.2 ms a row to render, `--format json` has them all)."""
META_SHOWN = 200
"""Characters of a meta key or value the table shows (`--format json` has it whole)."""


def _meta_rows(meta: dict[str, object]) -> list[tuple[str, str]]:
    """The run table's meta rows: the first META_KEYS_SHOWN keys, then a row counting the
    rest."""
    rows = [
        (f"meta.{_shortened(k)}", _shortened(v)) for k, v in islice(meta.items(), META_KEYS_SHOWN)
    ]
    hidden = len(meta) - META_KEYS_SHOWN
    if hidden > 0:
        rows.append(("meta ...", f"{hidden:,} more keys: --format json has them all"))
    return rows


def _shortened(value: object) -> str:
    """A meta key or value as text, cut at META_SHOWN characters: a multi-MB one never prints
    whole."""
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) <= META_SHOWN:
        return text
    return f"{text[:META_SHOWN]}... ({len(text):,} characters; --format json has it whole)"


def _print_integrity(s: RunSummary) -> None:
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


def _observed_table(s: RunSummary) -> Table:
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
        "grad-norm spikes": ("spike_steps", _steps_text(obs.recorded_spike_steps, named=True)),
        "non-finite steps": ("nonfinite_steps", _nonfinite_text(obs)),
    }
    for what, (figure, text) in rows.items():
        unjudged = obs.unjudged(figure)  # "none" would claim a judgement no step had
        table.add_row(what, text if unjudged is None else f"not judged: {unjudged}")
    floor = obs.noise_floor_logratio_std
    table.add_row(
        "noise floor (std log r, inner_step 0)",
        "not recorded"
        if floor is None
        else f"{format_number(floor, 4)} over {obs.noise_floor_units} {s.unit}s",
    )
    return table


def command(run: RunSourceArg, output_format: FormatOpt = "table") -> None:
    """Show what a run recorded, its integrity, and its observed behaviour."""
    summary = summarize(open_snapshot(run))
    if output_format == "json":
        print_json(summary.to_dict())
    else:
        run_table = _run_table(summary)
        print_title(run_table, out)  # the run's path, however long, never widens the table
        out.print(run_table)
        _print_integrity(summary)
        out.print(_observed_table(summary))
        if summary.series:
            print_fitted(series_table(summary.series, "Recorded series (finite values)"), out)
