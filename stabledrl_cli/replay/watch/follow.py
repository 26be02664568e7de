"""Following a run as it is written: `RunWatcher` polls the run, replays the steps that
landed since the last poll with the run's own policy (`incremental.OwnReplay`) and raises each
alert once (`alerts`); `state.WatchState` is what `watch` shows of it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stabledrl_cli.dump import Finding, Run, RunIntegrityWarning, open_run
from stabledrl_cli.dump._file_names import MANIFEST_NAME, STEPS_DIR
from stabledrl_cli.dump._integrity import DAMAGED_KINDS, SKIPPED_KINDS, missing_count
from stabledrl_cli.dump._live import in_flight, stopped_ranks
from stabledrl_cli.dump._open import run_to_come
from stabledrl_cli.dump._stop_notes import stops_by_rank
from stabledrl_cli.dump._views import StepSubset
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.gate import LostSteps
from stabledrl_cli.replay.incremental import OwnReplay
from stabledrl_cli.replay.observed import Observed
from stabledrl_cli.replay.run_facts import run_gaps, run_ranks
from stabledrl_cli.replay.watch.alerts import Alert, candidates
from stabledrl_cli.replay.watch.manifest import WatchedManifest
from stabledrl_cli.replay.watch.rank_files import RankFiles, RankProgress
from stabledrl_cli.replay.watch.state import WatchState, watch_state
from stabledrl_cli.replay.watch.writers import Writers, WritersEnd
from stabledrl_cli.vocab import ALERT_KINDS


@dataclass(frozen=True, kw_only=True)
class PolicyChange:
    """The run's policy, changed in its manifest while it was watched (`RunWatcher`)."""

    was: str | None
    now: str | None
    after_step: int
    """The last step read under `was`: every step is replayed under `now` since."""
    replayed: bool
    """Whether `now` is replayed (a policy of the catalogue)."""


def _policy_of(replay: OwnReplay) -> str | None:
    """The spec the watch replays the run by: its own policy's, else the manifest's."""
    return replay.spec or replay.run.policy_spec


