"""Following a run as it is written: `RunWatcher` polls the run, replays the steps that
landed since the last poll with the run's own policy (`incremental.OwnReplay`) and raises each
alert once (a risk, non-finite or drift step of the own policy, a recorded grad-norm spike,
the collapse warning, a reward collapse); `WatchState` is what `watch` shows of it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stabledrl_cli.dump import Finding, Run, RunIntegrityWarning, open_run
from stabledrl_cli.dump._integrity import missing_count
from stabledrl_cli.dump._live import in_flight, stopped_ranks
from stabledrl_cli.dump._manifest_edits import closed_ranks, manifest_now
from stabledrl_cli.dump._open import run_to_come
from stabledrl_cli.dump._schema import (
    MANIFEST_NAME,
    RECORDING_CLOSED,
    RECORDING_CLOSED_RANKS,
    RECORDING_STOPPED,
    RUN_ID,
    STEPS_DIR,
    canonical_step,
    stops_by_rank,
)
from stabledrl_cli.dump._stfile import FileKey, file_key
from stabledrl_cli.dump._views import ReadSteps, StepSubset
from stabledrl_cli.errors import InputError
from stabledrl_cli.replay.columns import ColumnArray
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.detectors import (
    REWARD_DRAW_SCALARS,
    rollout_indices,
    run_reward_draws,
    training_step_starts,
)
from stabledrl_cli.replay.gate import LostSteps
from stabledrl_cli.replay.incremental import OwnReplay
from stabledrl_cli.replay.observed import Observed, is_verl_recording
from stabledrl_cli.replay.run_facts import DAMAGED_KINDS, SKIPPED_KINDS, run_gaps, run_ranks
from stabledrl_cli.replay.summary import unjudged_rules
from stabledrl_cli.vocab import ALERT_KINDS, AlertKind


@dataclass(frozen=True, kw_only=True)
class Alert:
    """Something a watcher saw happen, once per kind and step."""

    kind: AlertKind
    step: int
    message: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class StepRow:
    """One step as a watcher shows it: recorded reward and grad norm, the own policy's
    replayed discard fraction and flags (None where not known)."""

    step: int
    reward_mean: float | None
    grad_norm: float | None
    discard_frac: float | None
    risk: bool | None
    drift: bool | None
    training_step: int | None = None
    """Of a verl recording: the training step that holds the step, from 1 as verl's log numbers
    them, whose reward `reward_mean` is then (`_training_rewards`); None for any other run."""


def _training_rewards(
    replay: OwnReplay, steps: list[int]
) -> dict[int, tuple[int | None, float | None]]:
    """Of a verl recording, each of `steps` -> (its training step, from 1 as verl's log
    numbers them, None where the recording does not establish it (`rollout_indices`); that
    training step's reward as verl logs it, `critic/score/mean`: its rollout's draw,
    `detectors.run_reward_draws`, None where it recorded no reward), over the steps read so
    far."""
    read = ReadSteps.of(replay.run, replay.headers(replay.seen))
    scalars = read.scalar_series_many(list(REWARD_DRAW_SCALARS))
    seen = np.asarray(replay.seen, np.int64)
    starts = training_step_starts(seen, *scalars["inner_step"])
    indices = rollout_indices(*scalars["inner_step"])
    drawn = dict(zip(*(a.tolist() for a in run_reward_draws(scalars, verl=True)), strict=True))
    rewards: dict[int, tuple[int | None, float | None]] = {}
    for n in steps:
        start = int(starts[np.searchsorted(starts, n, side="right") - 1])
        index = indices.get(n)
        rewards[n] = (None if index is None else index + 1, drawn.get(start))
    return rewards


@dataclass(frozen=True, kw_only=True)
class RankProgress:
    """How far one rank of a multi-rank run got: its step files and the last one's step."""

    rank: int
    step_files: int
    last_step: int | None
    """None: the rank wrote no step file."""


def _behind(ranks: list[RankProgress]) -> list[int]:
    """The ranks whose last step file is before the furthest rank's, or that wrote none: a
    rank that died or stopped writing (or lags, on a live run). A step is readable only once
    every rank wrote its file, so these hold the run's steps back."""
    furthest = max((r.last_step for r in ranks if r.last_step is not None), default=None)
    return [r.rank for r in ranks if r.last_step is None or r.last_step != furthest]


