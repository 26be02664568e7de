"""`stabledrl watch RUN`: follow a run while it is written (docs/watch.md).

Live: a rich view on stderr, refreshed as steps land (polled every --interval seconds), and one
stderr line per new alert. `--once`: the current state on stdout (table or --format json) and
the exit code of the gates (`check`'s absolute gates: on the run's own policy, and on the
recorded run, --max-lost-steps on the steps it lacks so far). A scalar run (per-step scalars
only: an optimizer-hook recording, a Recorder given scalars alone) is followed as `check`
treats it: its recorded scalars shown, alerted on and gated, nothing replayed.

A run whose manifest is marked `recording_closed` (its Recorder closed) ends the watch once
its steps are read, as --until-idle does; so does a run whose Recorders all ended without
marking it (killed, or the ranks of a run of several), as their lock files show on this
machine (`RunWatcher.writers_ended`).

Exit codes: 0 every gate holds (or none is given); 1 a gate tripped (--once, or when
--until-idle, the closed recording or its killed Recorder ends the watch); 2 usage error (a
URL among them: watch follows a local path; a policy gate on a run the own policy did not
replay); 3 a missing or corrupt run (--once), or a run whose steps cannot be replayed (a step
lacks a field the own policy needs, or every step's data is refused); 130 stopped with Ctrl-C;
143 stopped with SIGTERM. A step whose data the own policy cannot be replayed with (a seq_id
out of range, mismatched array lengths) is skipped with one stderr line naming it and why, and
never read again.
"""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli.cli._local import local_run
from stabledrl_cli.cli._options import (
    DeviceOpt,
    FailOnCollapseOpt,
    FormatOpt,
    MaxCollapsedOpt,
    MaxDiscardFracOpt,
    MaxLostStepsOpt,
    MaxNonfiniteOpt,
    MaxSpikesOpt,
    RunArg,
    number_option,
    on_command_line,
)
from stabledrl_cli.cli._output import err, out, plain_text, print_json, writing_again
from stabledrl_cli.cli._signals import (
    Terminated,
    sigterm_handled,
    stopped_by_sigterm,
    terminate,
)
from stabledrl_cli.cli.inspect import LIST_LIMIT, stopped_text
from stabledrl_cli.cli.replay import missing_line, option_names
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.dump._open import run_to_come
from stabledrl_cli.errors import INTERRUPTED, InputError, UsageError, counted
from stabledrl_cli.replay._format import format_cell, format_steps
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.gate import GateResult, Gates, evaluate
from stabledrl_cli.replay.inspection import group_findings
from stabledrl_cli.replay.run_facts import (
    DAMAGED_KINDS,
    own_spec,
    print_own_policy_note,
    run_gaps,
    scalar_steps,
    shown_reasons,
    whole_run_refusal,
)
from stabledrl_cli.spec import wrap_spec
from stabledrl_cli.tables import narrowest_width, stack_headers

if TYPE_CHECKING:
    from stabledrl_cli.replay.alerts import Alert
    from stabledrl_cli.replay.follow import PolicyChange, RunWatcher
    from stabledrl_cli.replay.incremental import OwnReplay
    from stabledrl_cli.replay.rank_files import RankProgress
    from stabledrl_cli.replay.watch_state import WatchState
    from stabledrl_cli.replay.writers import WritersEnd

STEPS_LISTED = 8
"""Steps named per list in the view (JSON has them all)."""
TERMINATED = SIGNALLED + signal.SIGTERM
"""The exit code of a watch stopped with SIGTERM (143), as a shell reports a process it ended."""
MAX_INTERVAL = 86_400
"""The longest --interval, a day (time.sleep overflowed on 1e30 seconds)."""


def _alert_line(alert: Alert) -> str:
    return f"alert: step {alert.step}: {alert.kind}: {alert.message}"


def _policy_change_line(run: str, change: PolicyChange) -> str:
    """The line saying the run's manifest changed the policy it is replayed by."""
    judged = "every step is replayed under it" if change.replayed else "no step is replayed"
    return (
        f"{run}: the run's policy is now {change.now or 'none'} (was {change.was or 'none'}, "
        f"through step {change.after_step}): {judged}"
    )


def _damaged_line(watcher: RunWatcher) -> str | None:
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


def _rejected_line(run: str, rejected: list[tuple[int, str]]) -> str:
    """The warning for steps the own policy could not be replayed on (skipped)."""
    shown = shown_reasons([reason for _, reason in rejected])
    skipped = counted(len(rejected), "step")
    return f"warning: skipped {skipped} of {run} whose data cannot be replayed ({shown})"


def _stopped_lines(watcher: RunWatcher, shown: set[str]) -> list[str]:
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


