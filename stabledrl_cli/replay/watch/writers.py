"""Whether a followed run's Recorders may still write, as each poll of a watch finds their
lock files (`RunWatcher.writers_ended`)."""

from __future__ import annotations

from typing import Literal

from stabledrl_cli.dump import Run

WritersEnd = Literal["killed", "closed"]
"""How a run's Recorders all ended without marking it closed (`RunWatcher.writers_ended`)."""


class Writers:
    """A run's Recorders as the polls of a watch found their locks."""

    def __init__(self, held: set[int] | None = None) -> None:
        self.held: set[int] = set() if held is None else held
        """The ranks whose lock a live Recorder held at a poll of this run."""
        self._holding: set[int] = set()
        """Those of `held` whose lock a live Recorder held at the last poll."""
        self._ended_polls = 0
        """The polls in a row, up to the last, that found the run's Recorders ended before
        listing its steps and its manifest the same after."""
        self._end: WritersEnd | None = None
        """How the last poll found them ended (`now`)."""

    @property
    def ended(self) -> WritersEnd | None:
        """How the run's Recorders all ended, as two polls in a row found them before they
        listed its steps (the first may have met a Recorder between creating its lock file
        and locking it): "killed" (a Recorder's process died), "closed"; None while one may
        still write. Once not None the last poll read every step the run will have."""
        return self._end if self._ended_polls >= 2 else None

    @property
    def ending(self) -> bool:
        """Whether the last poll found the run's Recorders ended and no poll before it did: the
        next poll tells (`ended`)."""
        return self._ended_polls == 1

    @property
    def let_go(self) -> set[int]:
        """The ranks whose lock a live Recorder held at a poll and holds no more."""
        return self.held - self._holding

    def now(self, run: Run) -> WritersEnd | None:
        """How the run's Recorders ended, as their lock files say now (`recorder_states`):
        "killed" when each lock file left is held by no process (one at least: its Recorder
        died), or when every rank held its lock at a poll of this watch and none holds it now,
        one at least left unheld; "closed" when all those let it go as they closed (a run
        whose last rank's mark did not land, or recorded before ranks marked it); None while
        one may still write, or when it cannot be told (a lock on another machine, an older
        Recorder's)."""
        states = run.recorder_states()
        if states is None:  # an archive, or no locks to ask
            return None
        self._holding = {rank for rank, state in states.items() if state == "held"}
        self.held.update(self._holding)
        left = set(states.values())
        if left == {"released"}:
            return "killed"
        world_size = run.manifest.get("world_size")
        every = isinstance(world_size, int) and set(range(world_size)) <= self.held
        if every and left <= {"released"}:
            return "killed" if left else "closed"
        return None

    def polled(self, end: WritersEnd | None) -> None:
        """Notes how a poll found the Recorders ended (`now`; None: not, or the manifest
        changed while it listed the steps)."""
        self._end = end
        self._ended_polls = self._ended_polls + 1 if end else 0
