"""The streaming pass of a replay: read steps, move them to the device, evaluate every policy.

Per step, `prepare` runs once and every policy is evaluated on the prepared batch
(`metrics.step_metrics`). Steps are read in chunks of at most half `memory_budget` bytes of
arrays and of the rows they will make (a row of metrics a policy; at most `chunk_size` steps
when given), the next chunk on a thread of its own while the current one is computed
(`read_ahead`); each chunk's arrays go to the device in one transfer per field and its per-step
results come back in one transfer, written in place into the one buffer of every step's rows,
after which the chunk's arrays and rows are dropped: memory holds two chunks (the budget) plus
the [steps, policies, metrics] rows once, whatever the run's length, and a step's per-entry
arrays of every policy; a lean pass (`tune`) evaluates a step's policies a group at a time
instead, each group with a copy of the prepared batch of its own (what its policies memoize
goes with it), holding about half the budget of their arrays a computing thread (as
`group_size` estimates them; at least one policy), whatever their number. Each step is computed
on its own, so results do not depend on the chunk size; with `threads` > 1 a chunk's steps are
computed that many at a time, each on one thread of its own (`computing_threads`), so they do
not depend on the thread count either. The same pass pools the noise floor of the steps
recorded with inner_step 0 and the collapse warning's measurements (the median own-sample
log-likelihood), both on the host before the transfer, so the observed-run analysis never
re-reads them.

A step whose data a replay cannot use (mismatched array lengths, a `seq_id` out of range,
float16 geometry without its scale: an InputError while its arrays are read or prepared) is
rejected as the reader skips an unreadable one: it yields no row and adds nothing to the noise
floor or the collapse warning's measurements (they are taken on the host but kept only once
the step is prepared), and `StreamedRun.rejected` names it with the reason; the rest of the
run replays. A step that lacks a field a requested policy needs is not rejected but refused
(`step_data.check_step`, InputError): what a replay can use then depends on the policies asked
for, a problem of the request, and skipping the step would drop it for every other policy too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch

from stabledrl_cli._memory import heap_kept, release_freed_memory
from stabledrl_cli.dump import Run, Step
from stabledrl_cli.errors import InputError, UsageError
from stabledrl_cli.policies import Policy, PreparedBatch
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.config import DEFAULT_MEMORY_BUDGET
from stabledrl_cli.replay.measurements import NoiseFloor, OwnLikelihood
from stabledrl_cli.replay.metrics import step_metrics, varies_within_sequence
from stabledrl_cli.replay.read_ahead import read_ahead
from stabledrl_cli.replay.recorded import policy_loss
from stabledrl_cli.replay.rows import RowBuffer
from stabledrl_cli.replay.run_facts import run_ranks
from stabledrl_cli.replay.step_data import (
    Arrays,
    Measures,
    array_bytes,
    check_step,
    host_measures,
    prepared,
    read_arrays,
    rejection,
    run_per_rank,
    run_unit,
    step_geometry,
    to_device,
    usable,
)
from stabledrl_cli.replay.step_geometry import StepGeometry
from stabledrl_cli.replay.top_sequences import TopSequence, top_sequences
from stabledrl_cli.vocab import StepGeometryKind, Unit

_T = TypeVar("_T")
_Item = TypeVar("_Item")

RELEASE_AFTER = 8
"""Free heap memory, in memory budgets, past which the pass returns it to the system. It looks
once a budget's worth of steps has been computed (not at every chunk end: a chunk is half a
budget), since a step reuses what the last one freed and a trim makes it fault those pages in
again. `replay_speed.py`'s catalogue on 200x256x1024 took 12.1 s with a look at four budgets
every half-budget chunk, 9.5 s with a look at four every budget, 7.2 s with a look at eight
every budget; its peak stayed at 376-383 MB. Each computing thread holds a step's
intermediates of its own, and steps computed side by side leave more holes: eight budgets a
thread (on 2 threads, 2.0M page faults with eight budgets, 52K with sixteen)."""


@dataclass(frozen=True, kw_only=True)
class StreamedRun:
    """What the streaming pass keeps: per-step scalars only."""

    step_numbers: np.ndarray
    """[S] int64."""
    metrics: np.ndarray
    """[S, P, M] float64: per step and policy, the device metrics (`columns.device_metrics()`)."""
    geometry: tuple[StepGeometryKind, ...]
    """[S] how each step's norms were measured."""
    approximate: np.ndarray
    """[P] bool: some step's norm summed varying token coefficients into one sequence unit."""
    loss: np.ndarray
    """[S] float64: the recorded loss less its part outside the policy (`policy_loss`; NaN
    where not recorded)."""
    grad_norm_covered: np.ndarray
    """[S] float64: the recorded norm over the covered parameters (NaN where not recorded)."""
    noise_floor: NoiseFloor
    """Log r moments pooled over the steps recorded with inner_step 0."""
    likelihood: OwnLikelihood
    """The collapse warning's measurements (steps with inner_step 0 or none recorded)."""
    scalar_steps: int = 0
    """Steps without a policy batch (format 1.2): skipped, nothing to replay on them."""
    rejected: tuple[tuple[int, str], ...] = ()
    """(step, reason) of each step whose data the pass could not use (module docstring), in
    step order: skipped, as the reader skips an unreadable step; the reason starts with
    "step N: "."""
    widest_chunk: int = 0
    """The most steps of a chunk that the memory budget or the chunk size closed (a sharded
    pass: of any shard's), 0 when every chunk held the rest of the steps: a replay's threads
    compute a chunk's steps side by side, so below `threads`, some of them never worked."""
    reader_checks: tuple[object, ...] = ()
    """What the readers of a sharded pass checked of the run (`Run.checks`, one a shard), for
    the driver's run to adopt; a local pass leaves its checks in the run it read."""


