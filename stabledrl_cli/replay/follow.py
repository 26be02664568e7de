"""Following a run as it grows: the run's own policy replayed a few new steps at a time.

`OwnReplay` keeps what a replay of the run's own policy keeps (the per-step device metrics,
each step's geometry, the collapse warning's measurements) and adds new steps to it with the
replay's own streaming pass (`stream.stream_run` over just those steps, through
`StepSubset`). Its columns are derived from everything replayed so far (`columns.derive_series`),
so step n's spike, drift and risk flags equal those of a full replay of the steps up to n: each
detector only looks back. `watch` follows a live run with it; `diff` replays the steps around
the point two runs part.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from stabledrl_cli._device import resolve_device
from stabledrl_cli.dump import IntegrityReport, Run, RunIntegrityWarning, Step
from stabledrl_cli.dump._integrity import StepReadError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.columns import ColumnArray, derive_series, device_metrics
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.engine import own_policy
from stabledrl_cli.replay.observed import (
    NoiseFloor,
    Observed,
    OwnLikelihood,
    measurements_of,
    observe,
)
from stabledrl_cli.replay.stream import stream_run
from stabledrl_cli.vocab import StepGeometryKind


class StepSubset(Run):
    """Some of a run's steps behind the Run API: a replay of part of a run reads only these
    (a step among them that turns out unreadable is skipped, as in the whole run)."""

    def __init__(self, run: Run, numbers: Sequence[int]) -> None:
        self.path = run.path
        self._run = run
        self._numbers = sorted(set(numbers))

    @property
    def manifest(self) -> dict[str, Any]:
        return self._run.manifest

    @property
    def step_numbers(self) -> list[int]:
        return list(self._numbers)

    @property
    def integrity(self) -> IntegrityReport:
        return self._run.integrity

    def _has_step(self, n: int) -> bool:
        return n in self._numbers and self._run._has_step(n)

    def _try_step(self, n: int, *, deep: bool) -> Step | StepReadError:
        return self._run._try_step(n, deep=deep)


class OwnReplay:
    """The run's own policy (its manifest's spec) replayed over the steps added so far.

    Without an own policy in the catalogue (a custom spec), `policy` is None and the columns
    are empty; the collapse warning's measurements are still gathered.
    """

    def __init__(self, run: Run, config: ReplayConfig | None = None) -> None:
        self.run = run
        self.config = config or ReplayConfig()
        self.policy: Policy | None = own_policy(run)
        self._device = resolve_device(self.config.device)
        self._steps: list[int] = []
        self._blocks: list[np.ndarray] = []
        self._geometry: list[StepGeometryKind] = []
        self.likelihood = OwnLikelihood()
        self.noise_floor = NoiseFloor()

    @property
    def steps(self) -> list[int]:
        """Steps replayed so far, ascending."""
        return list(self._steps)

    def extend(self, numbers: Sequence[int]) -> list[int]:
        """Replays the run's steps `numbers` (each after every step replayed so far); returns
        those read (a corrupt one is skipped). InputError for a step a policy cannot read."""
        last = self._steps[-1] if self._steps else None
        new = sorted(n for n in set(numbers) if last is None or n > last)
        if not new:
            return []
        subset = StepSubset(self.run, new)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RunIntegrityWarning)
            if self.policy is None:
                floor, gathered = measurements_of(subset)
                read = [h.step for h in subset.step_headers()]
            else:
                streamed = stream_run(
                    subset, [self.policy], 0, self.config.chunk_size, self._device
                )
                floor, gathered = streamed.noise_floor, streamed.likelihood
                read = [int(n) for n in streamed.step_numbers]
                self._blocks.append(streamed.metrics)
                self._geometry.extend(streamed.geometry)
        self._steps.extend(read)
        for step, inner, value in zip(
            gathered.steps, gathered.inner_step, gathered.values, strict=True
        ):
            self.likelihood.steps.append(step)
            self.likelihood.inner_step.append(inner)
            self.likelihood.values.append(value)
        self.noise_floor.merge(floor)
        return read

    def series(self) -> dict[str, ColumnArray]:
        """The own policy's reported columns over the steps replayed so far (name -> [S]);
        {} without an own policy."""
        if self.policy is None:
            return {}
        metrics = (
            np.concatenate(self._blocks)
            if self._blocks
            else np.zeros((0, 1, len(device_metrics())), dtype=np.float64)
        )
        steps = np.array(self._steps, dtype=np.int64)
        return derive_series(metrics[:, 0, :], steps, tuple(self._geometry), self.config)

    def observed(self) -> Observed:
        """The recorded run's own behaviour (reward collapse, recorded spikes, the collapse
        warning) over its steps as listed now, with the measurements gathered so far."""
        config = self.config
        return observe(
            self.run,
            spike_factor=config.spike_factor,
            collapse_window=config.collapse_window,
            warning_window=config.warning_window,
            warning_drop=config.warning_drop,
            noise_floor=self.noise_floor,
            likelihood=self.likelihood,
        )
