"""What `stabledrl watch` shows: the view of a run's state (a few lines and a table of its
last steps, fitted to the terminal) and the lines it prints on stderr as the run is read
(alerts, policy changes, steps skipped, recordings stopped)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.table import Table

from stabledrl_cli.cli._inspect_run_table import stopped_text
from stabledrl_cli.cli._inspect_tables import LIST_LIMIT
from stabledrl_cli.cli._output import plain_text
from stabledrl_cli.dump._integrity import DAMAGED_KINDS
from stabledrl_cli.errors import counted
from stabledrl_cli.replay._format import format_cell, format_steps
from stabledrl_cli.replay.inspection import group_findings
from stabledrl_cli.replay.run_facts import shown_reasons
from stabledrl_cli.spec import wrap_spec
from stabledrl_cli.tables import narrowest_width, stack_headers

if TYPE_CHECKING:
    from stabledrl_cli.replay.watch.alerts import Alert
    from stabledrl_cli.replay.watch.follow import PolicyChange, RunWatcher
    from stabledrl_cli.replay.watch.rank_files import RankProgress
    from stabledrl_cli.replay.watch.state import WatchState

STEPS_LISTED = 8
"""Steps named per list in the view (JSON has them all)."""


def alert_line(alert: Alert) -> str:
    return f"alert: step {alert.step}: {alert.kind}: {alert.message}"


def policy_change_line(run: str, change: PolicyChange) -> str:
    """The line saying the run's manifest changed the policy it is replayed by."""
    judged = "every step is replayed under it" if change.replayed else "no step is replayed"
    return (
        f"{run}: the run's policy is now {change.now or 'none'} (was {change.was or 'none'}, "
        f"through step {change.after_step}): {judged}"
    )


def damaged_line(watcher: RunWatcher) -> str | None:
    """The warning naming the step files the reader skipped that the run lacks
    (`RunWatcher.lacking`), as `check` names them, consecutive steps alike as one
    (`group_findings`, as inspect's rows); None without one.
    From the headers the watch read: no file is read again for it."""
    replay = watcher.replay
    damaged = watcher.lacking()
    if replay is None or not damaged:
        return None
    reasons = [row.message for row in group_findings(damaged, replay.seen)]
    incomplete = any(f.kind not in DAMAGED_KINDS for f in damaged)
    what = "unreadable or incomplete step" if incomplete else "unreadable step"
    return (
        f"warning: skipped {counted(len(damaged), what)} of {watcher.path} "
        f"({shown_reasons(reasons)}); "
        "`stabledrl inspect` lists every finding"
    )


def rejected_line(run: str, rejected: list[tuple[int, str]]) -> str:
    """The warning for steps the own policy could not be replayed on (skipped)."""
    shown = shown_reasons([reason for _, reason in rejected])
    skipped = counted(len(rejected), "step")
    return f"warning: skipped {skipped} of {run} whose data cannot be replayed ({shown})"


def stopped_lines(watcher: RunWatcher, shown: set[str]) -> list[str]:
    """The warnings that the run's recording stopped not in `shown` (added to it): one a rank
    that stopped (its note), at most LIST_LIMIT over the watch, then one line that more ranks
    stopped."""
    lines = []
    for note in watcher.recording_stops:
        line = f"warning: {watcher.path}: recording {stopped_text(note)}"
        if line in shown:
            continue
        if len(shown) >= LIST_LIMIT:
            line = f"warning: {watcher.path}: recording stopped on more ranks: inspect has them all"
            if line not in shown:
                shown.add(line)
                lines.append(line)
            break
        shown.add(line)
        lines.append(line)
    return lines


def _steps(steps: list[int], *, named: bool = False) -> str:
    return format_steps(
        steps, STEPS_LISTED, empty="none", separator=", ", more=" more", named=named
    )


def _policy(state: WatchState) -> str:
    if state.own_policy is not None:
        return state.own_policy
    if state.recorded_policy is None:
        return "none recorded: no replay"
    return f"{state.recorded_policy} (not in the catalogue: no replay)"


RANKS_NAMED = 5
"""Runs of ranks behind (ranks in a row at one step) named in the view's line (JSON has them
all)."""


def ranks_text(state: WatchState) -> str | None:
    """How far the ranks of a multi-rank run got, naming those behind the furthest (a rank
    that died or stopped writing holds every later step back), or that a packed archive
    joined them; None for one rank."""
    if state.packed_ranks is not None:
        return f"ranks: {state.packed_ranks}, joined in the packed archive (each step whole)"
    if not state.ranks:
        return None
    behind = set(state.ranks_behind)
    late = [r for r in state.ranks if r.rank in behind]
    furthest = next((r for r in state.ranks if r.rank not in behind), None)
    if furthest is None:
        return f"ranks: {len(state.ranks)}, none wrote a step file"
    if not late:
        return f"ranks: {len(state.ranks)}, each at step {furthest.last_step}"
    ahead = len(state.ranks) - len(late)
    at = f"rank {furthest.rank}" if ahead == 1 else f"{ahead} ranks"
    runs: list[list[RankProgress]] = []  # ranks in a row at the same step
    for r in late:
        if runs and runs[-1][-1].rank == r.rank - 1 and runs[-1][-1].last_step == r.last_step:
            runs[-1].append(r)
        else:
            runs.append([r])
    named = ", ".join(_ranks_at(run) for run in runs[:RANKS_NAMED])
    rest = sum(len(run) for run in runs[RANKS_NAMED:])
    more = f" (+{counted(rest, 'more rank')})" if rest else ""
    return f"ranks: {len(state.ranks)}, {at} at step {furthest.last_step}; behind: {named}{more}"


