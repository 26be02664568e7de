"""Following a run as it grows: the run's own policy replayed a few new steps at a time.

`OwnReplay` keeps what a replay of the run's own policy keeps (the per-step device metrics,
each step's geometry, the collapse warning's measurements) and adds new steps to it with the
replay's own streaming pass (`stream.stream_run` over just those steps, through
`StepSubset`); a step whose data the policy cannot be replayed with is rejected there, once
(`rejected`: never read again), and its recorded scalars count as a scalar step's do. Its
columns are derived from everything replayed so far (`columns.derive_series`), so step n's
spike, drift and risk flags equal those of a full replay of the steps up to n: each detector
only looks back. A scalar step (per-step scalars only: an optimizer-hook recording, an
imported log) has nothing to replay: it is read all the same, and its recorded scalars count in
the run's observed behaviour, as in a replay of the whole run. `watch` follows a live run with
it; `diff` replays the steps around the point two runs part.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stabledrl_cli._device import resolve_device
from stabledrl_cli.dump import Run, RunIntegrityWarning, Step, open_run
from stabledrl_cli.dump._schema import MANIFEST_NAME, RECORDING_CLOSED, RECORDING_STOPPED
from stabledrl_cli.dump._setup import manifest_now
from stabledrl_cli.dump._stfile import FileKey, file_key
from stabledrl_cli.dump._views import ReadSteps, StepSubset
from stabledrl_cli.errors import InputError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.columns import ColumnArray, derive_series, device_metrics
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import (
    nothing_to_replay,
    own_policy,
    replay_result,
    single_torch_thread,
)
from stabledrl_cli.replay.guards import GuardInput, GuardReplay
from stabledrl_cli.replay.observed import (
    NoiseFloor,
    Observed,
    OwnLikelihood,
    measurements_of,
    observe,
)
from stabledrl_cli.replay.recorded import RecordedRun, recorded_run
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.run_facts import no_steps_message, skipped_reasons
from stabledrl_cli.replay.stream import StreamedRun, stream_run
from stabledrl_cli.vocab import ALERT_KINDS, AlertKind, StepGeometryKind


class OwnReplay:
    """The run's own policy (its manifest's spec) replayed over the steps added so far.

    Without an own policy in the catalogue (a custom spec), `policy` is None: no policy is
    replayed, and the collapse warning's measurements are still gathered.
    """

    def __init__(self, run: Run, config: ReplayConfig | None = None) -> None:
        self.run = run
        self.config = config or ReplayConfig()
        self.policy: Policy | None = own_policy(run)
        self._device = resolve_device(self.config.device)
        self._steps: list[int] = []
        self._scalar: list[int] = []
        self._rejected: list[tuple[int, str]] = []
        self._tail: int | None = None
        self._open: int | None = None
        """The last step read, when it holds a policy batch: its optimizer step's half may
        still be added to it (its file rewritten: docs/recording.md), so its header is read
        again by the next call."""
        self._blocks: list[np.ndarray] = []
        self._geometry: list[StepGeometryKind] = []
        self._loss: list[np.ndarray] = []
        self._covered: list[np.ndarray] = []
        self._approximate = np.zeros(self._width, dtype=bool)
        self._likelihood = OwnLikelihood()
        self._floor = NoiseFloor()
        self._headers: dict[int, Step] = {}
        """The header of each step read, as last read."""
        self._guards = GuardReplay()
        """The grad-norm guards (`observe`'s default ones) over the steps read, but the last
        one (the tail, or the open step)."""
        self._observed: Observed | None = None
        self._series: dict[str, ColumnArray] | None = None
        """What `observed` and `series` derived from the steps read, until more are read."""

    @property
    def _width(self) -> int:
        return 0 if self.policy is None else 1

    @property
    def steps(self) -> list[int]:
        """Steps with a policy batch read so far (replayed, with an own policy), ascending."""
        return list(self._steps)

    @property
    def rejected(self) -> list[tuple[int, str]]:
        """(step, reason) of each step with a policy batch the policy could not be replayed
        with (`stream.StreamedRun.rejected`), ascending: skipped, never read again."""
        return list(self._rejected)

    @property
    def seen(self) -> list[int]:
        """Every step read so far, ascending: those with a policy batch (replayed or rejected)
        and the scalar steps (per-step scalars only, nothing to replay), whose recorded scalars
        count all the same."""
        tail = [] if self._tail is None else [self._tail]
        return sorted(self._steps + self._scalar + [n for n, _ in self._rejected] + tail)

    def extend(self, numbers: Sequence[int]) -> list[int]:
        """Reads the run's steps `numbers` that come after every step read so far and replays
        those that hold a policy batch; returns the steps read (a corrupt one is skipped, one
        the policy cannot be replayed with is rejected: `rejected`). The last step read, when
        it is a scalar step, is read again by the next call: a recording that adds a step's
        policy batch to its optimizer step rewrites the step's file with both
        (docs/recording.md); when it holds a policy batch, its header is read again (the
        optimizer step's half may be added to it the same way). InputError for a step that
        lacks a field the policy needs."""
        final = self._steps + self._scalar + [n for n, _ in self._rejected]
        last = max(final) if final else None
        new = sorted(n for n in set(numbers) if last is None or n > last)
        tail, self._tail = self._tail, None
        opened, self._open = self._open, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            if opened is not None:
                self._read_again(opened)
            if not new:
                self._open = opened
                return []
            headers = list(StepSubset(self.run, new).step_headers())
            if tail is not None and self._same_tail(tail, headers):
                self._tail = tail
                return [tail]
            self._headers.update((h.step, h) for h in headers)
            self._observed = self._series = None
            scalar = [h.step for h in headers if h.is_scalar]
            batches = [h for h in headers if not h.is_scalar]
            subset = StepSubset(self.run, [h.step for h in batches])
            rejected: tuple[tuple[int, str], ...] = ()
            if self.policy is None:
                floor, gathered = measurements_of(subset)
                read = [h.step for h in batches]
                self._geometry.extend("coef" for _ in read)
                self._loss.append(np.array([h.scalars.get("loss", np.nan) for h in batches]))
                self._covered.append(np.full(len(read), np.nan))
            else:
                with single_torch_thread():
                    streamed = stream_run(
                        subset,
                        [self.policy],
                        0,
                        self._device,
                        chunk_size=self.config.chunk_size,
                        memory_budget=self.config.memory_budget,
                        threads=self.config.threads,
                    )
                floor, gathered = streamed.noise_floor, streamed.likelihood
                read = [int(n) for n in streamed.step_numbers]
                rejected = streamed.rejected
                self._blocks.append(streamed.metrics)
                self._geometry.extend(streamed.geometry)
                self._loss.append(streamed.loss)
                self._covered.append(streamed.grad_norm_covered)
                self._approximate |= streamed.approximate
        self._steps.extend(read)
        self._rejected.extend(rejected)
        batch = read + [n for n, _ in rejected]
        if scalar and (not batch or scalar[-1] > max(batch)):
            self._tail = scalar.pop()
        self._scalar.extend(scalar)
        fed = sorted(batch + scalar + ([] if opened is None else [opened]))
        if self._tail is None and batch:
            self._open = fed.pop()  # the last step read, its batch: read again next time
        self._guards.extend(self._guard_inputs(fed))
        for step, inner, value in zip(
            gathered.steps, gathered.inner_step, gathered.values, strict=True
        ):
            self._likelihood.steps.append(step)
            self._likelihood.inner_step.append(inner)
            self._likelihood.values.append(value)
        self._floor.extend(floor)
        return sorted(batch + scalar + ([] if self._tail is None else [self._tail]))

    def _same_tail(self, tail: int, headers: list[Step]) -> bool:
        """Whether `headers` (read past the last final step) are the tail's alone, read again
        as it was: a scalar step with the same scalars (nothing new was read)."""
        if [h.step for h in headers] != [tail]:
            return False
        was = self._headers[tail]
        return headers[0].is_scalar and headers[0].scalars == was.scalars

    def _read_again(self, n: int) -> None:
        """Reads the header of step `n` (the open step) again: when its scalars changed (its
        optimizer step's half added), what is derived from them is derived again."""
        for header in StepSubset(self.run, [n]).step_headers():
            if header.scalars != self._headers[n].scalars:
                self._headers[n] = header
                self._observed = None

    def _guard_inputs(self, numbers: Sequence[int]) -> list[GuardInput]:
        """What the guards see of these steps read: those that recorded a grad_norm."""
        found = []
        for n in numbers:
            scalars = self._headers[n].scalars
            if "grad_norm" in scalars:
                found.append((n, scalars["grad_norm"], scalars.get("loss")))
        return found

    def headers(self, numbers: Sequence[int]) -> list[Step]:
        """The headers of these steps read so far, as they were read (no file read again)."""
        return list(ReadSteps(self.run, self._headers, numbers).step_headers())

    def stream(self) -> StreamedRun:
        """What the replay's streaming pass over the steps replayed so far would have kept."""
        empty = np.zeros((0, self._width, len(device_metrics())), dtype=np.float64)
        return StreamedRun(
            step_numbers=np.array(self._steps, dtype=np.int64),
            metrics=np.concatenate(self._blocks) if self._blocks else empty,
            geometry=tuple(self._geometry),
            approximate=self._approximate.copy(),
            loss=np.concatenate(self._loss) if self._loss else np.zeros(0),
            grad_norm_covered=np.concatenate(self._covered) if self._covered else np.zeros(0),
            noise_floor=self._floor,
            likelihood=self._likelihood,
            rejected=tuple(self._rejected),
        )

    def series(self) -> dict[str, ColumnArray]:
        """The own policy's reported columns over the steps replayed so far (name -> [S]);
        {} without an own policy."""
        if self.policy is None:
            return {}
        if self._series is None:
            stream = self.stream()
            self._series = derive_series(
                stream.metrics[:, 0, :], stream.step_numbers, stream.geometry, self.config
            )
        return self._series

    def observed(self) -> Observed:
        """The recorded run's own behaviour (reward collapse, recorded spikes, the collapse
        warning) over the steps read so far, scalar steps included: derived from their
        headers as read, once until more steps are read."""
        if self._observed is not None:
            return self._observed
        config = self.config
        self._observed = observe(
            ReadSteps(self.run, self._headers, self.seen),
            spike_factor=config.spike_factor,
            collapse_window=config.collapse_window,
            warning_window=config.warning_window,
            warning_drop=config.warning_drop,
            noise_floor=self._floor,
            likelihood=self._likelihood,
            guard_reports=self._guards.reports(
                self._guard_inputs([n for n in (self._open, self._tail) if n is not None])
            ),
        )
        return self._observed

    def recorded(self) -> RecordedRun:
        """The recorded series of the steps read so far, with their observed behaviour: what
        `check`'s run-level gates read."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            return recorded_run(ReadSteps(self.run, self._headers, self.seen), self.observed())

    def skipped(self) -> list[str]:
        """Why each skipped step was skipped: the reader's reasons, then the rejected steps'
        (as `ReplayResult.skipped`)."""
        return skipped_reasons(self.run) + [reason for _, reason in self._rejected]

    def unreplayable(self) -> InputError | None:
        """The error of a replay that replayed no step although some step with a policy batch
        was read (every one rejected, as `replay_run` refuses a run with no step it could
        use), else None."""
        if self._steps or not self._rejected:
            return None
        return InputError(no_steps_message(self.run, self.skipped()))

    def result(self) -> ReplayResult:
        """The replay of the own policy over the steps replayed so far, as `replay_run` gives
        it for those steps (what `check`'s gates read). InputError before any step with a
        policy batch (`NothingToReplay` after scalar steps only) and when every step with one
        was rejected."""
        refused = self.unreplayable()
        if refused is not None:
            raise refused
        if not self._steps:
            if self.seen:
                raise nothing_to_replay(self.run, len(self.seen))
            raise InputError(no_steps_message(self.run, skipped_reasons(self.run)))
        policies = [self.policy] if self.policy is not None else []
        return replay_result(
            self.run,
            policies,
            0 if policies else None,
            self.stream(),
            self.observed(),
            self.skipped(),
            self.config,
        )


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
    collapse_warning: int | None
    """The collapse warning's first step."""
    first_reward_collapse: int | None
    alerts: list[Alert]
    """Every alert so far, in the order seen."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _flag_steps(series: dict[str, ColumnArray], name: str) -> list[int]:
    if not series:
        return []
    flags = np.asarray(series[name], dtype=bool)
    return [int(n) for n in np.asarray(series["step"])[flags]]


def _stopped_note(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's `recording_stopped` note, None without one."""
    note = manifest.get(RECORDING_STOPPED)
    return dict(note) if isinstance(note, dict) else None


class RunWatcher:
    """Follows a run as it is written: each `poll` replays the steps that landed since the
    last one (a step file still under its temporary name is not listed yet) and returns the
    new alerts. A path with no manifest yet is waited for. A run changed under the watcher
    (its manifest removed, or rewritten as another run's: `record --force` over it, or a
    resume that writes steps again, each with a new `run_id`; or steps it read removed) is
    dropped with all that was read of it, and the path followed again from the start
    (`replaced` counts how often). A step read is not read again (but the last one, which a
    recording may still rewrite: a Recorder rewrites no other under the same `run_id`,
    docs/run-format.md; a step new to the listing below the last one read, landed out of
    order, or one there whose file reads now and did not at the last poll, has the run read
    again, its alerts kept), and what is derived from the steps read is
    derived again only when more were read, or the last one changed. `closed` says when a
    poll read every step the run will have (its manifest marked `recording_closed`, or a
    packed archive)."""

    def __init__(
        self, path: str | os.PathLike[str], config: ReplayConfig | None = None, *, recent: int = 10
    ) -> None:
        self.path = Path(path)
        self.config = config or ReplayConfig()
        self.recent = recent
        self.replay: OwnReplay | None = None
        self._waiting: str | None = f"waiting for {self.path / 'manifest.json'}"
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
        self.replaced = 0
        """How often the run changed under the watcher (and was followed again from the start)."""
        self.recording_stopped: dict[str, Any] | None = None
        """The manifest's `recording_stopped` ({step, rank, reason}: a Recorder's note that its
        recording stopped after a failed write, training going on), as last read."""
        self.closed = False
        """Whether the manifest was marked `recording_closed` before the last poll listed the
        steps, and was the same after: that poll read every step the run will have
        (docs/run-format.md)."""

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
            if not self.path.is_file():
                self._manifest_key = self._manifest_now()
                if self._manifest_key is None:  # no manifest (yet, or no more)
                    return None
            self.replay = OwnReplay(open_run(self.path), self.config)
            self.recording_stopped = _stopped_note(self.replay.run.manifest)
            # A packed archive holds every step it will ever have, marked or not.
            archive = self._manifest_key is None
            self._closed_mark = archive or self.replay.run.manifest.get(RECORDING_CLOSED) is True
        return self.replay

    def _replaced(self, replay: OwnReplay) -> bool:
        """The run read so far is gone: its manifest was removed, or rewritten as another
        run's (a change beyond `recording_stopped` and `recording_closed`, the notes a Recorder
        adds to its own run: a new `run_id` among them)."""
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
            notes = (RECORDING_STOPPED, RECORDING_CLOSED)
            return {k: v for k, v in manifest.items() if k not in notes}

        self.recording_stopped = _stopped_note(now)
        self._closed_mark = now.get(RECORDING_CLOSED) is True
        return run_of(now) != run_of(replay.run.manifest)

    def _manifest_kept(self) -> bool:
        """Whether the manifest is still the one last read (a packed archive always is): a
        resume removes the `recording_closed` mark before any step file changes."""
        return self._manifest_key is None or self._manifest_now() == self._manifest_key

    def _start_over(self) -> None:
        """Drops all that was read of the run: the path is followed again from its start. A
        replacement counts once: a recording over the run removes its step files, then writes
        its manifest, and a watcher between the two has read nothing since the first."""
        if self.replay is not None and self.replay.seen:
            self.replaced += 1
        self.replay = None
        self._listed, self._unreadable = set(), set()
        self.recording_stopped = None
        self.closed = self._closed_mark = False
        self._waiting = f"waiting for {self.path / MANIFEST_NAME}"
        self._alerts, self._seen = [], set()
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
            return []
        if not replay.seen:
            self._waiting = f"waiting for the first step of {self.path}"
            return []
        self._waiting = None
        observed = replay.observed()
        if observed is self._alerted:  # nothing new was read
            return []
        self._alerted = observed
        return self._raise(self._candidates(replay))

    def _read(self) -> bool:
        """Opens the run if need be and reads the steps that landed; -> whether the run was
        replaced while it read them (a Recorder writes a new manifest before the new run's
        steps: one seen after the read means the read may hold them)."""
        replay = self._open()
        if replay is None:
            return False
        closed = self._closed_mark  # read before the listing: it lists every step
        numbers = replay.run.listed_step_numbers
        if not set(replay.seen) <= set(numbers):  # steps it read are gone
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
        holes = self._holes(replay, numbers)
        self._unreadable = holes - self._readable(replay, holes)
        kept = self._manifest_kept()
        if not kept and self._replaced(replay):
            return True
        self.closed = closed and kept  # the mark held through the listing
        return False

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
        drift = _flag_steps(series, "drift")
        for step in drift:
            if step - 1 not in drift:
                found.append(
                    Alert(kind="drift", step=step, message=f"{spec} replayed: bias (drift) begins")
                )
        warning = observed.collapse_warning.first_step
        if warning is not None:
            found.append(
                Alert(
                    kind="collapse_warning",
                    step=warning,
                    message=f"own-sample likelihood {observed.collapse_warning.drop:g}+ nats "
                    "below its best",
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
            key = (alert.kind, alert.step)
            if alert.kind in ("collapse_warning", "reward_collapse"):
                key = (alert.kind, -1)  # once per run
            if key not in self._seen:
                self._seen.add(key)
                new.append(alert)
        self._alerts.extend(new)
        return new

    def state(self) -> WatchState:
        """What is known now."""
        replay = self.replay
        policy = None if replay is None else getattr(replay.policy, "spec", None)
        recorded = None if replay is None else replay.run.policy_spec
        seen = [] if replay is None else replay.seen
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
                collapse_warning=None,
                first_reward_collapse=None,
                alerts=list(self._alerts),
            )
        series = replay.series()
        observed = replay.observed()
        shown = seen[-self.recent :] if self.recent > 0 else []
        index = {int(n): i for i, n in enumerate(series.get("step", []))}
        headers = {h.step: h for h in replay.headers(shown)}
        rows = []
        for n in shown:
            i, header = index.get(n), headers.get(n)
            scalars = header.scalars if header is not None else {}
            rows.append(
                StepRow(
                    step=n,
                    reward_mean=scalars.get("reward_mean"),
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
            collapse_warning=observed.collapse_warning.first_step,
            first_reward_collapse=observed.first_reward_collapse,
            alerts=list(self._alerts),
        )
