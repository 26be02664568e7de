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
    """A run recorded on while read: the steps listed when the read began, the last of them
    (None: none), the steps every rank finished since, and whether a live Recorder holds it
    still (False: its Recorder closed since the read began)."""

    listed_steps: int
    to_step: int | None
    landed_steps: int
    held: bool

    def to_dict(self) -> dict[str, int | bool | None]:
        return {
            "listed_steps": self.listed_steps,
            "to_step": self.to_step,
            "landed_steps": self.landed_steps,
            "held": self.held,
        }


def live_read(run: Run, read: Sequence[int] | None = None) -> LiveRead | None:
    """`run` as read (the steps `read`, else its listing, held or not) when a live Recorder
    holds it (`Run.recorder_states`) or steps landed since (listed afresh: a Recorder that
    closed meanwhile); None when neither, and where no lock can be asked (an archive, a URL)."""
    states = run.recorder_states()
    if states is None:
        return None
    read = run.listed_whole_step_numbers if read is None else read
    since = whole_now(run).difference(read)
    held = "held" in states.values()
    if not held and not since:
        return None
    return LiveRead(len(read), max(read, default=None), len(since), held)


def whole_now(run: Run) -> set[int]:
    """The steps every rank of the local run `run` has finished now (listed afresh, its held
    listing left as it is)."""
    return set(open_run(run.path).listed_whole_step_numbers)