def _require_replayed(watcher: RunWatcher) -> None:
    """InputError when every step with a policy batch read so far was rejected."""
    refused = None if watcher.replay is None else watcher.replay.unreplayable()
    if refused is not None:
        raise refused


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


def _with_ranks(message: str, state: WatchState) -> str:
    """`message`, then how far the ranks got (`ranks_text`) of a multi-rank run."""
    ranks = ranks_text(state)
    return message if ranks is None else f"{message} ({ranks})"


def _view(state: WatchState, width: int, *, whole: bool = False) -> Group:
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


def _fitted(state: WatchState, console: Console) -> Group:
    """`_view`, its table holding only the last steps that fit the terminal's height: rich
    crops a live view taller than the terminal at its bottom, where the newest steps are.
    Off a terminal (nothing is cropped), the whole view."""
    view = _view(state, console.width)
    if not console.is_terminal:
        return view
    over = len(console.render_lines(view, console.options, pad=False)) - console.size.height
    if over <= 0 or not state.recent:
        return view
    kept = len(state.recent) - over
    return _view(replace(state, recent=state.recent[-kept:] if kept > 0 else []), console.width)


def _refuse_policy_gates(watcher: RunWatcher, gates: Gates) -> None:
    """`_unreplayed_gates` when the own policy replayed no step (as `check` refuses a policy
    gate on a scalar run)."""
    replay = watcher.replay
    if not gates.policy_gates or replay is None or (replay.spec is not None and replay.steps):
        return
    raise _unreplayed_gates(watcher.path, gates, replay.run, own=replay.spec is not None)


def _unreplayed_gates(path: Path, gates: Gates, run: Run, *, own: bool) -> UsageError:
    """The UsageError for a policy gate on a run whose own policy replays no step: the run
    names no policy or one not in the catalogue (`own` False: no step it gains is replayed),
    or it is a scalar run so far."""
    if not own:
        why = (
            f"the run's policy {run.policy_spec!r} is none the catalogue replays (the note "
            "above says why)"
            if run.policy_spec is not None
            else "the run names no policy"
        )
    else:
        why = "it is a scalar run so far (per-step scalars only, no policy batch)"
    return UsageError(
        f"{path}: {', '.join(gates.policy_gates)} need(s) the own policy replayed, "
        f"and {why}; gate it with --max-spikes, --max-nonfinite or --fail-on-collapse"
    )


def _refuse_unreplayed_gates(run: Run, path: Path, gates: Gates) -> None:
    """`_refuse_policy_gates` of a `--once` watch before torch loads (a second), found from
    the run's headers: a policy gate on a run that names no policy the catalogue replays
    and has a readable step, or on a scalar run (`scalar_steps`), after the note on its own
    policy, as the watch prints it."""
    if not gates.policy_gates:
        return
    own = own_spec(run) is not None
    with integrity_warnings_ignored():  # the watch names the skipped step files later
        unreplayed = scalar_steps(run) > 0 if own else next(run.step_headers(), None) is not None
    if unreplayed:
        print_own_policy_note(run, err)
        raise _unreplayed_gates(path, gates, run, own=own)


def _gates(watcher: RunWatcher, gates: Gates) -> list[GateResult]:
    """`check`'s absolute gates over the steps seen so far: the run-level ones on the recorded
    run (and the steps it lacks, `RunWatcher.lost_steps`), the policy ones on the own policy
    replayed (`_refuse_policy_gates`)."""
    replay = watcher.replay
    if not gates.any or replay is None or not replay.seen:
        return []
    _require_replayed(watcher)
    _refuse_policy_gates(watcher, gates)
    result = replay.result() if replay.spec is not None and replay.steps else None
    return evaluate(result, gates, None, recorded=replay.recorded(), lost=watcher.lost_steps())


def _report_gates(results: list[GateResult]) -> int:
    tripped = [r for r in results if not r.ok]
    for r in tripped:
        err.print(f"gate tripped: {r.policy or '(run)'} {r.gate}: {r.message}", highlight=False)
    if results and not tripped:
        hold = "holds" if len(results) == 1 else "hold"
        err.print(f"gates passed: {counted(len(results), 'gate')} {hold}", highlight=False)
    return 1 if tripped else 0


def _warn_damaged(watcher: RunWatcher) -> None:
    """Prints `_damaged_line`, if any, and the warning of steps missing between the recorded
    ones, as replay does."""
    damaged = _damaged_line(watcher)
    if damaged is not None:
        err.print(damaged, highlight=False)
    missing = [] if watcher.replay is None else run_gaps(watcher.replay.run)
    if missing:
        line = (
            f"{missing_line(str(watcher.path), missing)}; `stabledrl inspect` lists every finding"
        )
        err.print(line, highlight=False)


