"""What a recorded run says of itself before anything is replayed (no torch): its own policy's
canonical spec, the steps its reader skips, and why a run yields no step at all.

`check` on a scalar run, `diff` of two runs that never part and every command's refusal of an
unreadable run use these without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stabledrl_cli.dump import Finding, Run
from stabledrl_cli.dump._integrity import SKIPPED_KINDS, Gap, gaps
from stabledrl_cli.dump._live import in_flight, stopped_ranks, whole_now
from stabledrl_cli.errors import InputError, UsageError, counted, quoted_spec
from stabledrl_cli.integrations._verl_facts import VERL_SEQ_LOG_RATIO_MAX, verl_gspo_config
from stabledrl_cli.policies import resolve_spec

if TYPE_CHECKING:
    from rich.console import Console

REASONS_SHOWN = 3
"""Reasons named in a message about skipped steps."""


def shown_reasons(reasons: Sequence[str]) -> str:
    """The first `REASONS_SHOWN` reasons, joined by "; " (and "; ..." when there are more)."""
    more = "; ..." if len(reasons) > REASONS_SHOWN else ""
    return "; ".join(reasons[:REASONS_SHOWN]) + more


def own_spec(run: Run) -> str | None:
    """The canonical spec of the run's own policy (its manifest's), or None when the manifest
    names none or a policy the catalogue does not hold (a custom one)."""
    return _own_policy(run).spec


def own_policy_note(run: Run) -> str | None:
    """A note on the run's own policy, None when there is nothing to say: why the policy its
    manifest names is none the catalogue replays (a custom one, a parameter out of range), or
    that a verl gspo recording lacks verl's cap and is replayed with it."""
    own = _own_policy(run)
    if own.problem is not None:
        return (
            f"note: the run's own policy {quoted_spec(run.policy_spec or '')} is none the "
            f"catalogue replays ({own.problem}); no policy is marked as the run's own"
        )
    if own.recorded_spec == own.spec:
        return None
    version = (run.manifest.get("meta") or {}).get("verl_version")
    return (
        f"note: the run's own policy is '{own.spec}', the loss verl {version} computed: its "
        f"manifest's '{own.recorded_spec}' lacks verl's cap of GSPO's sequence log ratio at "
        f"{VERL_SEQ_LOG_RATIO_MAX:g} (recorded before stabledrl wrote it)"
    )