def step_row_bytes(policies: int) -> int:
    """Bytes of a step's row of device metrics over `policies` policies (float64)."""
    return policies * len(columns.device_metrics()) * np.dtype(np.float64).itemsize


def _whole_steps(run: Run, damaged: list[int]) -> Iterator[Step]:
    """The readable steps of the run's listing every rank wrote (`Run.steps`' steps), the
    number of each that cannot be read appended to `damaged` as it is passed."""
    for n in run.listed_whole_step_numbers:
        read = list(run.steps_of((n,)))  # [] when damaged
        if not read:
            damaged.append(n)
        yield from read


def _read_chunks(
    run: Run,
    policies: Sequence[Policy],
    chunk_size: int | None,
    memory_budget: int,
    scalar_steps: list[int],
    rejected: list[tuple[int, str]],
    shard: Iterable[Step] | None = None,
    damaged: list[int] | None = None,
) -> Iterator[tuple[list[Step], list[Arrays], list[Measures], int]]:
    """The run's readable steps (or `shard`'s) that hold a policy batch, their arrays (CPU),
    their measures and the bytes of the arrays and of the rows they make (one row of device
    metrics a policy), a chunk at a time: a chunk closes at the step that brings those bytes to
    `memory_budget`, or its steps to `chunk_size`. Runs on the read-ahead thread. Takes each
    step's collapse-warning measurement and noise-floor moments on the way (on the host, before
    any transfer; pooled by the caller once the step is prepared); appends the number of each
    scalar step (no batch) to `scalar_steps`, each step whose arrays it cannot read to
    `rejected` (`rejection`), and the run's each damaged one to `damaged` (`_whole_steps`,
    skipped); InputError for a step that lacks a field a policy needs
    (`step_data.check_step`)."""
    where, unit, per_rank = run.location, run_unit(run), run_per_rank(run)
    row_bytes = step_row_bytes(len(policies))
    steps: list[Step] = []
    arrays: list[Arrays] = []
    measures: list[Measures] = []
    held = 0
    for step in _whole_steps(run, [] if damaged is None else damaged) if shard is None else shard:
        if step.is_scalar:
            scalar_steps.append(step.step)
            continue
        check_step(step, policies, unit, where)  # a problem of the request: raised
        try:
            step_arrays = read_arrays(step, where, per_rank=per_rank)
        except InputError as exc:
            rejected.append(rejection(step.step, exc, where))
            continue
        measures.append(host_measures(step, step_arrays, unit))
        steps.append(step)
        arrays.append(step_arrays)
        held += array_bytes(step_arrays) + row_bytes
        if held >= memory_budget or len(steps) == chunk_size:
            yield steps, arrays, measures, held
            steps, arrays, measures, held = [], [], [], 0
    if steps:
        yield steps, arrays, measures, held


def expected_rows(run: Run, steps: Iterable[Step] | None, step_count: int | None) -> int:
    """The rows the streaming pass makes room for at its start: one a step of the run's listing
    every rank wrote when `steps` is None, else `step_count` when given (a shard's steps come
    one at a time), else as many as `steps` holds (0 when it cannot tell). Scalar and
    rejected steps make none."""
    if steps is None:
        return len(run.listed_whole_step_numbers)
    if step_count is not None:
        return step_count
    return len(steps) if isinstance(steps, Sized) else 0