def _no_step_read(watcher: RunWatcher, state: WatchState, message: str) -> InputError:
    """The error of a watch that read no step. A finding of the whole run that skips every
    step (an archive index that failed its checksum: no step file is damaged) is named as a
    replay names it (`whole_run_refusal`); else `message`, after the warning naming the
    damaged step files."""
    refusal = None if watcher.replay is None else whole_run_refusal(watcher.replay.run)
    if refusal is not None:
        return InputError(refusal)
    _warn_damaged(watcher)
    return InputError(_with_ranks(message, state))


def _once(watcher: RunWatcher, gates: Gates, output_format: str) -> int:
    watcher.poll()
    if watcher.ending:  # the second poll a live watch makes: the run gains no step then
        watcher.poll()
    if watcher.replay is not None:
        print_own_policy_note(watcher.replay.run, err)
    state = watcher.state()
    if state.steps == 0:
        raise _no_step_read(watcher, state, f"{state.run}: the run has no readable step yet")
    _require_replayed(watcher)
    results = _gates(watcher, gates)
    _warn_damaged(watcher)
    if watcher.replay is not None and watcher.replay.rejected:
        err.print(_rejected_line(state.run, watcher.replay.rejected), highlight=False)
    for line in _stopped_lines(watcher, set()):
        err.print(line, highlight=False)
    for alert in state.alerts:
        err.print(_alert_line(alert), highlight=False)
    if output_format == "json":
        data = state.to_dict()
        data["gates"] = [r.to_dict() for r in results]
        data["ok"] = all(r.ok for r in results)
        print_json(data)
    else:
        view = _view(state, out.width, whole=True)
        out.print(view, highlight=False, soft_wrap=False, crop=False)  # a long path wraps
    return _report_gates(results)


def _ended(how: WritersEnd) -> str:
    """Why a watch ends when the run's Recorders all ended without marking it closed."""
    if how == "killed":
        return "the recording's process ended without closing it (killed?)"
    return "every Recorder of the run closed"


def _end_view() -> None:
    """Off a terminal, the live view is printed once when it stops, without its last newline."""
    if not err.is_terminal:
        err.line()


def _follow(watcher: RunWatcher, gates: Gates, interval: float, until_idle: float | None) -> int:
    last_change = time.monotonic()
    seen = -1
    warned: set[int] = set()  # rejected steps warned about (one may land late, below others)
    replaced = 0  # times the run was replaced under the watch
    changes = 0  # changes of the run's policy said
    stopped: set[str] = set()  # the stopped recordings warned about, one a rank
    noted: OwnReplay | None = None  # the replay whose own policy's note is printed
    state = watcher.state()  # as the view shows it
    with sigterm_handled(terminate):
        try:
            with Live(_view(state, err.width), console=err, auto_refresh=False) as live:
                try:
                    while True:
                        alerts = watcher.poll()
                        state = watcher.state()
                        # before the lines: they follow it
                        live.update(_fitted(state, live.console), refresh=True)
                        if watcher.replaced > replaced:
                            replaced, warned, seen = watcher.replaced, set(), -1
                            line = f"{watcher.path}: the run changed under the watch: following it"
                            live.console.print(f"{line} from its start", highlight=False)
                        for change in watcher.policy_changes[changes:]:
                            line = _policy_change_line(str(watcher.path), change)
                            live.console.print(line, highlight=False)
                        changes = len(watcher.policy_changes)
                        if watcher.replay is not None and watcher.replay.spec is None:
                            _refuse_policy_gates(watcher, gates)  # no step will be replayed
                        if watcher.replay is not None and watcher.replay is not noted:
                            noted = watcher.replay  # once a run followed
                            print_own_policy_note(noted.run, live.console)
                        for alert in alerts:
                            live.console.print(_alert_line(alert), highlight=False)
                        for line in _stopped_lines(watcher, stopped):
                            live.console.print(line, highlight=False)
                        rejected = [] if watcher.replay is None else watcher.replay.rejected
                        unwarned = [(n, why) for n, why in rejected if n not in warned]
                        if unwarned:
                            line = _rejected_line(str(watcher.path), unwarned)
                            live.console.print(line, highlight=False)
                            warned.update(n for n, _ in unwarned)
                        now = time.monotonic()
                        if watcher.closed:  # every step the run will have is read
                            ended = "the recording closed"
                            break
                        if watcher.writers_ended is not None:  # so is it: no Recorder left
                            ended = _ended(watcher.writers_ended)
                            break
                        if state.steps != seen:
                            seen, last_change = state.steps, now
                        elif until_idle is not None and now - last_change >= until_idle:
                            ended = f"idle for {until_idle:g} s"
                            break
                        time.sleep(interval)
                finally:  # the whole view stays on the terminal, every step of --recent
                    live.update(_view(state, live.console.width))
        except (KeyboardInterrupt, Terminated) as stop:
            writing_again()
            _end_view()
            err.print(f"stopped ({counted(state.steps, 'step')} seen)", highlight=False)
            return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED
        except Exception:
            _end_view()  # the error's line is a line of its own
            raise
    _end_view()
    if state.steps == 0 and watcher.closed:
        raise _no_step_read(
            watcher, state, f"{watcher.path}: the recording closed with no readable step"
        )
    if state.steps == 0 and watcher.writers_ended is not None:
        message = f"{_ended(watcher.writers_ended)} with no readable step"
        raise _no_step_read(watcher, state, f"{watcher.path}: {message}")
    if state.steps == 0:
        raise _no_step_read(
            watcher, state, f"{watcher.path}: no step landed within {until_idle:g} s"
        )
    err.print(f"{ended}: stopped ({counted(state.steps, 'step')} seen)", highlight=False)
    _warn_damaged(watcher)  # as --once names them: the gates below skipped them
    _require_replayed(watcher)
    return _report_gates(_gates(watcher, gates))