@dataclass(frozen=True, kw_only=True)
class WatchState:
    """What a watcher knows of a run now (docs/watch.md)."""

    run: str
    waiting: str | None
    """Why nothing is known yet (no manifest, no step), or None."""
    steps: int
    """Steps read, scalar steps included."""
    last_step: int | None
    own_policy: str | None
    """The own policy's spec (None: the run names none, or one not in the catalogue)."""
    recorded_policy: str | None
    """The policy spec the run's manifest names (None: none)."""
    replayed_steps: int
    """Steps the own policy replayed (0 without one, or on scalar steps only)."""
    scalar_steps: int
    """Steps without a policy batch: nothing to replay, their recorded scalars count."""
    recent: list[StepRow]
    """The last steps, ascending."""
    risk_steps: list[int]
    drift_steps: list[int]
    spike_steps: list[int]
    """Steps whose recorded grad_norm is a spike."""
    nonfinite_steps: list[int]
    """Recorded non-finite steps."""
    nonfinite_training_steps: list[int] | None
    """A verl recording's training steps that hold them, numbered as verl's log numbers them
    (`Observed.nonfinite_training_steps`); None for any other run."""
    collapse_warning: int | None
    """The collapse warning's first step."""
    first_reward_collapse: int | None
    alerts: list[Alert]
    """Every alert so far, in the order seen."""
    ranks: list[RankProgress]
    """Each rank's progress, of a run of several ranks (its directory's step files); [] for
    one rank or a packed archive."""
    ranks_behind: list[int]
    """The ranks of `ranks` behind the furthest one (`_behind`)."""
    packed_ranks: int | None = None
    """The world size of a packed archive's run of several ranks (its steps joined, each
    whole: no rank's progress is left to show); None otherwise."""
    unjudged: dict[str, str] = field(default_factory=dict)
    """The rules that judged no step of the steps seen, each with why: the own policy's
    `drift` and `spike` (as a replay's `PolicySummary.unjudged`) and the recorded run's
    (`RECORDED_RULES`, `Observed.unjudged`): their none says nothing."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


RECORDED_RULES = {
    "spike_steps": "spike_steps",
    "nonfinite_steps": "nonfinite_steps",
    "collapse_warning": "collapse_warning_first_step",
    "first_reward_collapse": "first_reward_collapse",
}
"""The recorded run's figures of `WatchState` (its keys) whose rule may judge no step -> the
run figure `Observed.unjudged` names it by."""


def _flag_steps(series: dict[str, ColumnArray], name: str) -> list[int]:
    if not series:
        return []
    flags = np.asarray(series[name], dtype=bool)
    return [int(n) for n in np.asarray(series["step"])[flags]]


def _stretch_starts(series: dict[str, ColumnArray], name: str) -> list[int]:
    """The steps flagged `name` whose replayed step before is not: where each stretch of them
    begins, over the replayed steps in order (a run that records a batch every Nth step, or
    scalar steps between, is one stretch, not one a step)."""
    if not series:
        return []
    flags = np.asarray(series[name], dtype=bool)
    starts = flags & ~np.concatenate(([False], flags[:-1]))
    return [int(n) for n in np.asarray(series["step"])[starts]]


def _stopped_note(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's `recording_stopped` note, None without one."""
    note = manifest.get(RECORDING_STOPPED)
    return dict(note) if isinstance(note, dict) else None


LISTING_SETTLED_NS = 2_000_000_000
"""How long before a listing a steps folder must have last changed for its count of each
rank's files to be reused (as the run's reader reuses its listing: far above any file
system's timestamp granularity)."""


class _RankFiles:
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
    return getattr(replay.policy, "spec", None) or replay.run.policy_spec