class RunWatcher:
    """Follows a run as it is written: each `poll` replays the steps that landed since the
    last one (a step file still under its temporary name is not listed yet) and returns the
    new alerts. A path with no manifest yet is waited for. A run changed under the watcher
    (its manifest removed, or rewritten as another run's: `record --force` over it, or a
    resume that writes steps again, each with a new `run_id`; or steps it read removed, or a
    rank's file of one) is
    dropped with all that was read of it, and the path followed again from the start
    (`replaced` counts how often). A step read is not read again (but the last one, which a
    recording may still rewrite: a Recorder rewrites no other under the same `run_id`,
    docs/run-format.md; a step new to the listing below the last one read, landed out of
    order, or one there whose file reads now and did not at the last poll, has the run read
    again, its alerts kept), and what is derived from the steps read is
    derived again only when more were read, or the last one changed. `closed` says when a
    poll read every step the run will have (its manifest marked `recording_closed`, or a
    packed archive); `writers_ended` how its Recorders all ended, when two polls in a row
    found them ended (`Writers.now`), the second one listing after that. A manifest changed
    otherwise under the same `run_id` is the same run amended (verl's integration turns its
    policy to `agg=recorded` mid-run): it is read again from its start, its steps judged
    under the amended manifest, no alert raised twice; `policy_changes` lists each change of
    the policy it is replayed by."""

    def __init__(
        self, path: str | os.PathLike[str], config: ReplayConfig | None = None, *, recent: int = 10
    ) -> None:
        self.path = Path(path)
        self.config = config or ReplayConfig()
        self.recent = recent
        self.replay: OwnReplay | None = None
        self._waiting: str | None = self._reading()
        self._alerts: list[Alert] = []
        self._seen: set[tuple[str, int]] = set()
        self._listed: set[int] = set()
        """The steps the last poll listed."""
        self._unreadable: set[int] = set()
        """The listed steps below the last one read that the last poll could not read (a
        file still being copied in place): one that reads later has the run read again."""
        self._manifest = WatchedManifest(self.path)
        """The run's manifest, as last read."""
        self._alerted: Observed | None = None
        """The observed behaviour the last alerts were raised on (none are new until it changes)."""
        self._rank_files: RankFiles | None = None
        self.replaced = 0
        """How often the run changed under the watcher (and was followed again from the start)."""
        self.policy_changes: list[PolicyChange] = []
        """Each change of the policy the run is replayed by, in its manifest, while watched."""
        self._judged: tuple[str | None, int] | None = None
        """The policy the steps read were judged by at the last poll that read some, and the
        last of them; None once the run was replaced."""
        self.recording_stops: list[dict[str, Any]] = []
        """Every rank's `recording_stopped` note, by rank, as the last poll read them: the
        manifest's and each rank's own note file (`Run.recording_stops`)."""
        self.closed = False
        """Whether the manifest was marked `recording_closed` before the last poll listed the
        steps, and was the same after: that poll read every step the run will have
        (docs/run-format.md)."""
        self._writers = Writers()
        """The run's Recorders, as the polls found their locks."""

    @property
    def writers_ended(self) -> WritersEnd | None:
        """How the run's Recorders all ended, as two polls in a row found them before they
        listed its steps (`Writers.ended`); None while one may still write. Once not None the
        last poll read every step the run will have."""
        return self._writers.ended

    @property
    def ending(self) -> bool:
        """Whether the last poll found the run's Recorders ended and no poll before it did: the
        next poll tells (`writers_ended`)."""
        return self._writers.ending

    def _open(self) -> OwnReplay | None:
        if self.replay is None:
            self._manifest.key = None  # a packed archive has none
            if run_to_come(self.path):
                self._manifest.key = self._manifest.key_now()
                if self._manifest.key is None:  # no manifest (yet, or no more)
                    return None
            self.replay = OwnReplay(open_run(self.path), self.config)
            self._manifest.opened(self.replay.run.manifest)
        return self.replay

    def _reading(self) -> str:
        """What the view says before a poll has read the path: never that the manifest is
        awaited, which a first poll of a long run, reading its steps, would show for long."""
        return f"reading {self.path}"

    def _awaited(self) -> str:
        """What the view says while the path holds no run: a directory's manifest is awaited;
        a path with nothing there, the run directory or packed archive to come there."""
        if self.path.is_dir():
            return f"waiting for {self.path / MANIFEST_NAME}"
        return f"waiting for {self.path} to appear (a run directory or a packed archive)"

    def _start_over(self) -> None:
        """Drops all that was read of the run: the path is followed again from its start. A
        replacement counts once: a recording over the run removes its step files, then writes
        its manifest, and a watcher between the two has read nothing since the first. The
        same run amended (`WatchedManifest.amended`) keeps its alerts raised and its ranks seen
        holding their locks, and is no replacement."""
        amended = self._manifest.amended
        if self.replay is not None and self.replay.seen and not amended:
            self.replaced += 1
        if not amended:
            self._alerts, self._seen = [], set()
            self._judged = None
        self.replay = None
        self._listed, self._unreadable = set(), set()
        self._rank_files = None
        self._manifest = WatchedManifest(self.path)
        self.recording_stops = []
        self.closed = False
        self._writers = Writers(self._writers.held if amended else None)
        self._waiting = self._reading()
        self._alerted = None

    def poll(self) -> list[Alert]:
        """Replays the new steps; -> the alerts they raised. InputError for a run that cannot
        be read (a corrupt manifest, a step the own policy cannot read). A run replaced while
        the poll read it (its steps may be the new run's under the names the old run's had)
        is dropped and read again from its start, once; replaced again, the poll waits."""
        if self.replay is not None and self._manifest.replaced(self.replay.run.manifest):
            self._start_over()
        for _ in range(2):
            if not self._read():
                break
            self._start_over()
        replay = self.replay
        if replay is None:
            self._waiting = self._awaited()
            return []
        if not replay.seen:
            self._waiting = f"waiting for the first step of {self.path}"
            return []
        self._waiting = None
        self._judge_under(replay)
        observed = replay.observed()
        if observed is self._alerted:  # nothing new was read
            return []
        self._alerted = observed
        return self._raise(candidates(replay, self.config.spike_factor))

    def _judge_under(self, replay: OwnReplay) -> None:
        """Notes the policy the steps read are judged by now, and a change of it since the
        last poll (`policy_changes`): the same run, its manifest amended."""
        now = _policy_of(replay)
        if self._judged is not None and self._judged[0] != now:
            was, after = self._judged
            replayed = replay.spec is not None
            self.policy_changes.append(
                PolicyChange(was=was, now=now, after_step=after, replayed=replayed)
            )
        self._judged = (now, replay.seen[-1])

    def _read(self) -> bool:
        """Opens the run if need be and reads the steps that landed; -> whether the run was
        replaced while it read them (a Recorder writes a new manifest before the new run's
        steps: one seen after the read means the read may hold them)."""
        replay = self._open()
        if replay is None:
            return False
        closed = self._manifest.closed_mark  # read before the listing: it lists every step
        ended = self._writers.now(replay.run)
        numbers = replay.run.listed_step_numbers
        if self._gone(replay, numbers):
            self._start_over()
            replay = self._open()
            if replay is None:
                return False
            closed = self._manifest.closed_mark
            numbers = replay.run.listed_step_numbers
        elif self._landed_late(replay, numbers):  # the same run: its alerts are kept
            self.replay = None
            replay = self._open()
            if replay is None:
                return False
            closed = self._manifest.closed_mark
            numbers = replay.run.listed_step_numbers
        self._listed = set(numbers)
        replay.extend(numbers)
        # the run's notes, and the manifest's note as last read (the run's reader read its
        # manifest once) for a rank the run has none of
        self.recording_stops = stops_by_rank(
            replay.run.listed_recording_stops, [self._manifest.recording_stopped]
        )
        holes = self._holes(replay, numbers)
        self._unreadable = holes - self._readable(replay, holes)
        kept = self._manifest.kept()
        if not kept and self._manifest.replaced(replay.run.manifest):
            return True
        self.closed = closed and kept  # the mark held through the listing
        self._writers.polled(ended if kept else None)
        return False

    @staticmethod
    def _gone(replay: OwnReplay, numbers: list[int]) -> bool:
        """Whether a step read is gone from the listing `numbers`, or some rank's file of it
        is (a rank's files removed: the step is no more, or lacks that rank)."""
        seen = set(replay.seen)
        return not seen <= set(numbers) or not seen.isdisjoint(
            replay.run.listed_partial_step_numbers
        )

    def _landed_late(self, replay: OwnReplay, numbers: list[int]) -> bool:
        """Whether a step below the last one read is new to the listing (files landed out of
        order: a copy or sync into the directory), or reads now where the last poll could not
        read it (a copy in place, half written then): the steps after it were replayed
        without it in their history, so the run is read again from its start."""
        seen = replay.seen
        if seen and any(n < seen[-1] and n not in self._listed for n in numbers):
            return True
        return bool(self._readable(replay, self._unreadable.intersection(numbers)))

    @staticmethod
    def _holes(replay: OwnReplay, numbers: Sequence[int]) -> set[int]:
        """The steps of `numbers` below the last one read that were not read."""
        seen = replay.seen
        return set(n for n in numbers if n < seen[-1]).difference(seen) if seen else set()

    @staticmethod
    def _readable(replay: OwnReplay, numbers: Iterable[int]) -> set[int]:
        """The steps of `numbers` whose file reads, from its header (a stat for a file checked
        as it is: the run caches the checks)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            return {step.step for step in StepSubset(replay.run, list(numbers)).step_headers()}

    def _raise(self, candidates: list[Alert]) -> list[Alert]:
        new = []
        for alert in sorted(candidates, key=lambda a: (a.step, ALERT_KINDS.index(a.kind))):
            # Once per step, the reward collapse too: on a live run it stays below "to the
            # end" of the steps so far, so one the reward recovers from vanishes (or moves
            # later), and a collapse found later is a new one.
            key = (alert.kind, alert.step)
            if key not in self._seen:
                self._seen.add(key)
                new.append(alert)
        self._alerts.extend(new)
        return new

    def packed_ranks(self) -> int | None:
        """The world size of the run when it is a packed archive of several ranks, else None."""
        if self.replay is None or not self.path.is_file():
            return None
        world_size = self.replay.run.manifest.get("world_size")
        return world_size if isinstance(world_size, int) and world_size > 1 else None

    def rank_progress(self) -> list[RankProgress]:
        """Each rank's step files in the run's directory, as of now (a listing of its steps
        folder, no file opened); [] for a run of one rank, a packed archive, or none yet."""
        world_size = 1 if self.replay is None else self.replay.run.manifest.get("world_size")
        if not isinstance(world_size, int) or world_size < 2 or self.path.is_file():
            return []
        if self._rank_files is None or self._rank_files.world_size != world_size:
            self._rank_files = RankFiles(world_size)
        return self._rank_files.progress(self.path / STEPS_DIR)

    def lacking(self) -> list[Finding]:
        """The integrity findings of the step files the reader skipped that the run lacks: the
        damaged ones (`DAMAGED_KINDS`), and a step some rank never wrote (`SKIPPED_KINDS`), as
        `check` counts it, unless it is in flight (`in_flight`: every rank lacking it may
        still write it, `_writing`, and has not gone past it; the ranks of a live run lag)."""
        if self.replay is None:
            return []
        run = self.replay.run
        findings = run.header_findings()  # lists the run: what follows is of this listing
        lasts = run.listed_last_steps
        writing = self._writing(run, lasts)
        flying = in_flight(run.listed_partial_steps, run_ranks(run), lasts, writing)
        return [
            f
            for f in findings
            if f.kind in DAMAGED_KINDS or (f.kind in SKIPPED_KINDS and f.step not in flying)
        ]

    def _writing(self, run: Run, lasts: dict[int, int]) -> set[int]:
        """The ranks that may still write a step, as far as the watch tells: none once the
        recording closed or its Recorders ended (`writers_ended`); else all but those whose
        recording stopped after their last step (`lasts`, `stopped_ranks`), those the manifest
        marks closed, and those a poll found holding their lock that hold it no more."""
        if self.closed or self.writers_ended is not None:
            return set()
        gone = stopped_ranks(self.recording_stops, lasts) | self._manifest.closed_ranks
        return set(range(run_ranks(run))) - gone - self._writers.let_go

    def lost_steps(self) -> LostSteps:
        """The steps the run lacks so far, as `watch` warns of them: skipped (`lacking`: their
        file damaged, or some rank's never written once the run gains no step or no rank may
        still write it) or their data unusable by the own policy, and missing between the
        recorded ones; none before a step was read."""
        if self.replay is None:
            return LostSteps(skipped=0, missing=0)
        damaged = {f.step for f in self.lacking() if f.step is not None}
        skipped = damaged | {step for step, _ in self.replay.rejected}
        return LostSteps(skipped=len(skipped), missing=missing_count(run_gaps(self.replay.run)))

    def state(self) -> WatchState:
        """What is known now."""
        return watch_state(
            self.path,
            self.replay,
            waiting=self._waiting,
            alerts=self._alerts,
            recent=self.recent,
            ranks=self.rank_progress(),
            packed_ranks=self.packed_ranks(),
        )
