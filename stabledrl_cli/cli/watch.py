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

from typing import Annotated

import typer

from stabledrl_cli.cli._local import local_run
from stabledrl_cli.cli._option_names import option_names
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
from stabledrl_cli.cli._signals import stopped_by_sigterm
from stabledrl_cli.cli._watch_gates import refuse_unreplayed_gates
from stabledrl_cli.cli._watch_loop import follow, read_once
from stabledrl_cli.dump import open_run
from stabledrl_cli.dump._open import run_to_come
from stabledrl_cli.errors import UsageError
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.gate import Gates

MAX_INTERVAL = 86_400
"""The longest --interval, a day (time.sleep overflowed on 1e30 seconds)."""


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
                refuse_unreplayed_gates(opened, path, gates)
        from stabledrl_cli.replay.watch.follow import RunWatcher

        if device not in ("auto", "cpu"):  # torch: now, not when the first batch lands (live)
            from stabledrl_cli._device import resolve_device

            resolve_device(device)
        watcher = RunWatcher(path, ReplayConfig(device=device), recent=recent)
        if once:
            code = read_once(watcher, gates, output_format)
        else:
            code = follow(watcher, gates, interval, until_idle)
    if code:
        raise typer.Exit(code)
