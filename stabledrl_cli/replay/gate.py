"""CI gates on a replay: one gate's result (`GateResult`), and the absolute limits of a
check (`Gates`), per policy and on the recorded run; `evaluation.py` evaluates them beside
the baseline's regressions. A gate whose own rule judged nothing trips, saying why
(`max_collapsed`, "not judged", for a policy whose updates the spike rule judged none of).

Run-level gates read the recorded run (`recorded.RecordedRun`), so a run without a policy batch
(an imported log, an optimizer-hook recording) is gated too: --fail-on-collapse (the observed
reward collapse), --max-spikes (recorded grad-norm spikes), --max-nonfinite (non-finite
recorded steps; per policy, steps with a non-finite replayed update) and --max-lost-steps
(steps the run lacks: skipped as unreadable or unusable, or missing between its recorded ones).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from stabledrl_cli.errors import ConfigError, counted
from stabledrl_cli.replay._format import format_figure, format_figures
from stabledrl_cli.replay.baseline import no_finite_update
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.result import PolicyResult

STEP_LIST_LIMIT = 10
"""Collapsed steps named in a max_collapsed message."""


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """One gate of one policy (policy None: a run-level gate)."""

    policy: str | None
    gate: str
    ok: bool
    figure: float | None
    """Today's figure (inf: infinity, a step that never came for a `count`; None: none, for
    `baseline.present` and a run-level gate whose rule had nothing to judge)."""
    limit: float | None
    """The worst figure that passes."""
    message: str
    subject: str | None = None
    """What a gate that may appear more than once per policy judges (`baseline.present`: the
    figure the check has none of), for the JUnit testcase name; not in the check JSON."""
    count: bool = False
    """The figure counts steps (or is a step): shown whole; not in the check JSON."""
    shown_gate: str | None = None
    """The gate as the table, stderr and JUnit name it where `gate` holds a recorded series'
    name that is long or not printable (`errors.key_shown`: cut, its length said); None:
    `gate`. Not in the check JSON, which has `gate` whole."""

    @property
    def label(self) -> str:
        """The gate's name for a reader: `shown_gate`, else `gate`."""
        return self.shown_gate or self.gate

    def shown(self) -> tuple[str, str]:
        """The figure and the limit as the table and the JUnit report show them ("n/a": no
        figure, for `baseline.present`; "none": a step that never came)."""
        figure, limit = format_figures(self.figure, self.limit, count=self.count)
        return figure, limit

    def to_dict(self) -> dict[str, object]:
        """The check JSON's entry: infinite figures and limits as null."""
        data: dict[str, object] = asdict(self)
        del data["subject"], data["count"], data["shown_gate"]
        for key, value in (("figure", self.figure), ("limit", self.limit)):
            data[key] = value if value is None or math.isfinite(value) else None
        return data


@dataclass(frozen=True, kw_only=True)
class Gates:
    """The absolute gates; None: not checked."""

    max_collapsed: int | None = None
    """Collapsed steps (non-finite or spike) allowed per policy."""
    max_discard_frac: float | None = None
    """Largest discard fraction allowed per policy."""
    max_nonfinite: int | None = None
    """Steps with a non-finite replayed update allowed per policy, and non-finite recorded
    steps allowed in the run."""
    max_spikes: int | None = None
    """Steps whose recorded grad_norm is a spike allowed in the run."""
    fail_on_collapse: bool = False
    """Trip when the recorded reward collapsed (the observed-collapse rule)."""
    max_lost_steps: int | None = None
    """Steps the run may lack: skipped (unreadable, incomplete, or whose data cannot be
    replayed) plus missing between its recorded ones (`dump._integrity.gaps`)."""

    def __post_init__(self) -> None:
        for name, value in (
            ("max_collapsed", self.max_collapsed),
            ("max_nonfinite", self.max_nonfinite),
            ("max_spikes", self.max_spikes),
            ("max_lost_steps", self.max_lost_steps),
        ):
            if value is not None and value < 0:
                raise ConfigError(name, f"must be >= 0, got {value}")
        frac = self.max_discard_frac
        if frac is not None and not (0.0 <= frac <= 1.0):
            raise ConfigError("max_discard_frac", f"must be in [0, 1], got {frac}")

    @property
    def any(self) -> bool:
        """Some gate is set."""
        return self.fail_on_collapse or any(
            v is not None
            for v in (
                self.max_collapsed,
                self.max_discard_frac,
                self.max_nonfinite,
                self.max_spikes,
                self.max_lost_steps,
            )
        )

    @property
    def policy_gates(self) -> list[str]:
        """The set gates that need replayed policies (their option names)."""
        return [
            f"--{name.replace('_', '-')}"
            for name, value in (
                ("max_collapsed", self.max_collapsed),
                ("max_discard_frac", self.max_discard_frac),
            )
            if value is not None
        ]