def print_own_policy_note(run: Run, console: Console) -> None:
    """Prints `own_policy_note`, if any, on `console` (a command's stderr), as every command
    that replays the run's own policy does (replay, check, tune, watch): one line, as every
    note on stderr is, never wrapped at the terminal's width."""
    note = own_policy_note(run)
    if note is not None:
        console.print(note, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class _OwnPolicy:
    spec: str | None = None
    """The canonical spec of the run's own policy as replayed, None when there is none."""
    recorded_spec: str | None = None
    """The canonical spec the manifest names (`spec` but for a verl gspo without the cap)."""
    problem: UsageError | None = None
    """Why the catalogue cannot resolve the manifest's spec, or replay it on the run's units."""


def _own_policy(run: Run) -> _OwnPolicy:
    """The run's own policy: the manifest's, with verl's cap for a verl gspo recording made
    before the integration wrote it (`verl_gspo_config`)."""
    spec = run.policy_spec
    if not spec:
        return _OwnPolicy()
    try:
        entry, config = resolve_spec(spec)
        config.required_fields(run.unit)  # level=token on a run of sequence units
    except UsageError as exc:
        return _OwnPolicy(problem=exc)
    verl = verl_gspo_config(run.manifest.get("meta"), config)
    recorded = entry.spec_of(config)
    return _OwnPolicy(recorded if verl is None else entry.spec_of(verl), recorded)


def skipped_reasons(run: Run) -> list[str]:
    """One reason per step the reader skips: the first of the run's integrity findings of the
    kinds `SKIPPED_KINDS` that name it (two ranks' damaged files of one step, two damaged
    datasets of one archived step are one step skipped), and each one of no step (those it
    skips at its header check never reach a replay's warnings).
    A reader that does not verify data checksums (`open_run(..., verify=False)`) reads a step
    whose data fails its checksum, and skips only what its header checks find
    (`Run.header_findings`): those alone are counted, and no file is read for them."""
    return [f.message for f in _skipped_findings(run)]


def run_gaps(run: Run) -> list[Gap]:
    """The runs of steps missing between the ones the run lists, against its stride (its
    `gap` findings): steps a recording never wrote or lost. A step the reader skips at its
    header check (a torn file; in an archive, a step left out when it was packed) is there,
    named as skipped, not missing."""
    named = {f.step for f in run.header_findings() if f.step is not None and f.kind != "gap"}
    return gaps(sorted(set(run.listed_step_numbers) | named))


def _skipped_findings(run: Run) -> list[Finding]:
    """The findings behind `skipped_reasons`."""
    findings = run.integrity.findings if run.verify else run.header_findings()
    skipped, steps = [], in_flight_steps(run)
    for finding in findings:
        if finding.kind in SKIPPED_KINDS and finding.step not in steps:
            skipped.append(finding)
            if finding.step is not None:
                steps.add(finding.step)
    return skipped


def in_flight_steps(run: Run) -> set[int]:
    """The steps of the run's listing some rank has not written yet that are in flight
    (`in_flight`: every rank lacking one is a live Recorder's, `Run.recorder_states`, with no
    stop noted after its last step, and has not gone past it), or that every rank has
    finished since the listing: not skipped. The rest are lost, as `watch` judges them."""
    partial = run.listed_partial_steps
    states = run.recorder_states() if partial else None
    if states is None:
        return set()
    lasts = run.listed_last_steps
    live = {rank for rank, state in states.items() if state == "held"}
    writing = live - stopped_ranks(run.listed_recording_stops, lasts)
    flying = in_flight(partial, run_ranks(run), lasts, writing)
    if len(flying) < len(partial):
        flying |= whole_now(run).intersection(partial)  # finished since the listing
    return flying


def refuse_recorded_again(run: Run, command: str) -> None:
    """InputError when the run was recorded again while the `command` read it
    (`Run.recorded_again`): the steps read would be of two recordings."""
    if run.recorded_again():
        raise InputError(
            f"{run.location}: the run was recorded again while the {command} read it (resumed "
            f"from a step it held, or recorded over: a new run_id); {command} it again"
        )


def _whole_run(findings: list[Finding]) -> list[Finding]:
    """The findings that skip every step, naming no step file (an archive index that failed
    its checksum)."""
    return [f for f in findings if f.step is None and f.kind in SKIPPED_KINDS]


def no_steps_message(run: Run, skipped: list[str]) -> str:
    """Why a run yielded no readable step: a finding of the whole run that skips every step
    (an archive index that failed its checksum: it names no step file), how many steps were
    skipped and the first reasons (else any other integrity finding, e.g. only temporary
    files)."""
    whole = [f.message for f in _whole_run(_skipped_findings(run))]
    stepped = [reason for reason in skipped if reason not in whole]
    if whole:
        also = f"; {steps_skipped(stepped)}" if stepped else ""
        return f"{run.location}: no step could be read ({shown_reasons(whole)}{also})"
    reasons = skipped or [f.message for f in run.integrity.findings]
    if not reasons:
        return f"{run.location}: the run has no steps"
    if not skipped:
        return f"{run.location}: the run has no readable step ({shown_reasons(reasons)})"
    return f"{run.location}: no step could be read ({steps_skipped(skipped)})"


def run_ranks(run: Run) -> int:
    """The ranks the run was recorded on (the reader has validated the manifest's
    world_size)."""
    return int(run.manifest.get("world_size", 1))


def replayed_loss_norm(run: Run) -> str:
    """What a replay of the run's steps normalises over: its `loss_norm`, or "global" for a
    run of one rank, whose one part is the whole step (either replays alike)."""
    return run.loss_norm if run_ranks(run) > 1 else "global"


def scalar_steps(run: Run) -> int:
    """The run's readable steps when none holds a policy batch (a scalar run), else 0 (a
    step holds one, or none can be read); found from their headers, without torch."""
    steps = 0
    for header in run.step_headers():
        if not header.is_scalar:
            return 0
        steps += 1
    return steps


def is_scalar_run(run: Run) -> bool:
    """Whether the run has readable steps and none holds a policy batch."""
    return scalar_steps(run) > 0


def whole_run_refusal(run: Run) -> str | None:
    """`no_steps_message` for a run that a finding of the whole run leaves with no readable
    step (an archive index that failed its checksum skips every step), whatever else is
    asked of it; None without such a finding. Found from the header checks (no step file is
    read for it)."""
    if _whole_run(run.header_findings()):
        return no_steps_message(run, skipped_reasons(run))
    return None


def steps_skipped(skipped: Sequence[str]) -> str:
    """How many steps were skipped ("2 steps were skipped: "), with the first reasons
    (`shown_reasons`)."""
    steps = counted(len(skipped), "step was", "steps were")
    return f"{steps} skipped: {shown_reasons(skipped)}"


class NothingToReplay(InputError):
    """A run whose readable steps hold no policy batch (a scalar run): exit 3."""


def nothing_to_replay(run: Run, steps: int, skipped: Sequence[str] = ()) -> NothingToReplay:
    """The one-line refusal for a run whose `steps` readable steps are all scalar steps;
    `skipped`: why the reader skipped each other step file (a rank behind, a damaged file),
    named since such a file may have held a policy batch."""
    scalars = f"{counted(steps, 'step')} of per-step scalars"
    what = (
        f"no readable step holds a policy batch ({scalars}; {steps_skipped(skipped)})"
        if skipped
        else f"a scalar run ({scalars}, no policy batch)"
    )
    return NothingToReplay(
        f"{run.location}: nothing to replay: {what}; `stabledrl inspect` shows it and "
        "`stabledrl check` gates its recorded series"
    )


def scalar_run_refusal(run: Run) -> NothingToReplay | None:
    """`nothing_to_replay` for a run whose readable steps are all scalar steps
    (`scalar_steps`); None when one holds a policy batch or none can be read."""
    steps = scalar_steps(run)
    return nothing_to_replay(run, steps, skipped_reasons(run)) if steps else None
