"""The lines under replay's summary table on the recorded run itself: its observed collapse,
recorded grad-norm spikes and noise floor, its collapse warning, a streak of steps without a
policy-gradient update, and what each adaptive guard would have done to its recorded grad
norms."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console

from stabledrl_cli.errors import counted
from stabledrl_cli.replay._format import LIST_LIMIT, format_number, format_steps
from stabledrl_cli.replay.guard_rules import GuardAction, too_few_norms
from stabledrl_cli.replay.guards import GuardReport
from stabledrl_cli.replay.observed import CollapseWarning, Observed
from stabledrl_cli.replay.result import ReplayResult


def warning_text(warning: CollapseWarning, observed: Observed) -> str:
    """The collapse warning in one line, beside the observed collapse (no lead is claimed for
    a policy's one-step risk flags)."""
    head = _judged(
        observed,
        "collapse_warning_first_step",
        "none"
        if warning.first_step is None
        else f"first at step {warning.first_step} ({warning.rule_text})",
    )
    collapse = observed.first_reward_collapse
    seen = "none" if collapse is None else f"at {collapse}"
    if observed.unjudged("first_reward_collapse") is not None:  # why: on the line above
        seen = "not judged"
    return f"collapse warning: {head}; observed collapse {seen}"


def _judged(observed: Observed, figure: str, text: str) -> str:
    """`text`, or "not judged (why)" where the rule of `figure` judged no step of the run
    ("none" would read as a run judged and found clean)."""
    unjudged = observed.unjudged(figure)
    return text if unjudged is None else f"not judged ({unjudged})"


def print_observed(result: ReplayResult, console: Console) -> None:
    """The recorded run's collapse, spikes and noise floor, and the run's collapse warning."""
    obs = result.observed
    collapse = obs.first_reward_collapse
    reward = "none" if collapse is None else f"at step {collapse}"
    spikes = format_steps(obs.recorded_spike_steps, LIST_LIMIT, empty="none", named=True)
    console.print(
        f"observed (recorded run): first reward collapse "
        f"{_judged(obs, 'first_reward_collapse', reward)}; recorded grad-norm spikes: "
        f"{_judged(obs, 'spike_steps', spikes)}; noise floor std log r: "
        f"{format_number(obs.noise_floor_logratio_std)}",
        highlight=False,
        soft_wrap=False,
    )
    console.print(warning_text(obs.collapse_warning, obs), highlight=False, soft_wrap=False)
    if obs.unscored_streak is not None:
        console.print(obs.unscored_streak.text, highlight=False, soft_wrap=False)
    if obs.guards:
        console.print(guards_text(obs.guards), highlight=False, soft_wrap=False)


def guards_text(reports: Sequence[GuardReport]) -> str:
    """One line: which recorded steps each adaptive guard would have clipped or skipped, the
    run's own guard's rule marked so, and where the decisions its guard recorded disagree."""
    verbs: tuple[tuple[GuardAction, str], ...] = (
        ("clip", "clip"),
        ("skip", "skip"),
        ("nonfinite", "drop"),
    )
    parts = []
    for report in reports:
        name = report.spec + (" (the run's own guard)" if report.own else "")
        acted = [
            verb
            + " "
            + format_steps([s.step for s in report.acted if s.action == action], LIST_LIMIT)
            for action, verb in verbs
            if report.count(action)
        ]
        if report.judged:
            parts.append(f"{name} would " + (", ".join(acted) if acted else "act on none"))
            continue
        why = (
            too_few_norms(report.collected, report.collects, report.steps_seen, "recorded")
            if report.steps_seen
            else "the run recorded no grad norm"
        )
        parts.append(f"{name} judged no step ({why})" + "".join(f", would {a}" for a in acted))
    return (
        "guards on the recorded grad norms: "
        + "; ".join(parts)
        + "".join(_disagreement(r) for r in reports)
    )


def _disagreement(report: GuardReport) -> str:
    """'; the run's own guard recorded other decisions than its rule replayed on 2 of 10
    steps: 2,6 (...)', what it says where the guard recorded none of its decisions, or ""
    where they agree (or the report is not the run's own rule's)."""
    agreement = report.agreement
    if agreement is not None and report.steps_seen and not agreement.compared:
        return (
            "; the run's own guard recorded no guard_action to compare with its rule "
            "(log guard.scalars(decision) with each step)"
        )
    if agreement is None or not agreement.disagree:
        return ""
    return (
        "; the run's own guard recorded other decisions than its rule replayed on "
        f"{agreement.disagree} of {counted(agreement.compared, 'step')}: "
        + ",".join(map(str, agreement.steps[:LIST_LIMIT]))
        + (",..." if agreement.disagree > LIST_LIMIT else "")
        + " (it saw other numbers: a resume without the saved guard, or, in a run recorded"
        " before guard_rule_action, its batch rule or a loss)"
    )
