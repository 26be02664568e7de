"""A replay's streaming pass in shards: any process computes a shard's per-step rows
(`stream_shard`), and the shards' rows join back into the run's (`merge_streams`).

A shard is a contiguous run of step numbers from one listing of the run, with the run's source
(a path or URL every worker can open), the policies and the settings the rows depend on. A
step's row depends on the step alone, never on the chunk it is read in nor on the threads
that compute it (`stream`); a shard still starts on a multiple of
`--chunk-size` when one is given (`plan_shards`). Workers compute per-step rows only, and
send with them what their reader checked of the run's files; the driver adopts those checks,
so it reads no step file again, and derives every run-level figure (summaries, detectors, the
collapse warning, the steps skipped) from the joined rows with the local replay's own code: a
sharded replay's result is a local replay's, byte for byte. A sweep of many policy settings
shards the same way: a task carries any list of policies.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from stabledrl_cli._device import resolve_device
from stabledrl_cli._version import __version__
from stabledrl_cli.dump import Run, open_run
from stabledrl_cli.dump._integrity import integrity_warnings_ignored
from stabledrl_cli.errors import StabledrlError, UsageError
from stabledrl_cli.policies import Policy
from stabledrl_cli.replay.config import ReplayConfig
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood
from stabledrl_cli.replay.rows import RowBuffer
from stabledrl_cli.replay.stream import StreamedRun, expected_rows, stream_run
from stabledrl_cli.vocab import StepGeometryKind


@dataclass(frozen=True, kw_only=True)
class ShardTask:
    """Everything a worker needs to compute one shard's per-step rows."""

    source: str
    """The run's `Run.source` (a path or URL the worker opens)."""
    location: str
    """How the driver names the run (`Run.location`, as given: a relative path, say): the
    worker's error messages name the run and its files so, as a local replay's do."""
    verify: bool
    """Check each step's data checksum (as the driver's run does)."""
    policies: tuple[Policy, ...]
    own_index: int | None
    steps: tuple[int, ...]
    """Step numbers, ascending, from the driver's listing."""
    chunk_size: int | None
    memory_budget: int
    lean: bool
    device: str
    threads: int
    """Steps the worker computes side by side (`ReplayConfig.threads`), each on one thread."""
    version: str = __version__
    """The driver's stabledrl version: a worker running another refuses the shard."""


