"""The run table of `inspect`: what was recorded, one row a fact (format, policy, source, how
the recording ended, unit, estimator, reward range, world size, geometry, steps, fields,
scalars, size, meta)."""

from __future__ import annotations

from itertools import islice

from rich.table import Table

from stabledrl_cli.cli._inspect_tables import LIST_LIMIT, names_text, steps_text
from stabledrl_cli.cli._output import out
from stabledrl_cli.dump._integrity import SKIPPED_KINDS
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.dump._stop_notes import STOP_RESUMED
from stabledrl_cli.errors import counted, one_line
from stabledrl_cli.replay._format import format_number
from stabledrl_cli.replay.inspection import PositiveLogp, RunSummary, SketchWidth
from stabledrl_cli.tables import fold_specs, shortened, spec_room, stacked_width


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
        f"positive in {counted(len(positive.steps), 'step')} ({steps_text(positive.steps)}; "
        f"{first} at step {positive.steps[0]}): a log-probability is <= 0: logits, or a sign "
        "flipped?"
    )


def run_summary_table(s: RunSummary) -> Table:
    counts = s.tokens_per_step
    spec = shortened(str((s.policy or {}).get("spec", "not known")))  # a crafted one: 1 MB
    rows = [
        ("format", _format_text(s)),
        ("created", s.created if isinstance(s.created, str) else "not recorded"),
        ("run id", s.run_id or "not recorded (a run recorded before run ids)"),
        ("policy", spec),
        ("source", _source_text(s.source) if s.source else "recorded in the training loop"),
        *([("recording", _recording_text(s))] if _recording_told(s) else []),
        ("unit", s.unit),
        (
            "estimator",
            shortened(", ".join(f"{k}={v}" for k, v in s.estimator.items())) or "not given",
        ),
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
        ("scalars", names_text(s.scalars)),
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
            f"in flight: {counted(len(flying), 'step')} ({steps_text(flying)}) a live rank has "
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
    """The manifest's source entry in one line: its kind, then its other keys (`shortened`)."""
    rest = ", ".join(f"{k}={v}" for k, v in source.items() if k != "kind")
    return shortened(f"{source.get('kind')}" + (f" ({rest})" if rest else ""))


def _steps_row(s: RunSummary) -> str:
    if not s.steps:
        return "0"
    text = f"{s.steps} ({s.first_step}..{s.last_step})"
    if s.scalar_steps == s.steps:
        return f"{text}, scalars only: nothing to replay"
    if s.scalar_steps:
        return f"{text}, {s.scalar_steps} of them scalars only"
    return text


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


def _meta_rows(meta: dict[str, object]) -> list[tuple[str, str]]:
    """The run table's meta rows: the first META_KEYS_SHOWN keys, then a row counting the
    rest."""
    rows = [
        (f"meta.{shortened(k)}", shortened(v)) for k, v in islice(meta.items(), META_KEYS_SHOWN)
    ]
    hidden = len(meta) - META_KEYS_SHOWN
    if hidden > 0:
        rows.append(("meta ...", f"{hidden:,} more keys: --format json has them all"))
    return rows