WritersEnd = Literal["killed", "closed"]
"""How a run's Recorders all ended without marking it closed (`RunWatcher.writers_ended`)."""


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
    found them ended (`_writers_end`), the second one listing after that. A manifest changed
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
        self._manifest_key: FileKey | None = None
        self._closed_mark = False
        """The manifest's `recording_closed` mark, as last read."""
        self._alerted: Observed | None = None
        """The observed behaviour the last alerts were raised on (none are new until it changes)."""
        self._rank_files: _RankFiles | None = None
        self.replaced = 0
        """How often the run changed under the watcher (and was followed again from the start)."""
        self.policy_changes: list[PolicyChange] = []
        """Each change of the policy the run is replayed by, in its manifest, while watched."""
        self._amended = False
        """Whether the manifest last found changed is the same run's (its `run_id`)."""
        self._judged: tuple[str | None, int] | None = None
        """The policy the steps read were judged by at the last poll that read some, and the
        last of them; None once the run was replaced."""
        self.recording_stopped: dict[str, Any] | None = None
        """The manifest's `recording_stopped` ({step, rank, reason}: a Recorder's note that its
        recording stopped after a failed write or `note_stop`, training going on), as last
        read."""
        self.recording_stops: list[dict[str, Any]] = []
        """Every rank's `recording_stopped` note, by rank, as the last poll read them: the
        manifest's and each rank's own note file (`Run.recording_stops`)."""
        self.closed = False
        """Whether the manifest was marked `recording_closed` before the last poll listed the
        steps, and was the same after: that poll read every step the run will have
        (docs/run-format.md)."""
        self._ended_polls = 0
        """The polls in a row, up to the last, that found the run's Recorders ended before
        listing its steps and its manifest the same after."""
        self._writers_end: WritersEnd | None = None
        """How the last poll found them ended (`_writers_now`)."""
        self._held: set[int] = set()
        """The ranks whose lock a live Recorder held at a poll of this run."""
        self._holding: set[int] = set()
        """Those of `_held` whose lock a live Recorder held at the last poll."""
        self._closed_ranks: set[int] = set()
        """The ranks the manifest marks closed (`recording_closed_ranks`), as last read."""

    @property
    def writers_ended(self) -> WritersEnd | None:
        """How the run's Recorders all ended, as two polls in a row found them before they
        listed its steps (the first may have met a Recorder between creating its lock file
        and locking it): "killed" (a Recorder's process died), "closed"; None while one may
        still write. Once not None the last poll read every step the run will have."""
        return self._writers_end if self._ended_polls >= 2 else None

    @property
    def ending(self) -> bool:
        """Whether the last poll found the run's Recorders ended and no poll before it did: the
        next poll tells (`writers_ended`)."""
        return self._ended_polls == 1

    def _writers_now(self, run: Run) -> WritersEnd | None:
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
        self._held.update(self._holding)
        left = set(states.values())
        if left == {"released"}:
            return "killed"
        world_size = run.manifest.get("world_size")
        every = isinstance(world_size, int) and set(range(world_size)) <= self._held
        if every and left <= {"released"}:
            return "killed" if left else "closed"
        return None

    def _manifest_now(self) -> FileKey | None:
        """The key of the run directory's manifest as it is now; None without one (not yet,
        no more, or the path is no directory)."""
        try:
            return file_key((self.path / MANIFEST_NAME).stat())
        except OSError:
            return None

    def _open(self) -> OwnReplay | None:
        if self.replay is None:
            self._manifest_key = None  # a packed archive has none
            if run_to_come(self.path):
                self._manifest_key = self._manifest_now()
                if self._manifest_key is None:  # no manifest (yet, or no more)
                    return None
            self.replay = OwnReplay(open_run(self.path), self.config)
            self.recording_stopped = _stopped_note(self.replay.run.manifest)
            self._closed_ranks = set(closed_ranks(self.replay.run.manifest))
            # A packed archive holds every step it will ever have, marked or not.
            archive = self._manifest_key is None
            self._closed_mark = archive or self.replay.run.manifest.get(RECORDING_CLOSED) is True
        return self.replay

    def _replaced(self, replay: OwnReplay) -> bool:
        """The run read so far is gone: its manifest was removed, or rewritten as another
        run's (a change beyond `recording_stopped`, `recording_closed` and
        `recording_closed_ranks`, the notes a Recorder adds to its own run: a new `run_id`
        among them); or its manifest was amended beyond those notes under the same `run_id`
        (`_amended`): it is read again all the same."""
        self._amended = False
        if self._manifest_key is None:  # a packed archive: never written while it is read
            return False
        key = self._manifest_now()
        if key is None:  # gone, or the path is no directory now
            return True
        if key == self._manifest_key:
            return False
        self._manifest_key = key
        try:  # read as open_run reads it: a FIFO put there is not waited on
            now = manifest_now(self.path)
        except (InputError, ValueError):
            return True  # reopened, it says what is wrong with it

        def run_of(manifest: dict[str, Any]) -> dict[str, Any]:
            notes = (RECORDING_STOPPED, RECORDING_CLOSED, RECORDING_CLOSED_RANKS)
            return {k: v for k, v in manifest.items() if k not in notes}

        self.recording_stopped = _stopped_note(now)
        self._closed_ranks = set(closed_ranks(now))
        self._closed_mark = now.get(RECORDING_CLOSED) is True
        if run_of(now) == run_of(replay.run.manifest):
            return False
        run_id = replay.run.manifest.get(RUN_ID)
        self._amended = run_id is not None and now.get(RUN_ID) == run_id
        return True

    def _manifest_kept(self) -> bool:
        """Whether the manifest is still the one last read (a packed archive always is): a
        resume removes the `recording_closed` mark before any step file changes."""
        return self._manifest_key is None or self._manifest_now() == self._manifest_key

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
        same run amended (`_amended`) keeps its alerts raised and its ranks seen holding
        their locks, and is no replacement."""
        amended, self._amended = self._amended, False
        if self.replay is not None and self.replay.seen and not amended:
            self.replaced += 1
        if not amended:
            self._alerts, self._seen = [], set()
            self._held, self._judged = set(), None
        self.replay = None
        self._listed, self._unreadable = set(), set()
        self._rank_files = None
        self.recording_stopped = None
        self.recording_stops = []
        self.closed = self._closed_mark = False
        self._ended_polls, self._writers_end = 0, None
        self._holding, self._closed_ranks = set(), set()
        self._waiting = self._reading()
        self._alerted = None

    def poll(self) -> list[Alert]:
        """Replays the new steps; -> the alerts they raised. InputError for a run that cannot
        be read (a corrupt manifest, a step the own policy cannot read). A run replaced while
        the poll read it (its steps may be the new run's under the names the old run's had)
        is dropped and read again from its start, once; replaced again, the poll waits."""
        if self.replay is not None and self._replaced(self.replay):
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
        return self._raise(self._candidates(replay))

    def _judge_under(self, replay: OwnReplay) -> None:
        """Notes the policy the steps read are judged by now, and a change of it since the
        last poll (`policy_changes`): the same run, its manifest amended."""
        now = _policy_of(replay)
        if self._judged is not None and self._judged[0] != now:
            was, after = self._judged
            replayed = replay.policy is not None
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
        closed = self._closed_mark  # read before the listing: it lists every step
        ended = self._writers_now(replay.run)
        numbers = replay.run.listed_step_numbers
        if self._gone(replay, numbers):
            self._start_over()
            replay = self._open()
            if replay is None:
                return False
            closed = self._closed_mark
            numbers = replay.run.listed_step_numbers
        elif self._landed_late(replay, numbers):  # the same run: its alerts are kept
            self.replay = None
            replay = self._open()
            if replay is None:
                return False
            closed = self._closed_mark
            numbers = replay.run.listed_step_numbers
        self._listed = set(numbers)
        replay.extend(numbers)
        # the run's notes, and the manifest's note as last read (the run's reader read its
        # manifest once) for a rank the run has none of
        self.recording_stops = stops_by_rank(
            replay.run.listed_recording_stops, [self.recording_stopped]
        )
        holes = self._holes(replay, numbers)
        self._unreadable = holes - self._readable(replay, holes)
        kept = self._manifest_kept()
        if not kept and self._replaced(replay):
            return True
        self.closed = closed and kept  # the mark held through the listing
        self._writers_end = ended if kept else None
        self._ended_polls = self._ended_polls + 1 if self._writers_end else 0
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

    def _candidates(self, replay: OwnReplay) -> list[Alert]:
        series = replay.series()
        observed = replay.observed()
        found: list[Alert] = []
        spec = replay.policy.spec if replay.policy is not None else "the own policy"
        spikes = set(_flag_steps(series, "spike"))
        risk = _flag_steps(series, "collapsed")
        for step in risk:
            what = "an update norm spike" if step in spikes else "a non-finite update"
            found.append(Alert(kind="risk", step=step, message=f"{spec} replayed: {what}"))
        for step in sorted(set(observed.recorded_spike_steps) - set(risk)):  # once a step
            found.append(
                Alert(
                    kind="grad_norm_spike",
                    step=step,
                    message=f"recorded grad_norm > {self.config.spike_factor:g}x its recent median",
                )
            )
        for step in observed.nonfinite_steps:
            found.append(
                Alert(kind="nonfinite", step=step, message="the step recorded NaN or inf values")
            )
        for step in _stretch_starts(series, "drift"):
            found.append(
                Alert(kind="drift", step=step, message=f"{spec} replayed: bias (drift) begins")
            )
        warning = observed.collapse_warning
        if warning.first_step is not None:
            found.append(
                Alert(
                    kind="collapse_warning",
                    step=warning.first_step,
                    message=f"{warning.measured} {warning.drop:g}+ nats below its best",
                )
            )
        collapse = observed.first_reward_collapse
        if collapse is not None:
            found.append(
                Alert(
                    kind="reward_collapse",
                    step=collapse,
                    message=f"observed reward collapse (as of step {replay.seen[-1]})",
                )
            )
        return found

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
            self._rank_files = _RankFiles(world_size)
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
        gone = stopped_ranks(self.recording_stops, lasts) | self._closed_ranks
        return set(range(run_ranks(run))) - gone - (self._held - self._holding)

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
        replay = self.replay
        policy = None if replay is None else getattr(replay.policy, "spec", None)
        recorded = None if replay is None else replay.run.policy_spec
        seen = [] if replay is None else replay.seen
        ranks = self.rank_progress()
        if replay is None or not seen:
            return WatchState(
                run=str(self.path),
                waiting=self._waiting,
                steps=0,
                last_step=None,
                own_policy=policy,
                recorded_policy=recorded,
                replayed_steps=0,
                scalar_steps=0,
                recent=[],
                risk_steps=[],
                drift_steps=[],
                spike_steps=[],
                nonfinite_steps=[],
                nonfinite_training_steps=None,
                collapse_warning=None,
                first_reward_collapse=None,
                alerts=list(self._alerts),
                ranks=ranks,
                ranks_behind=_behind(ranks),
                packed_ranks=self.packed_ranks(),
            )
        series = replay.series()
        observed = replay.observed()
        unjudged = {}
        if series:
            geometry = [str(kind) for kind in series["geometry"]]
            unjudged.update(unjudged_rules(series, geometry, replay.config.window))
        for key, figure in RECORDED_RULES.items():
            why = observed.unjudged(figure)
            if why is not None:
                unjudged[key] = why
        shown = seen[-self.recent :] if self.recent > 0 else []
        index = {int(n): i for i, n in enumerate(series.get("step", []))}
        headers = {h.step: h for h in replay.headers(shown)}
        verl = _training_rewards(replay, shown) if is_verl_recording(replay.run) else {}
        rows = []
        for n in shown:
            i, header = index.get(n), headers.get(n)
            scalars = header.scalars if header is not None else {}
            training, reward = verl.get(n, (None, scalars.get("reward_mean")))
            rows.append(
                StepRow(
                    step=n,
                    training_step=training,
                    reward_mean=reward,
                    grad_norm=scalars.get("grad_norm"),
                    discard_frac=None if i is None else float(series["discard_frac"][i]),
                    risk=None if i is None else bool(series["collapsed"][i]),
                    drift=None if i is None else bool(series["drift"][i]),
                )
            )
        return WatchState(
            run=str(self.path),
            waiting=None,
            steps=len(seen),
            last_step=seen[-1],
            own_policy=policy,
            recorded_policy=recorded,
            replayed_steps=len(replay.steps) if series else 0,
            scalar_steps=len(seen) - len(replay.steps) - len(replay.rejected),
            recent=rows,
            risk_steps=_flag_steps(series, "collapsed"),
            drift_steps=_flag_steps(series, "drift"),
            spike_steps=list(observed.recorded_spike_steps),
            nonfinite_steps=list(observed.nonfinite_steps),
            nonfinite_training_steps=observed.nonfinite_training_steps,
            collapse_warning=observed.collapse_warning.first_step,
            first_reward_collapse=observed.first_reward_collapse,
            alerts=list(self._alerts),
            ranks=ranks,
            ranks_behind=_behind(ranks),
            packed_ranks=self.packed_ranks(),
            unjudged=unjudged,
        )
