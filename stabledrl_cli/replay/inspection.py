"""What `stabledrl inspect` reports about a run: what was recorded, its integrity, what the
run observably did (`observed.observe`) and its recorded series (`recorded.recorded_run`).
A scalar run (no policy batch: an imported log, an optimizer-hook recording) reads the same."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from stabledrl_cli.dump import Finding, IntegrityReport, Run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.dump._manifest import RECORDING_CLOSED, RECORDING_WHEN_PACKED, RUN_ID
from stabledrl_cli.dump._schema import GRAM_KEY, SKETCH_KEY
from stabledrl_cli.dump._step import Step
from stabledrl_cli.dump._stop_notes import RECORDING_STOPPED
from stabledrl_cli.dump._suspect_values import LOGP_FIELDS, positive_logp
from stabledrl_cli.dump._versions import known_version_below, parse_version
from stabledrl_cli.dump._views import ReadSteps
from stabledrl_cli.replay.guards import own_guard
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood, host_array
from stabledrl_cli.replay.observed import Observed, observe
from stabledrl_cli.replay.recorded import SeriesStats, recorded_run
from stabledrl_cli.replay.run_facts import in_flight_steps
from stabledrl_cli.vocab import GUARD_ACTION_CODES, GuardStepAction


@dataclass(frozen=True, kw_only=True)
class EntryCounts:
    """Scored entries per step over the run."""

    min: int
    median: float
    max: int


@dataclass(frozen=True, kw_only=True)
class SketchWidth:
    """The steps whose sketch is k wide."""

    k: int
    steps: int
    first_step: int
    last_step: int


@dataclass(frozen=True, kw_only=True)
class PositiveLogp:
    """The steps a replay reads whose scored log-probabilities (`LOGP_FIELDS`) hold a positive
    value, which none takes: logits passed, or a flipped sign (`positive_logp`)."""

    steps: list[int]
    first_field: str
    """The first such step's first field holding one."""
    first_largest: float
    """Its largest positive value there."""


@dataclass(frozen=True, kw_only=True)
class GuardRecord:
    """What the in-training guard did (`stabledrl_cli.guard`): its recorded `guard_action`,
    counted."""

    mode: str | None
    """skip | scale, as its `meta.guard` says (None: the manifest names no guard this version
    can read, `guards.own_guard`)."""
    rule: str | None
    """Its grad-norm rule's canonical spec (None as for `mode`)."""
    steps: int
    """Readable steps that recorded a `guard_action`."""
    skipped: int
    scaled: int
    skipped_steps: list[int]
    scaled_steps: list[int]


