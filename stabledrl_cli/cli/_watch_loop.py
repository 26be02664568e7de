"""How `stabledrl watch` reads a run: once (--once: the state on stdout, then the gates' code)
or followed live (a view on stderr, refreshed each poll, until the recording closes, its
Recorders end, it goes idle, or Ctrl-C or SIGTERM stops it)."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

from rich.live import Live

from stabledrl_cli._process import SIGNALLED
from stabledrl_cli.cli._output import err, out, print_json, writing_again
from stabledrl_cli.cli._replay_notes import missing_line
from stabledrl_cli.cli._signals import Terminated, sigterm_handled, terminate
from stabledrl_cli.cli._watch_gates import (
    gates_so_far,
    refuse_policy_gates,
    report_gates,
    require_replayed,
)
from stabledrl_cli.cli._watch_view import (
    alert_line,
    damaged_line,
    fitted_view,
    policy_change_line,
    rejected_line,
    state_view,
    stopped_lines,
    with_ranks,
)
from stabledrl_cli.errors import INTERRUPTED, InputError, counted
from stabledrl_cli.replay.gate import Gates
from stabledrl_cli.replay.run_facts import print_own_policy_note, run_gaps, whole_run_refusal

if TYPE_CHECKING:
    from stabledrl_cli.replay.incremental import OwnReplay
    from stabledrl_cli.replay.watch.follow import RunWatcher
    from stabledrl_cli.replay.watch.state import WatchState
    from stabledrl_cli.replay.watch.writers import WritersEnd

TERMINATED = SIGNALLED + signal.SIGTERM
"""The exit code of a watch stopped with SIGTERM (143), as a shell reports a process it ended."""


def _warn_damaged(watcher: RunWatcher) -> None:
    """Prints `damaged_line`, if any, and the warning of steps missing between the recorded
    ones, as replay does."""
    damaged = damaged_line(watcher)
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
    return InputError(with_ranks(message, state))


def read_once(watcher: RunWatcher, gates: Gates, output_format: str) -> int:
    """--once: the run read as it is now, its state on stdout (a table, or `output_format`
    json) and its warnings on stderr; the gates' exit code."""
    watcher.poll()
    if watcher.ending:  # the second poll a live watch makes: the run gains no step then
        watcher.poll()
    if watcher.replay is not None:
        print_own_policy_note(watcher.replay.run, err)
    state = watcher.state()
    if state.steps == 0:
        raise _no_step_read(watcher, state, f"{state.run}: the run has no readable step yet")
    require_replayed(watcher)
    results = gates_so_far(watcher, gates)
    _warn_damaged(watcher)
    if watcher.replay is not None and watcher.replay.rejected:
        err.print(rejected_line(state.run, watcher.replay.rejected), highlight=False)
    for line in stopped_lines(watcher, set()):
        err.print(line, highlight=False)
    for alert in state.alerts:
        err.print(alert_line(alert), highlight=False)
    if output_format == "json":
        data = state.to_dict()
        data["gates"] = [r.to_dict() for r in results]
        data["ok"] = all(r.ok for r in results)
        print_json(data)
    else:
        view = state_view(state, out.width, whole=True)
        out.print(view, highlight=False, soft_wrap=False, crop=False)  # a long path wraps
    return report_gates(results)


def _ended(how: WritersEnd) -> str:
    """Why a watch ends when the run's Recorders all ended without marking it closed."""
    if how == "killed":
        return "the recording's process ended without closing it (killed?)"
    return "every Recorder of the run closed"


def _end_view() -> None:
    """Off a terminal, the live view is printed once when it stops, without its last newline."""
    if not err.is_terminal:
        err.line()


def follow(watcher: RunWatcher, gates: Gates, interval: float, until_idle: float | None) -> int:
    """The live watch: polls every `interval` seconds until the run ends or is idle for
    `until_idle`, then the gates' exit code; INTERRUPTED or TERMINATED when stopped."""
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
            with Live(state_view(state, err.width), console=err, auto_refresh=False) as live:
                try:
                    while True:
                        alerts = watcher.poll()
                        state = watcher.state()
                        # before the lines: they follow it
                        live.update(fitted_view(state, live.console), refresh=True)
                        if watcher.replaced > replaced:
                            replaced, warned, seen = watcher.replaced, set(), -1
                            line = f"{watcher.path}: the run changed under the watch: following it"
                            live.console.print(f"{line} from its start", highlight=False)
                        for change in watcher.policy_changes[changes:]:
                            line = policy_change_line(str(watcher.path), change)
                            live.console.print(line, highlight=False)
                        changes = len(watcher.policy_changes)
                        if watcher.replay is not None and watcher.replay.spec is None:
                            refuse_policy_gates(watcher, gates)  # no step will be replayed
                        if watcher.replay is not None and watcher.replay is not noted:
                            noted = watcher.replay  # once a run followed
                            print_own_policy_note(noted.run, live.console)
                        for alert in alerts:
                            live.console.print(alert_line(alert), highlight=False)
                        for line in stopped_lines(watcher, stopped):
                            live.console.print(line, highlight=False)
                        rejected = [] if watcher.replay is None else watcher.replay.rejected
                        unwarned = [(n, why) for n, why in rejected if n not in warned]
                        if unwarned:
                            line = rejected_line(str(watcher.path), unwarned)
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
                    live.update(state_view(state, live.console.width))
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
    require_replayed(watcher)
    return report_gates(gates_so_far(watcher, gates))