def command(
    run: RunArg,
    once: Annotated[
        bool,
        typer.Option("--once", help="Print the current state and exit with the gates' code."),
    ] = False,
    interval: Annotated[
        float,
        number_option(
            "--interval",
            kind=float,
            metavar="SECONDS",
            help=f"Seconds between polls (at most {MAX_INTERVAL}).",
        ),
    ] = 2.0,
    until_idle: Annotated[
        float | None,
        number_option(
            "--until-idle",
            kind=float,
            metavar="SECONDS",
            help="Stop when no new step landed for this long (then exit with the gates' code).",
        ),
    ] = None,
    recent: Annotated[
        int, number_option("--recent", kind=int, metavar="N", help="Last steps shown in the view.")
    ] = 10,
    max_collapsed: MaxCollapsedOpt = None,
    max_discard_frac: MaxDiscardFracOpt = None,
    max_nonfinite: MaxNonfiniteOpt = None,
    max_spikes: MaxSpikesOpt = None,
    max_lost_steps: MaxLostStepsOpt = None,
    fail_on_collapse: FailOnCollapseOpt = False,
    output_format: FormatOpt = "table",
    device: DeviceOpt = "auto",
) -> None:
    """Follow a run while it is written: reward, grad norm, the own policy's discard and risk."""
    with option_names():
        gates = Gates(
            max_collapsed=max_collapsed,
            max_discard_frac=max_discard_frac,
            max_nonfinite=max_nonfinite,
            max_spikes=max_spikes,
            fail_on_collapse=fail_on_collapse,
            max_lost_steps=max_lost_steps,
        )
    if not 0 < interval <= MAX_INTERVAL:
        raise UsageError(f"--interval must be in (0, {MAX_INTERVAL}] seconds, got {interval:g}")
    if until_idle is not None and not until_idle >= 0:
        raise UsageError(f"--until-idle must be >= 0, got {until_idle:g}")
    if recent < 0:
        raise UsageError(f"--recent must be >= 0, got {recent}")
    if output_format == "json" and not once:
        raise UsageError("--format json needs --once (the live view is on stderr)")
    live = {"interval": "--interval", "until_idle": "--until-idle"}
    given = [flag for name, flag in live.items() if on_command_line(name)]
    if once and given:
        raise UsageError(
            f"{', '.join(given)}: for a live watch; --once reads the run once, as it is now"
        )
    path = local_run(run, "watch", "it polls a local directory while steps land in it")
    # before the live watch follows (it sets its own), or with --once: a line and 143
    with stopped_by_sigterm():
        if once or not run_to_come(path):
            opened = open_run(path)  # a missing path or a non-run (a FIFO): its own error
            if once and device in ("auto", "cpu"):  # a device named is checked first, by torch
                _refuse_unreplayed_gates(opened, path, gates)
        from stabledrl_cli.replay.follow import RunWatcher

        if device not in ("auto", "cpu"):  # torch: now, not when the first batch lands (live)
            from stabledrl_cli._device import resolve_device

            resolve_device(device)
        watcher = RunWatcher(path, ReplayConfig(device=device), recent=recent)
        if once:
            code = _once(watcher, gates, output_format)
        else:
            code = _follow(watcher, gates, interval, until_idle)
    if code:
        raise typer.Exit(code)