def guard_record(meta: dict[str, object], headers: Iterable[Step]) -> GuardRecord | None:
    """The run's `GuardRecord` from its manifest's `meta` and its step headers; None for a run
    with neither a readable `meta.guard` nor a step that recorded `guard_action`."""
    own = own_guard(meta)
    actions = {h.step: h.scalars["guard_action"] for h in headers if "guard_action" in h.scalars}
    if own is None and not actions:
        return None

    def done(action: GuardStepAction) -> list[int]:
        return sorted(n for n, code in actions.items() if code == GUARD_ACTION_CODES[action])

    skipped, scaled = done("skip"), done("scale")
    return GuardRecord(
        mode=None if own is None else own.mode,
        rule=None if own is None else own.spec,
        steps=len(actions),
        skipped=len(skipped),
        scaled=len(scaled),
        skipped_steps=skipped,
        scaled_steps=scaled,
    )


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """Everything `inspect` reports about a run."""

    run: str
    format_version: object
    """The manifest's format version, as written."""
    format_known: str | None
    """The newest version of the run's major this stabledrl knows, when the run's is a newer
    minor (whose added fields it leaves unread); None else."""
    archive_version: str | None
    """A packed archive's own format version (`Run.archive_version`); None for a directory."""
    archive_known: str | None
    """`format_known` of `archive_version`."""
    tool_version: object
    """The stabledrl version that wrote the run, as written."""
    created: object
    run_id: str | None
    """The run's identity (the manifest's `run_id`, new with each recording of the run); None
    for a run recorded before it existed."""
    meta: dict[str, object]
    """The training script's free-form notes."""
    policy: dict[str, object] | None
    """The manifest's policy entry (name, params, spec); None when the policy is not known."""
    source: dict[str, object] | None
    """Where the run came from (the manifest's `source`: an import, optimizer hooks), if given."""
    recording_stopped: dict[str, object] | None
    """The manifest's `recording_stopped` ({step, rank, reason}) when the recording stopped
    (a failed write, `Recorder.note_stop`): the run ends before the training did."""
    recording_stops: list[dict[str, object]]
    """Every rank's `recording_stopped` note, by rank (`Run.recording_stops`: the manifest's
    and each rank's own note file in a run of several ranks, as the integrity check listed
    them); empty when none stopped."""
    recording_closed: bool
    """Whether the manifest is marked `recording_closed` (its Recorder closed, its writes done:
    the run gains no step)."""
    recording_live: list[int]
    """The ranks a live Recorder is recording now, as this machine's locks show them
    (`Run.recorder_states`); empty for an archive or a run at a URL."""
    recording_died: list[int]
    """The ranks whose Recorder's process died without closing the run (killed, say): its
    lock file left in steps/, signed on this machine, held by no process."""
    recording_when_packed: dict[str, list[int]] | None
    """Of an archive packed from a run whose recording had not finished: {"live": the ranks a
    Recorder was recording then, "died": those whose process had died without closing the
    run} (the archive manifest's `recording_when_packed`); None else."""
    unit: str
    estimator: dict[str, object]
    reward_range: list[float] | None
    world_size: object
    loss_norm: str
    """How the ranks normalised their losses (the manifest's `loss_norm`; "global" when it
    says none): what a replay of a step joined from several ranks normalises over."""
    geometry: dict[str, object] | None
    """The manifest's geometry entry; None without recorded geometry."""
    unjoined_geometry: dict[str, int]
    """Steps whose ranks recorded geometry their join leaves out, by why
    (`Step.unjoined_why`: per_rank_grams, partial_sketches, sketch_seeds_differ,
    sketch_widths_differ); empty when
    none does."""
    geometry_steps: int
    """Readable steps whose ranks recorded gradient geometry (a Gram or a sketch, joined or
    not: `unjoined_geometry`): fewer than `steps` with a cadence (`every`), or after a
    resume with another."""
    sketch_widths: list[SketchWidth]
    """The widths k of the steps' sketches, each with its steps, in order of first step (a
    resumed run may record another k than its manifest's); empty without a sketch."""
    steps: int
    """Readable steps."""
    scalar_steps: int
    """Of those, steps without a policy batch (per-step scalars only)."""
    first_step: int | None
    last_step: int | None
    tokens_per_step: EntryCounts | None
    """Over the steps that hold a policy batch; None without one."""
    fields: list[str]
    """Every array field some step holds."""
    scalars: list[str]
    """Every scalar some step holds."""
    size_bytes: int
    integrity: dict[str, object]
    """{"ok": bool, "findings": [...], "groups": [...]}: the full check of every file, and an
    `invalid` finding for each step whose data a replay cannot use (it skips them), one a step
    and file; `groups` are the findings as the table shows them (`group_findings`). A step in
    flight (`in_flight_steps`) is no finding."""
    in_flight_steps: list[int]
    """The steps of a live run some rank has not written yet and may still write
    (`run_facts.in_flight_steps`: its Recorder is live, has noted no stop and has not gone past
    them): neither readable nor lost; empty once every rank's Recorder closed."""
    positive_logp: PositiveLogp | None
    """The steps whose scored log-probabilities hold a positive value; None when none does."""
    observed: Observed
    guard: GuardRecord | None
    """What the guard the run was recorded under did; None for an unguarded run."""
    series: dict[str, SeriesStats]
    """Every recorded scalar (but step and wall_time) over the run: count, first, last, min,
    max, mean, median of its finite values, and how many were not finite."""

    def to_dict(self) -> dict[str, object]:
        """The `inspect --format json` object."""
        return asdict(self)


def _unjoined_steps(headers: Iterable[Step]) -> dict[str, int]:
    """`RunSummary.unjoined_geometry` of the run's steps `headers`."""
    return dict(sorted(Counter(s.unjoined_why for s in headers if s.unjoined_why).items()))