def _ranks_at(ranks: list[RankProgress]) -> str:
    """`rank 1 at step 2`, `ranks 1..7 wrote no step file`: ranks in a row at one step."""
    who = f"rank {ranks[0].rank}" if len(ranks) == 1 else f"ranks {ranks[0].rank}..{ranks[-1].rank}"
    step = ranks[0].last_step
    return f"{who} " + ("wrote no step file" if step is None else f"at step {step}")


def with_ranks(message: str, state: WatchState) -> str:
    """`message`, then how far the ranks got (`ranks_text`) of a multi-rank run."""
    ranks = ranks_text(state)
    return message if ranks is None else f"{message} ({ranks})"


def state_view(state: WatchState, width: int, *, whole: bool = False) -> Group:
    """The state as a few lines and a table of the last steps; an own policy too long for the
    `width` beside its step count is on the lines below it, broken at its commas. `whole`
    (--once): a table too wide for `width` even with its headers stacked keeps its natural
    width, overflowing the terminal rather than cut a figure (printed uncropped); a live view
    wider than the terminal would be cropped at its edge instead."""
    ranks = ranks_text(state)
    if state.waiting is not None:
        waiting = [state.waiting] if ranks is None else [state.waiting, ranks]
        lines = [f"stabledrl watch {state.run}", *waiting]
        return Group(*(plain_text(line, wrapped=True) for line in lines))

    def at(step: int | None) -> str:
        return "none" if step is None else f"step {step}"

    def listed(steps: list[int], rule: str, judged: str = "not judged", named: bool = True) -> str:
        why = state.unjudged.get(rule)
        return _steps(steps, named=named) + ("" if why is None else f" ({judged}: {why})")

    def nonfinite() -> str:
        """The recorded non-finite steps, and a verl recording's training steps that hold
        them, as verl's log numbers them: `step 8 (training step 3)`."""
        training = state.nonfinite_training_steps
        if not (training and state.nonfinite_steps):
            return listed(state.nonfinite_steps, "nonfinite_steps")
        return (
            f"{_steps(state.nonfinite_steps, named=True)} (training {_steps(training, named=True)})"
        )

    def replayed(steps: list[int], rule: str, judged: str) -> str:
        if not state.replayed_steps:
            return "- (nothing replayed)"
        return listed(steps, rule, judged, named=False)

    def first(step: int | None, rule: str) -> str:
        return "not judged" if rule in state.unjudged else at(step)

    warning = first(state.collapse_warning, "collapse_warning")
    reward_collapse = first(state.first_reward_collapse, "first_reward_collapse")

    steps, policy = f"steps: {state.steps} (last {state.last_step}); own policy:", _policy(state)
    lines = [
        f"stabledrl watch {state.run}",
        *(
            [f"{steps} {policy}"]
            if len(steps) + 1 + len(policy) <= width
            else [steps, *wrap_spec(policy, width, whole=True)]
        ),
        *([ranks] if ranks is not None else []),
    ]
    if state.scalar_steps:
        lines.append(
            f"scalar steps: {state.scalar_steps} of {state.steps} (recorded scalars only, "
            "no policy batch to replay)"
        )
    lines += [
        f"risk steps: {replayed(state.risk_steps, 'spike', 'spikes not judged')}",
        f"drift steps: {replayed(state.drift_steps, 'drift', 'not judged')}",
        f"recorded grad-norm spikes: {listed(state.spike_steps, 'spike_steps')}",
        f"recorded non-finite: {nonfinite()}",
        f"collapse warning: {warning}; reward collapse: {reward_collapse}",
    ]
    # a verl recording's reward is its training step's, as verl logs it: labelled so
    verl = any(row.training_step is not None for row in state.recent)
    table = Table(show_edge=False)
    headers = ("step", *(["training step"] if verl else []), "reward", "grad norm", "discard")
    for header in (*headers, "risk", "drift"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in state.recent:
        table.add_row(
            str(row.step),
            *([str(row.training_step or "-")] if verl else []),
            format_cell(row.reward_mean),
            format_cell(row.grad_norm),
            format_cell(row.discard_frac, percent=True),
            format_cell(row.risk),
            format_cell(row.drift),
        )
    console = Console(width=width)
    stack_headers(table, console)  # a verl recording's 7 columns in 60
    if whole and (natural := narrowest_width(table, console)) > width:
        table.width = natural
    shown = [table] if state.recent else []  # --recent 0: no table, not a header alone
    return Group(*(plain_text(line, wrapped=True) for line in lines), *shown)


def fitted_view(state: WatchState, console: Console) -> Group:
    """`state_view`, its table holding only the last steps that fit the terminal's height: rich
    crops a live view taller than the terminal at its bottom, where the newest steps are.
    Off a terminal (nothing is cropped), the whole view."""
    view = state_view(state, console.width)
    if not console.is_terminal:
        return view
    over = len(console.render_lines(view, console.options, pad=False)) - console.size.height
    if over <= 0 or not state.recent:
        return view
    kept = len(state.recent) - over
    return state_view(
        replace(state, recent=state.recent[-kept:] if kept > 0 else []), console.width
    )
