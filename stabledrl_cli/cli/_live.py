"""The warning of a command that read a run still being recorded: what it read (the steps listed
when it began, `open_snapshot`) and how many steps landed since."""

from __future__ import annotations

from stabledrl_cli._url import redacted
from stabledrl_cli.cli._output import err
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.errors import counted


def note_live(run: Run, given: str, what: str, command: str) -> None:
    """A warning on stderr when a live Recorder holds `run` (`Run.recorder_states`): `what`
    ("the replay read", "the archive holds") the steps of `open_snapshot`'s listing, to which
    step, and the steps finished since (listed afresh). Nothing for a run no Recorder holds."""
    if "held" not in (run.recorder_states() or {}).values():
        return
    read = run.listed_whole_step_numbers
    since = len(set(open_run(run.path).listed_whole_step_numbers).difference(read))
    upto = f" (to step {max(read)})" if read else ""
    err.print(
        f"warning: {redacted(given)} is being recorded now (a live Recorder holds it); {what} "
        f"the {counted(len(read), 'step')} listed when the {command} began{upto}"
        + (f", not the {counted(since, 'step')} finished since" if since else ""),
        highlight=False,
    )