def stream_run(
    run: Run,
    policies: list[Policy],
    own_index: int | None,
    device: torch.device,
    *,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int], None] | None = None,
    steps: Iterable[Step] | None = None,
    step_count: int | None = None,
    lean: bool = False,
    threads: int = 1,
) -> StreamedRun:
    """Every policy over every readable step of `run` (corrupt steps are skipped, steps whose
    data it cannot use rejected: module docstring), or over `steps` only (a shard of it,
    `replay.shards`: `step_count` steps, when given), read in chunks of at most half
    `memory_budget` bytes of arrays and rows (and `chunk_size` steps, when given), one chunk
    ahead, each chunk's steps computed `threads` at a time. Each chunk's rows are written in
    place into one `RowBuffer` (room for `expected_rows` of them at the start), so the metrics
    are held once, plus a chunk's rows."""
    where, unit = run.location, run_unit(run)
    ranks = run_ranks(run)
    numbers: list[int] = []
    metrics = RowBuffer(expected_rows(run, steps, step_count), len(policies))
    kinds: list[StepGeometryKind] = []
    loss: list[float] = []
    covered: list[float] = []
    approximate = np.zeros(len(policies), dtype=bool)
    floor, likelihood = NoiseFloor(), OwnLikelihood()
    scalar_steps: list[int] = []
    damaged: list[int] = []
    rejected: list[tuple[int, str]] = []  # appended by both threads: sorted at the end
    # Half the budget a chunk: the chunk computed and the one read ahead share it.
    chunk_budget = max(1, memory_budget // 2)
    chunks = read_ahead(
        _read_chunks(
            run, policies, chunk_size, chunk_budget, scalar_steps, rejected, steps, damaged
        )
    )
    computed = widest = 0
    refused = 0  # steps rejected here (the others, by `_read_chunks`, are in no chunk)
    passed_reported = 0  # scalar and damaged steps are in no chunk: reported as they are passed
    outcome = partial(
        _step_row,
        policies=policies,
        own_index=own_index,
        unit=unit,
        where=where,
        ranks=ranks,
        lean=lean,
        memory_budget=memory_budget,
    )
    with heap_kept(shared=threads > 1), computing_threads(threads) as compute:
        for chunk, arrays, measures, held in chunks:
            to_device(arrays, device)
            rows = []
            outcomes = compute(outcome, list(zip(chunk, arrays, strict=True)))
            for step, result, (gathered, moments) in zip(chunk, outcomes, measures, strict=True):
                if isinstance(result, InputError):
                    rejected.append(rejection(step.step, result, where))
                    refused += 1
                    continue
                row, kind, varies = result
                rows.append(row)
                if varies is not None:
                    approximate |= varies
                likelihood.extend(gathered)
                floor.extend(moments)
                numbers.append(step.step)
                kinds.append(kind)
                loss.append(policy_loss(step.scalars))
                covered.append(step.scalars.get("grad_norm_covered", math.nan))
            if rows:
                metrics.append(torch.stack(rows))
            done = len(chunk)
            if held >= chunk_budget or done == chunk_size:
                widest = max(widest, done)
            computed += held
            # The chunk's steps hold their files' buffers: dropped before the next chunk is read.
            del chunk, arrays, measures, rows, outcomes, step, result
            if computed >= memory_budget:  # a budget's worth of steps since the last look
                release_freed_memory(keep=RELEASE_AFTER * memory_budget * threads)
                computed = 0
            if progress is not None:
                passed = len(scalar_steps) + len(damaged)  # by the reading thread, a chunk ahead
                progress(done + passed - passed_reported)
                passed_reported = passed
    # the steps passed after the last chunk; none of a run refused for want of a batch step
    tail = len(scalar_steps) + len(damaged) - passed_reported if numbers else 0
    if progress is not None and tail + len(rejected) > refused:
        progress(tail + len(rejected) - refused)
    return StreamedRun(
        step_numbers=np.array(numbers, dtype=np.int64),
        metrics=metrics.rows,
        geometry=tuple(kinds),
        approximate=approximate,
        loss=np.array(loss, dtype=np.float64),
        grad_norm_covered=np.array(covered, dtype=np.float64),
        noise_floor=floor,
        likelihood=likelihood,
        scalar_steps=len(scalar_steps),
        rejected=tuple(sorted(rejected)),
        widest_chunk=widest,
    )


StepRow = tuple[torch.Tensor, StepGeometryKind, np.ndarray | None]
"""A step's row of device metrics [P, M], its geometry's kind, and which policies'
coefficients vary within a sequence ([P] bool, with per-sequence geometry; else None)."""


Compute = Callable[[Callable[[_Item], _T], list[_Item]], list[_T]]
"""`compute(work, items)`: [work(item) for item in items], in order."""


@contextmanager
def computing_threads(threads: int) -> Iterator[Compute[Any, Any]]:
    """A `Compute` that works on this thread when `threads` is 1, else on `threads` threads of
    a pool that lives for the block. torch kernels run outside Python's lock, so the steps of a
    chunk computed this way overlap; with torch's intra-op threads at 1, each step's kernels
    run on the thread that computes it, so its figures are those of a one-thread replay, bit
    for bit."""
    if threads == 1:
        yield lambda work, items: [work(item) for item in items]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="stabledrl-compute") as pool:
        try:
            yield lambda work, items: list(pool.map(work, items))
        finally:
            pool.shutdown(cancel_futures=True)