def _sketch_widths(headers: Iterable[Step]) -> list[SketchWidth]:
    """`RunSummary.sketch_widths` of the run's steps `headers` (in step order)."""
    steps: dict[int, list[int]] = {}
    for header in headers:
        if header.sketch_width is not None:
            steps.setdefault(header.sketch_width, []).append(header.step)
    return [
        SketchWidth(k=k, steps=len(held), first_step=held[0], last_step=held[-1])
        for k, held in sorted(steps.items(), key=lambda item: item[1][0])
    ]


@dataclass(frozen=True, kw_only=True)
class FindingGroup:
    """Findings of one kind and reason on consecutive steps of the run, as one row: a rank
    that died at step 3 of 5000 is one group of 4997 `missing_rank` findings."""

    kind: str
    first_step: int | None
    last_step: int | None
    steps: int
    """Findings in the group, one a step."""
    first_finding: int
    """The index of its first finding among the findings grouped (its file is that one's)."""
    message: str
    """The finding's own message for one; `steps A..B (N steps): REASON` for several."""


def _reason(finding: Finding) -> str:
    """The finding's message without its leading `step N: `."""
    prefix = f"step {finding.step}: "
    return finding.message.removeprefix(prefix)


def group_findings(findings: list[Finding], readable: Iterable[int]) -> list[FindingGroup]:
    """The findings as rows, in the order of each row's first finding: a finding joins a row
    of its kind and reason whose last step is the run's step just before its own, among the
    steps the run knows (`readable` ones and those of a finding). A gap or a finding of no
    step is a row of its own."""
    stepped = [f.step for f in findings if f.step is not None and f.kind != "gap"]
    known = sorted({*readable, *stepped})
    before = dict(zip(known[1:], known, strict=False))
    rows: list[list[int]] = []
    ending: dict[tuple[str, str, int], list[list[int]]] = {}
    """The rows a finding can still join, by (kind, reason, last step): one a rank's file."""
    for index, finding in enumerate(findings):
        if finding.step is None or finding.kind == "gap":
            rows.append([index])
            continue
        kind, reason = finding.kind, _reason(finding)
        previous = before.get(finding.step)
        joinable = [] if previous is None else ending.get((kind, reason, previous), [])
        if joinable:
            row = joinable.pop(0)
        else:
            row = []
            rows.append(row)
        row.append(index)
        ending.setdefault((kind, reason, finding.step), []).append(row)
    return [_group(findings, row) for row in rows]


def _group(findings: list[Finding], row: list[int]) -> FindingGroup:
    first, last = findings[row[0]], findings[row[-1]]
    message = first.message
    if len(row) > 1:
        message = f"steps {first.step}..{last.step} ({len(row)} steps): {_reason(first)}"
    return FindingGroup(
        kind=first.kind,
        first_step=first.step,
        last_step=last.step,
        steps=len(row),
        first_finding=row[0],
        message=message,
    )


def _mapping(value: object) -> dict[str, object]:
    return dict(value) if isinstance(value, dict) else {}


def _replayable(
    run: Run,
) -> tuple[list[Finding], NoiseFloor, OwnLikelihood, PositiveLogp | None]:
    """An `invalid` finding for each readable step whose data a replay cannot use, checked by
    replay's own code (`step_data.replay_rejection`), and the noise floor and collapse-warning
    measurements of the other steps, as a replay pools them (a rejected step adds nothing),
    and those of them that hold a positive log-probability."""
    findings: list[Finding] = []
    floor, likelihood = NoiseFloor(), OwnLikelihood()
    positive: list[int] = []
    first: tuple[str, float] | None = None
    for step in run.steps():
        if step.is_scalar:
            continue
        # Replay's checks are torch's: loaded here, at the first policy batch (a scalar run's
        # inspect, and the commands' help, never load it).
        from stabledrl_cli.replay.step_data import (
            host_measures,
            host_token_counts,
            replay_rejection,
            run_unit,
        )

        rejected, arrays = replay_rejection(run, step)
        if rejected is not None:
            findings.append(Finding("invalid", step.step, None, rejected[1]))
            continue
        gathered, moments = host_measures(step, arrays, run_unit(run))
        likelihood.extend(gathered)
        floor.extend(moments)
        logps = {name: host_array(arrays[name]) for name in LOGP_FIELDS if name in arrays}
        tokens = host_token_counts(arrays, run_unit(run))
        found = positive_logp(logps, host_array(arrays["mask"]), tokens)
        if found is not None:
            positive.append(step.step)
            first = first or found
    held = None
    if first is not None:
        held = PositiveLogp(steps=positive, first_field=first[0], first_largest=first[1])
    return findings, floor, likelihood, held


