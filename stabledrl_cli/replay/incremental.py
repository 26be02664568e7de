"""The run's own policy replayed a few new steps at a time, as a run grows.

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
it (`watch.follow.RunWatcher`); `diff` replays the steps around the point two runs part.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from stabledrl_cli.dump import Run, Step
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.dump._views import ReadSteps, StepSubset
from stabledrl_cli.errors import InputError
from stabledrl_cli.policies import get_policy
from stabledrl_cli.replay.columns import derive_series
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.derivations import ColumnArray
from stabledrl_cli.replay.guards import GuardInput, GuardReplay
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood, measurements_of
from stabledrl_cli.replay.observed import Observed, observe, run_guard_spec
from stabledrl_cli.replay.recorded import RecordedRun, policy_loss, recorded_run
from stabledrl_cli.replay.result import ReplayResult
from stabledrl_cli.replay.rows import RowBuffer
from stabledrl_cli.replay.run_facts import (
    no_steps_message,
    nothing_to_replay,
    own_spec,
    skipped_reasons,
)
from stabledrl_cli.vocab import StepGeometryKind

if TYPE_CHECKING:
    from stabledrl_cli.policies import Policy
    from stabledrl_cli.replay.stream import StreamedRun


class OwnReplay:
    """The run's own policy (its manifest's spec) replayed over the steps added so far.

    Without an own policy in the catalogue (a custom spec), `spec` and `policy` are None: no
    policy is replayed, and the collapse warning's measurements are still gathered. The policy
    (torch) is built when a step with a policy batch is first replayed: a scalar run's watch
    never loads torch.
    """

    def __init__(self, run: Run, config: ReplayConfig | None = None) -> None:
        self.run = run
        self.config = config or ReplayConfig()
        self.spec: str | None = own_spec(run)
        """The canonical spec of the run's own policy (`policy`'s), None without one."""
        self._steps: list[int] = []
        self._scalar: list[int] = []
        self._rejected: list[tuple[int, str]] = []
        self._tail: int | None = None
        self._open: int | None = None
        """The last step read, when it holds a policy batch: its optimizer step's half may
        still be added to it (its file rewritten: docs/recording.md), so its header is read
        again by the next call."""
        self._metrics = RowBuffer(0, self._width)
        """The replayed steps' rows, one a step of `_steps`."""
        self._geometry: list[StepGeometryKind] = []
        self._loss: list[np.ndarray] = []
        self._covered: list[np.ndarray] = []
        self._approximate = np.zeros(self._width, dtype=bool)
        self._likelihood = OwnLikelihood()
        self._floor = NoiseFloor()
        self._headers: dict[int, Step] = {}
        """The header of each step read, as last read."""
        self._guards = GuardReplay(self.config.guards, run_guard_spec(run))
        """The config's grad-norm guards over the steps read, but the last one (the tail, or
        the open step)."""
        self._observed: Observed | None = None
        self._series: dict[str, ColumnArray] | None = None
        """What `observed` and `series` derived from the steps read, until more are read."""

    @cached_property
    def policy(self) -> Policy | None:
        """The run's own policy (`spec`), built on first use (torch)."""
        return None if self.spec is None else get_policy(self.spec)

    @property
    def _width(self) -> int:
        return 0 if self.spec is None else 1

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
        with integrity_warnings_ignored():
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
            if self.spec is None or not batches:  # nothing to replay: no torch loaded
                floor, gathered = measurements_of(subset)
                read = [h.step for h in batches]
                self._geometry.extend("coef" for _ in read)
                self._loss.append(np.array([policy_loss(h.scalars) for h in batches]))
                self._covered.append(np.full(len(read), np.nan))
            else:
                streamed = self._stream(subset)
                floor, gathered = streamed.noise_floor, streamed.likelihood
                read = [int(n) for n in streamed.step_numbers]
                rejected = streamed.rejected
                self._metrics.append(streamed.metrics)
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
        self._likelihood.extend(gathered)
        self._floor.extend(floor)
        return sorted(batch + scalar + ([] if self._tail is None else [self._tail]))

    def _stream(self, subset: StepSubset) -> StreamedRun:
        """The replay's streaming pass of the own policy over `subset` (torch, loaded now)."""
        from stabledrl_cli._device import resolve_device
        from stabledrl_cli.replay.engines import single_torch_thread
        from stabledrl_cli.replay.stream import stream_run

        assert self.policy is not None
        with single_torch_thread():
            return stream_run(
                subset,
                [self.policy],
                0,
                resolve_device(self.config.device),
                chunk_size=self.config.chunk_size,
                memory_budget=self.config.memory_budget,
                threads=self.config.threads,
            )

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
                found.append(
                    (n, scalars["grad_norm"], scalars.get("loss"), scalars.get("guard_loss"))
                )
        return found

    def headers(self, numbers: Sequence[int]) -> list[Step]:
        """The headers of these steps read so far, as they were read (no file read again)."""
        return list(ReadSteps(self.run, self._headers, numbers).step_headers())

    def stream(self) -> StreamedRun:
        """What the replay's streaming pass over the steps replayed so far would have kept."""
        from stabledrl_cli.replay.stream import StreamedRun

        return StreamedRun(
            step_numbers=np.array(self._steps, dtype=np.int64),
            metrics=self._metrics.rows,
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
        if self.spec is None:
            return {}
        if self._series is None:
            steps = np.array(self._steps, dtype=np.int64)
            rows = self._metrics.rows[:, 0, :]
            self._series = derive_series(rows, steps, tuple(self._geometry), self.config)
        return self._series

    def observed(self) -> Observed:
        """The recorded run's own behaviour (reward collapse, recorded spikes, the collapse
        warning) over the steps read so far, scalar steps included: derived from their
        headers as read, once until more steps are read."""
        if self._observed is not None:
            return self._observed
        self._observed = observe(
            ReadSteps(self.run, self._headers, self.seen),
            self.config,
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
        with integrity_warnings_ignored():
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
        was rejected, naming the skipped step files as `replay_run` does."""
        refused = self.unreplayable()
        if refused is not None:
            raise refused
        if not self._steps:
            if self.seen:
                raise nothing_to_replay(self.run, len(self.seen), self.skipped())
            raise InputError(no_steps_message(self.run, self.skipped()))
        from stabledrl_cli.replay.engine import replay_result

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