POLICY_ENTRY_BYTES = 8
"""Bytes a policy's evaluation of a step holds per entry of the step until its group's rows are
computed, without recorded geometry: its weights (a float32 coef and two flags) and their
allocator's slack (the audit's tune of 4096 settings over 2 steps of 64 x 1024 positions,
evaluated together, peaked 2.1 GB above one of 2: 8 bytes an entry a setting)."""
GEOMETRY_ENTRY_BYTES = 36
"""What recorded geometry adds per entry and policy: its 3 rows of the block multiplied with the
geometry (`metrics.step_metrics`), in float32 and again in the product's float64."""


def group_size(prep: PreparedBatch, geometry: StepGeometry, memory_budget: int) -> int:
    """The policies evaluated together on a step: as many as hold half `memory_budget` bytes of
    per-entry arrays (`POLICY_ENTRY_BYTES`, `GEOMETRY_ENTRY_BYTES`), at least one."""
    per_entry = POLICY_ENTRY_BYTES + (GEOMETRY_ENTRY_BYTES if geometry.kind != "coef" else 0)
    return max(1, memory_budget // 2 // max(1, per_entry * prep.num_tokens))


def _step_row(
    item: tuple[Step, Arrays],
    *,
    policies: list[Policy],
    own_index: int | None,
    unit: Unit,
    where: str,
    ranks: int,
    lean: bool,
    memory_budget: int,
) -> StepRow | InputError:
    """The step's `StepRow`, or the InputError that rejects data the step cannot be replayed
    with (named by run and step); a UsageError of a policy that cannot act on the step's data
    is raised named by run and step too. A replay evaluates every policy at once; a lean one
    (`tune`, whose settings may number thousands) a group at a time (`group_size`), each group's
    weights and memo (a copy of the prepared batch a group) dropped before the next group's
    are made; it leaves cosine_to_own out (NaN), which a ranking does not read. Each
    policy's row is computed on its own, so no figure depends on the grouping but, with a
    float32 geometry product (a sketch), the last bits of the norms (its kernels' sums depend
    on how many rows they multiply)."""
    step, arrays = item
    try:
        prep, geometry, micro = usable(step, arrays, unit, where, ranks)
        size = group_size(prep, geometry, memory_budget) if lean else len(policies)
        own = None if lean else own_index  # cosine_to_own, which a lean pass does not read
        rows: list[torch.Tensor] = []
        varies: list[np.ndarray] = []
        for start in range(0, len(policies), size):
            group = policies[start : start + size]
            # a copy starts its own memo: what the group's policies keep per configuration
            # (clip-cov's draw: three [T] arrays a setting) goes with the group
            batch = replace(prep) if lean else prep
            weights = [policy.weights(batch) for policy in group]
            rows.append(step_metrics(batch, group, weights, geometry, own, micro, lean=lean))
            if geometry.per_sequence:
                coef = torch.stack([w.coef for w in weights])
                varies.append(varies_within_sequence(coef, batch).cpu().numpy())
                del coef
            del weights  # before the next group's are made
    except InputError as exc:
        return exc
    except UsageError as exc:  # a policy that cannot act on this step's data (adv= of a group
        raise UsageError(f"{where}: step {step.step}: {exc}") from None  # split across steps)
    return torch.cat(rows), geometry.kind, np.concatenate(varies) if varies else None


def detail_pass(
    run: Run,
    policies: list[Policy],
    flagged: dict[int, list[int]],
    device: torch.device,
    top_k: int,
) -> list[dict[int, list[TopSequence]]]:
    """Second pass over the flagged steps (step -> indices of the policies it flagged): per
    policy, step -> its top sequences."""
    where, unit, ranks = run.location, run_unit(run), run_ranks(run)
    out: list[dict[int, list[TopSequence]]] = [{} for _ in policies]
    for number in sorted(flagged):
        step = run.step(number)
        arrays = read_arrays(step, where, per_rank=run_per_rank(run))
        to_device([arrays], device)
        prep = prepared(step, arrays, unit, where, ranks)
        geometry = step_geometry(step, arrays, prep, where)
        for i in flagged[number]:
            weights = policies[i].weights(prep)
            out[i][number] = top_sequences(
                prep,
                weights.coef,
                weights,
                geometry,
                arrays["seq_id"].reshape(-1),
                arrays.get("group_id"),
                arrays.get("reward"),
                k=top_k,
            )
    return out
