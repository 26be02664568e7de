"""How far each rank of a run of several ranks got, from its steps folder's file names
(`RunWatcher.rank_progress`): `RankFiles` counts them as they land, `behind` names the ranks
that hold the run's steps back."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from stabledrl_cli.dump._file_names import canonical_step
from stabledrl_cli.dump._stfile import FileKey, file_key


@dataclass(frozen=True, kw_only=True)
class RankProgress:
    """How far one rank of a multi-rank run got: its step files and the last one's step."""

    rank: int
    step_files: int
    last_step: int | None
    """None: the rank wrote no step file."""


def behind(ranks: list[RankProgress]) -> list[int]:
    """The ranks whose last step file is before the furthest rank's, or that wrote none: a
    rank that died or stopped writing (or lags, on a live run). A step is readable only once
    every rank wrote its file, so these hold the run's steps back."""
    furthest = max((r.last_step for r in ranks if r.last_step is not None), default=None)
    return [r.rank for r in ranks if r.last_step is None or r.last_step != furthest]


LISTING_SETTLED_NS = 2_000_000_000
"""How long before a listing a steps folder must have last changed for its count of each
rank's files to be reused (as the run's reader reuses its listing: far above any file
system's timestamp granularity)."""


class RankFiles:
    """Each rank's step files in a steps folder, counted as their names land: a name listed
    before is not parsed again, and a folder unchanged since a settled listing is not listed
    again (a run of 20,000 steps of 8 ranks holds 160,000 names: 3 s a poll to parse, 0.7 s
    to list here); a name gone has the folder counted again."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._names: set[str] = set()
        self._files, self._last = [0] * world_size, [-1] * world_size
        self._settled: FileKey | None = None
        """The folder's key at the last listing, when it had not changed for a while then."""

    def progress(self, steps: Path) -> list[RankProgress]:
        try:
            stat: os.stat_result | None = os.stat(steps)
        except OSError:  # no steps folder (yet, or no more): the reader says what is wrong
            stat = None
        key = None if stat is None else file_key(stat)
        if key is None or key != self._settled:
            self._count(steps)
        settled = stat is not None and time.time_ns() - stat.st_mtime_ns > LISTING_SETTLED_NS
        self._settled = key if settled else None
        return [
            RankProgress(rank=r, step_files=files, last_step=self._last[r] if files else None)
            for r, files in enumerate(self._files)
        ]

    def _count(self, steps: Path) -> None:
        try:
            names = set(os.listdir(steps))
        except OSError:
            names = set()
        if not self._names <= names:  # a name went away: count them all again
            self._names = set()
            self._files, self._last = [0] * self.world_size, [-1] * self.world_size
        for name in names - self._names:
            found = canonical_step(name)
            if found is not None and found[1] < self.world_size:
                step, rank = found
                self._files[rank] += 1
                self._last[rank] = max(self._last[rank], step)
        self._names = names
