"""What a command read of a run still being recorded: the steps of its held listing
(`Run.snapshot`), to which step, and how many landed since. The stderr warning
(`cli._live.note_live`) and each command's JSON (`"live"`) say the same `LiveRead`."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stabledrl_cli.dump._open import open_run
from stabledrl_cli.dump._run import Run
from stabledrl_cli.dump._stop_notes import STOP_RESUMED


@dataclass(frozen=True)
class LiveRead:
    """A run recorded on while read: the steps listed when the read began, the last of them
    (None: none), the steps every rank finished since, and whether a live Recorder holds it
    still (False: its Recorder closed since the read began, or the steps were copied in)."""

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
    closed meanwhile, or a copy); None when neither, and where no lock can be asked (an
    archive, a URL)."""
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


def in_flight(
    partial: Mapping[int, Collection[int]],
    world_size: int,
    lasts: Mapping[int, int],
    writing: Collection[int],
) -> set[int]:
    """The steps of `partial` (each -> the ranks with a file of it) still in flight: every rank
    that lacks one may still write it (is among `writing`) and has not gone past it (its last
    step, `lasts`, is before it: a rank's steps increase). Any other is lost."""
    if not writing:
        return set()
    ended = [rank for rank in range(world_size) if rank not in writing]
    latest = sorted(lasts.values())
    return {
        n
        for n, wrote in partial.items()
        # every rank that wrote n has its last step at or after n: none other may have
        if len(latest) - bisect_left(latest, n) == len(wrote)
        and all(rank in wrote for rank in ended)
    }


def stopped_ranks(stops: Iterable[dict[str, Any]], lasts: Mapping[int, int]) -> set[int]:
    """The ranks whose recording stopped after their last step (`lasts`): a stop note among
    `stops` (`Run.recording_stops`) that no resume of its rank marked `resumed`, and no step
    written at or after the note's step since (a rank that did was resumed)."""
    stopped = set()
    for note in stops:
        step, last = note.get("step"), lasts.get(note["rank"])
        if note.get(STOP_RESUMED) is not True and (step is None or last is None or last < step):
            stopped.add(note["rank"])
    return stopped
