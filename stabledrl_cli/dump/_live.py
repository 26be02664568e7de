"""What a command read of a run still being recorded: the steps of its held listing
(`Run.snapshot`), to which step, and how many landed since. The stderr warning
(`cli._live.note_live`) and each command's JSON (`"live"`) say the same `LiveRead`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stabledrl_cli.dump._open import open_run
from stabledrl_cli.dump._run import Run


@dataclass(frozen=True)
class LiveRead:
    """A run a live Recorder held when read: the steps listed when the read began, the last of
    them (None: none), and the steps every rank finished since."""

    listed_steps: int
    to_step: int | None
    landed_steps: int

    def to_dict(self) -> dict[str, int | None]:
        return {
            "listed_steps": self.listed_steps,
            "to_step": self.to_step,
            "landed_steps": self.landed_steps,
        }


def live_read(run: Run, read: Sequence[int] | None = None) -> LiveRead | None:
    """`run` as read (the steps `read`, else its listing, held or not) when a live Recorder
    holds it (`Run.recorder_states`), the steps landed since listed afresh; None when none
    holds it."""
    if "held" not in (run.recorder_states() or {}).values():
        return None
    read = run.listed_whole_step_numbers if read is None else read
    since = set(open_run(run.path).listed_whole_step_numbers).difference(read)
    return LiveRead(len(read), max(read, default=None), len(since))