def steps_shown(steps: list[int], unit: str = "step") -> str:
    """The first `STEP_LIST_LIMIT` of `steps` after their `unit`, singular for one step:
    'step 5', 'steps 29, 30, ...'."""
    shown = ", ".join(str(s) for s in steps[:STEP_LIST_LIMIT])
    more = ", ..." if len(steps) > STEP_LIST_LIMIT else ""
    return f"{unit}{'' if len(steps) == 1 else 's'} {shown}{more}"


def _count_gate(gate: str, steps: list[int], limit: int, what: str) -> GateResult:
    """A run-level gate on how many steps are flagged; `what` qualifies "step(s)"."""
    return GateResult(
        policy=None,
        gate=gate,
        ok=len(steps) <= limit,
        figure=float(len(steps)),
        limit=float(limit),
        count=True,
        message=f"{counted(len(steps), f'{what} step')}, limit {limit}"
        + (f" ({steps_shown(steps)})" if steps else ""),
    )


def _unjudged_gate(
    gate: str, limit: float, why: str, policy: str | None = None, *, count: bool = True
) -> GateResult:
    """A gate whose rule judged no step of the run (`Observed.unjudged`, or a policy with no
    finite update): tripped, saying why, as a baseline's series that the run did not record
    trips `baseline.present`; a gate that could never trip would pass any run. count: its
    limit counts steps (or is a step)."""
    return GateResult(
        policy=policy, gate=gate, ok=False, figure=None, limit=limit, message=why, count=count
    )


def _collapse_gate(observed: Observed) -> GateResult:
    """--fail-on-collapse on a run whose reward the collapse rule judged: trips when the
    recorded reward collapsed."""
    collapse = observed.first_reward_collapse
    if collapse is None:
        message = "the recorded reward did not collapse"
    else:
        message = (
            f"the recorded reward collapsed at step {collapse} (window {observed.collapse_window})"
        )
    return GateResult(
        policy=None,
        gate="reward_collapse",
        ok=collapse is None,
        figure=math.inf if collapse is None else float(collapse),
        limit=math.inf,
        count=True,
        message=message,
    )


def _unjudged_run_gate(
    observed: Observed, gate: str, figure: str, limit: float, nothing: str
) -> GateResult | None:
    """The run-level `gate`, tripped, when the rule of its run figure judged no step of the run
    (`nothing`: what the run then has none of); None when it judged some."""
    why = observed.unjudged(figure)
    return (
        None
        if why is None
        else _unjudged_gate(gate, float(limit), f"{why}: there {nothing} to gate")
    )


@dataclass(frozen=True)
class LostSteps:
    """The steps a run lacks, as its replay or read counted them."""

    skipped: int = 0
    """Steps skipped: unreadable, incomplete, or whose data cannot be replayed."""
    missing: int = 0
    """Steps missing between the recorded ones, against the run's stride."""


def _lost_gate(lost: LostSteps, limit: int) -> GateResult:
    """--max-lost-steps: trips when the run lacks more steps than `limit`."""
    total = lost.skipped + lost.missing
    parts = [f"{lost.skipped} skipped", f"{lost.missing} missing between recorded ones"]
    return GateResult(
        policy=None,
        gate="max_lost_steps",
        ok=total <= limit,
        figure=float(total),
        limit=float(limit),
        count=True,
        message=f"{counted(total, 'step')} lost ({', '.join(parts)}), limit {limit}",
    )


