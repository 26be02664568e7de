"""The warning of a command that read a run still being recorded: what it read (the steps listed
when it began, `open_snapshot`) and how many steps landed since (`dump._live.live_read`)."""

from __future__ import annotations

from stabledrl_cli._url import redacted
from stabledrl_cli.cli._output import err
from stabledrl_cli.dump._live import LiveRead
from stabledrl_cli.errors import counted


def note_live(live: LiveRead | None, given: str, what: str, command: str) -> None:
    """A warning on stderr when the run `given` was recorded on while read (`live`, the figures
    the command's JSON has too): `what` ("the replay read", "the archive holds") the steps
    listed when the `command` began, to which step, and the steps finished since. Nothing for
    None."""
    if live is None:
        return
    upto = f" (to step {live.to_step})" if live.to_step is not None else ""
    since = live.landed_steps
    recorded = (
        "is being recorded now (a live Recorder holds it)"
        if live.held
        else f"was written to while the {command} read it (no live Recorder holds it now)"
    )
    err.print(
        f"warning: {redacted(given)} {recorded}; {what} "
        f"the {counted(live.listed_steps, 'step')} listed when the {command} began{upto}"
        + (f", not the {counted(since, 'step')} finished since" if since else ""),
        highlight=False,
    )