def summarize(run: Run) -> RunSummary:
    """Everything `inspect` reports about `run`; a step a replay would skip for its data is a
    finding too (kind `invalid`). One pass reads each step file whole, its checksums checked
    before any of its data is used; the integrity check and the headers after it find each
    file checked already, so a file is read once. The headers are walked once after the pass:
    the observed behaviour and the recorded series are derived from that walk."""
    with integrity_warnings_ignored():  # in `integrity` below
        invalid, floor, likelihood, positive = _replayable(run)
        report = run.integrity
        headers = list(run.step_headers())
        read = ReadSteps.of(run, headers)
        observed = observe(read, noise_floor=floor, likelihood=likelihood)
        recorded = recorded_run(read, observed)
    flying = in_flight_steps(run)
    findings = [
        f for f in [*report.findings, *invalid] if f.kind != "missing_rank" or f.step not in flying
    ]
    integrity = IntegrityReport(findings).to_dict()
    integrity["groups"] = [asdict(g) for g in group_findings(findings, (s.step for s in headers))]
    manifest = run.manifest
    scored = np.array([s.num_scored_tokens for s in headers if not s.is_scalar], dtype=np.int64)
    counts = (
        EntryCounts(min=int(scored.min()), median=float(np.median(scored)), max=int(scored.max()))
        if scored.size
        else None
    )
    policy = manifest.get("policy")
    geometry = run.geometry
    live, died = run.recorder_ranks()
    packed = manifest.get(RECORDING_WHEN_PACKED)
    archive = run.archive_version
    return RunSummary(
        run=run.location,
        format_version=manifest.get("format_version"),
        format_known=known_version_below(parse_version(manifest["format_version"], run.location)),
        archive_version=None if archive is None else f"{archive[0]}.{archive[1]}",
        archive_known=None if archive is None else known_version_below(archive),
        tool_version=manifest.get("tool_version"),
        created=manifest.get("created"),
        run_id=manifest.get(RUN_ID),
        meta=_mapping(manifest.get("meta")),
        policy=dict(policy) if isinstance(policy, dict) else None,
        source=recorded.source,
        recording_stopped=_mapping(manifest.get(RECORDING_STOPPED)) or None,
        recording_stops=[dict(note) for note in run.listed_recording_stops],
        recording_closed=manifest.get(RECORDING_CLOSED) is True,
        recording_live=live,
        recording_died=died,
        recording_when_packed=(
            {"live": packed.get("live", []), "died": packed.get("died", [])} if packed else None
        ),
        unit=run.unit,
        estimator=_mapping(manifest.get("estimator")),
        reward_range=list(run.reward_range) if run.reward_range else None,
        world_size=manifest.get("world_size"),
        loss_norm=run.loss_norm,
        geometry=dict(geometry) if geometry else None,
        unjoined_geometry=_unjoined_steps(headers),
        geometry_steps=sum(1 for h in headers if (h.fields | h.unjoined) & {GRAM_KEY, SKETCH_KEY}),
        sketch_widths=_sketch_widths(headers),
        steps=len(headers),
        scalar_steps=recorded.scalar_steps,
        first_step=headers[0].step if headers else None,
        last_step=headers[-1].step if headers else None,
        tokens_per_step=counts,
        fields=sorted(set().union(*(s.fields for s in headers))),
        scalars=sorted(set().union(*(s.scalars for s in headers))),
        size_bytes=run.size_bytes,
        integrity=integrity,
        in_flight_steps=sorted(flying),
        positive_logp=positive,
        observed=observed,
        guard=guard_record(_mapping(manifest.get("meta")), headers),
        series=recorded.series,
    )