def run_absolute(observed: Observed, gates: Gates, lost: LostSteps) -> list[GateResult]:
    """The set run-level absolute gates, in a stable order."""
    found = []
    if gates.fail_on_collapse:
        found.append(
            _unjudged_run_gate(
                observed,
                "reward_collapse",
                "first_reward_collapse",
                math.inf,
                "is no reward window",
            )
            or _collapse_gate(observed)
        )
    counts = (  # (gate, its run figure, limit, what the run may have none of, steps, their kind)
        ("max_spikes", "spike_steps", gates.max_spikes, "is no judged grad-norm step",
         observed.recorded_spike_steps, "grad-norm spike"),
        ("max_nonfinite", "nonfinite_steps", gates.max_nonfinite, "is no non-finite count",
         observed.nonfinite_steps, "non-finite recorded"),
    )  # fmt: skip
    for gate, figure, limit, nothing, steps, what in counts:
        if limit is not None:
            found.append(
                _unjudged_run_gate(observed, gate, figure, limit, nothing)
                or _count_gate(gate, steps, limit, what)
            )
    if gates.max_lost_steps is not None:
        found.append(_lost_gate(lost, gates.max_lost_steps))
    return found


def _discard_gate(p: PolicyResult, limit: float) -> GateResult:
    """--max-discard-frac. A step whose replayed update is non-finite discards nothing (a NaN
    ratio is never clipped), so its tokens count as discarded: the figure is then the most
    the policy can have discarded, and a pass holds whatever those steps would have done.
    A policy with no finite update trips, unjudged."""
    unjudged = no_finite_update(p)
    if unjudged is not None:
        why = f"{unjudged}: there is no discard fraction to gate"
        return _unjudged_gate("max_discard_frac", limit, why, policy=p.spec, count=False)
    frac, bound, note = p.summary.discard_frac, "", ""
    nonfinite = np.asarray(p.series["nonfinite"], dtype=bool)
    if nonfinite.any():
        tokens = np.asarray(p.series["tokens"], dtype=np.int64)
        discarded = np.asarray(p.series["discarded"], dtype=np.int64)
        unknown, total = int(tokens[nonfinite].sum()), int(tokens.sum())
        frac = (int(discarded[~nonfinite].sum()) + unknown) / total if total else 0.0
        bound = "at most "
        note = (
            f", counting the {counted(unknown, 'token')} of "
            f"{counted(int(nonfinite.sum()), 'step')} with a non-finite update as discarded "
            f"({format_figure(p.summary.discard_frac)} without them)"
        )
    shown, shown_limit = format_figures(frac, limit)
    return GateResult(
        policy=p.spec,
        gate="max_discard_frac",
        ok=frac <= limit,
        figure=frac,
        limit=limit,
        message=f"discard_frac {bound}{shown}{note}, limit {shown_limit}",
    )


def _collapsed_gate(p: PolicyResult, limit: int) -> GateResult:
    """--max-collapsed. Where the spike rule judged no step of the policy, its count holds the
    non-finite updates alone: over the limit it trips as judged (spikes could only add to
    it); within it the gate trips "not judged", as a pass would claim no spike."""
    steps = p.summary.collapsed_steps
    unjudged = p.summary.unjudged.get("spike")
    if unjudged is not None and len(steps) <= limit:
        counts = counted(len(steps), "collapsed step") if steps else "no collapsed step"
        why = f"not judged: {unjudged}: {counts} counted (non-finite updates only), limit {limit}"
        return _unjudged_gate("max_collapsed", limit, why, policy=p.spec)
    return GateResult(
        policy=p.spec,
        gate="max_collapsed",
        ok=len(steps) <= limit,
        figure=float(len(steps)),
        limit=float(limit),
        count=True,
        message=f"{counted(len(steps), 'collapsed step')}, limit {limit}"
        + (f" ({steps_shown(steps)})" if steps else ""),
    )


def absolute(p: PolicyResult, gates: Gates) -> list[GateResult]:
    """The set absolute gates of one policy, in a stable order."""
    found = []
    if gates.max_collapsed is not None:
        found.append(_collapsed_gate(p, gates.max_collapsed))
    if gates.max_discard_frac is not None:
        found.append(_discard_gate(p, gates.max_discard_frac))
    if gates.max_nonfinite is not None:
        count = int(np.count_nonzero(np.asarray(p.series["nonfinite"], dtype=bool)))
        found.append(
            GateResult(
                policy=p.spec,
                gate="max_nonfinite",
                ok=count <= gates.max_nonfinite,
                figure=float(count),
                limit=float(gates.max_nonfinite),
                count=True,
                message=f"{counted(count, 'step')} with a non-finite update, "
                f"limit {gates.max_nonfinite}",
            )
        )
    return found