def plan_shards(
    numbers: Sequence[int], shards: int, chunk_size: int | None = None
) -> list[tuple[int, ...]]:
    """`numbers` (a run's steps, ascending) cut into at most `shards` contiguous shards, as
    even as can be, each of whole chunks of `chunk_size` steps (counted from the first) when
    given."""
    chunk_size = chunk_size or 1
    chunks = [tuple(numbers[i : i + chunk_size]) for i in range(0, len(numbers), chunk_size)]
    count = min(max(shards, 1), len(chunks))
    bounds = [i * len(chunks) // count for i in range(count + 1)] if count else [0]
    return [
        tuple(n for chunk in chunks[start:stop] for n in chunk)
        for start, stop in itertools.pairwise(bounds)
    ]


SHARDS_PER_WORKER = 4
"""Shards per worker: enough to even out uneven steps, few enough that a shard's start-up (opening
the run, importing torch once per worker) stays small."""


def shard_tasks(
    run: Run,
    policies: Sequence[Policy],
    own_index: int | None,
    config: ReplayConfig,
    workers: int,
) -> tuple[list[ShardTask], list[int]]:
    """The run's steps cut for `workers` workers (`plan_shards`, SHARDS_PER_WORKER each): ->
    a task a shard, and each shard's step count."""
    whole = run.listed_whole_step_numbers  # a step some rank lacks is never read
    shards = plan_shards(whole, workers * SHARDS_PER_WORKER, config.chunk_size)
    tasks = [
        ShardTask(
            source=run.source,
            location=run.location,
            verify=run.verify,
            policies=tuple(policies),
            own_index=own_index,
            steps=steps,
            chunk_size=config.chunk_size,
            memory_budget=config.memory_budget,
            lean=config.lean,
            device=str(config.device),
            threads=config.threads,
        )
        for steps in shards
    ]
    return tasks, [len(steps) for steps in shards]


WORKER_ADVICE = "replay with fewer --workers or a lower --memory-budget"
"""What to try when a worker died computing a shard (often out of memory)."""


def shard_named(task: ShardTask, index: int, count: int) -> str:
    """Shard `index` of `count` in an error line: `steps 80-99 (shard 5 of 8)`."""
    return f"steps {task.steps[0]}-{task.steps[-1]} (shard {index + 1} of {count})"


def stream_shard(task: ShardTask) -> StreamedRun:
    """One shard's per-step rows, computed where this runs (a Ray worker); corrupt steps are
    skipped, as a local replay skips them."""
    if task.version != __version__:
        raise UsageError(
            f"a worker runs stabledrl {__version__}, the driver {task.version}: install the "
            "same version on every node"
        )
    torch.set_num_threads(1)
    run = open_run(task.source, verify=task.verify)
    with integrity_warnings_ignored():
        try:
            streamed = stream_run(
                run,
                list(task.policies),
                task.own_index,
                resolve_device(task.device),
                chunk_size=task.chunk_size,
                memory_budget=task.memory_budget,
                lean=task.lean,
                steps=run.steps_of(task.steps),
                step_count=len(task.steps),
                threads=task.threads,
            )
        except StabledrlError as exc:
            raise named_as(exc, run.location, task.location) from None
    checks = run.checks()
    return replace(streamed, reader_checks=() if checks is None else (checks,))


def named_as(exc: StabledrlError, here: str, there: str) -> StabledrlError:
    """`exc`, its message naming the run (or a file of it) by `there` where it named it by
    `here` (the worker's location of the same run) at its start."""
    text = str(exc)
    if here != there and text.startswith(here) and text[len(here) : len(here) + 1] in ":/":
        exc.args = (there + text[len(here) :], *exc.args[1:])
    return exc


def merge_streams(run: Run, parts: list[StreamedRun], policies: int) -> StreamedRun:
    """The run's rows from its shards' (in step order): what `stream_run` gives over all of
    them. Each part's rows are written in place into one `RowBuffer` (room for the run's
    `expected_rows` at the start) and the part is taken out of `parts`, which ends empty:
    the driver holds the metrics once, plus the parts not yet written. `run`, the driver's,
    adopts what the shards' readers checked (`Run.adopt_checks`): its integrity report, the
    steps a replay reports skipped, then reads no step file a worker read, as a local pass
    leaves its run."""
    metrics = RowBuffer(expected_rows(run, None, None), policies)
    numbers: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    loss: list[np.ndarray] = [np.zeros(0)]
    covered: list[np.ndarray] = [np.zeros(0)]
    geometry: list[StepGeometryKind] = []
    approximate = np.zeros(policies, dtype=bool)
    floor, likelihood = NoiseFloor(), OwnLikelihood()
    scalar_steps = widest = 0
    rejected: list[tuple[int, str]] = []
    parts.reverse()
    while parts:
        part = parts.pop()
        for checks in part.reader_checks:
            run.adopt_checks(checks)
        metrics.append(part.metrics)
        numbers.append(part.step_numbers)
        loss.append(part.loss)
        covered.append(part.grad_norm_covered)
        geometry.extend(part.geometry)
        approximate |= part.approximate
        floor.extend(part.noise_floor)
        likelihood.extend(part.likelihood)
        scalar_steps += part.scalar_steps
        rejected.extend(part.rejected)
        widest = max(widest, part.widest_chunk)
    return StreamedRun(
        step_numbers=np.concatenate(numbers),
        metrics=metrics.rows,
        geometry=tuple(geometry),
        approximate=approximate,
        loss=np.concatenate(loss),
        grad_norm_covered=np.concatenate(covered),
        noise_floor=floor,
        likelihood=likelihood,
        scalar_steps=scalar_steps,
        rejected=tuple(rejected),
        widest_chunk=widest,
    )
