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
(`check_step`, InputError): what a replay can use then depends on the policies asked for, a
problem of the request, and skipping the step would drop it for every other policy too.
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
from stabledrl_cli.errors import InputError
from stabledrl_cli.geometry import GRAM_KEY, SKETCH_KEY, SKETCH_SCALE_KEY
from stabledrl_cli.policies import Policy, PolicyBatch, PreparedBatch, prepare
from stabledrl_cli.replay import columns
from stabledrl_cli.replay.config import DEFAULT_MEMORY_BUDGET
from stabledrl_cli.replay.framework import MicroBatches, micro_batches
from stabledrl_cli.replay.metrics import (
    StepGeometry,
    TopSequence,
    step_metrics,
    top_sequences,
    varies_within_sequence,
)
from stabledrl_cli.replay.observed import (
    NOISE_FLOOR_INNER_STEP,
    NoiseFloor,
    OwnLikelihood,
    host_array,
    logratio_moments,
    unit_token_counts,
)
from stabledrl_cli.replay.read_ahead import read_ahead
from stabledrl_cli.replay.rows import RowBuffer
from stabledrl_cli.vocab import StepGeometryKind, Unit

BASE_FIELDS = ("logp", "logp_old", "advantages", "mask", "seq_id")
"""Fields every policy needs."""
TOKEN_FIELDS = (*BASE_FIELDS, "logp_ref", "logp_rollout", "loss_weight", "loss_scale")
"""Per-entry fields a replay reads when present (each as long as logp)."""
SEQUENCE_FIELDS = ("group_id", "reward", "micro_batch", "group_split", "token_count")
"""Per-sequence fields a replay reads when present."""
GEOMETRY_FIELDS = (GRAM_KEY, SKETCH_KEY)

Arrays = dict[str, torch.Tensor]
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
    """[S] float64: the recorded loss (NaN where not recorded)."""
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
    reader_checks: tuple[object, ...] = ()
    """What the readers of a sharded pass checked of the run (`Run.checks`, one a shard), for
    the driver's run to adopt; a local pass leaves its checks in the run it read."""


Measures = tuple[OwnLikelihood, NoiseFloor]
"""A step's collapse-warning measurement and noise-floor moments (each empty when the step is
not one), taken on the host and pooled once the step is prepared."""


def rejection(step: int, exc: InputError, where: str) -> tuple[int, str]:
    """(step, the reason) of a step rejected with `exc`: its message without the run's
    location, starting with "step N: "."""
    reason = str(exc).removeprefix(f"{where}: ")
    if not reason.startswith(f"step {step}"):
        reason = f"step {step}: {reason}"
    return step, reason


def check_step(step: Step, policies: Sequence[Policy], unit: Unit, where: str) -> None:
    """InputError (exit 3) for a field a policy needs that the step lacks."""
    for name in BASE_FIELDS:
        if name not in step.fields:
            raise InputError(f"{where}: step {step.step} has no {name!r}, which every policy needs")
    for policy in policies:
        missing = sorted(policy.required_fields(unit) - step.fields)
        if missing:
            names = ", ".join(repr(name) for name in missing)
            raise InputError(
                f"{where}: step {step.step} has no {names}, which policy {policy.spec!r} needs"
            )


def read_arrays(step: Step, where: str) -> Arrays:
    """The step's arrays a replay uses (CPU), with their lengths checked, and the step's counts
    against them: its sequences against the ones seq_id names (N = max(seq_id) + 1: no
    sequence without an entry), its scored entries against the mask's; a recorded
    token_count is >= 0."""
    names = (*TOKEN_FIELDS, *SEQUENCE_FIELDS, *GEOMETRY_FIELDS)
    arrays = {name: step[name] for name in names if name in step.fields}
    length = arrays["logp"].reshape(-1).shape[0]
    for name in TOKEN_FIELDS:
        if name in arrays and arrays[name].reshape(-1).shape[0] != length:
            raise InputError(
                f"{where}: step {step.step}: {name} has {arrays[name].numel()} entries but logp "
                f"has {length} (mismatched array lengths)"
            )
    present = [n for n in SEQUENCE_FIELDS if n in arrays]
    for name in present[1:]:
        if arrays[name].shape != arrays[present[0]].shape:
            raise InputError(
                f"{where}: step {step.step}: {present[0]} has {arrays[present[0]].numel()} "
                f"entries but {name} has {arrays[name].numel()} (mismatched array lengths)"
            )
    seq_id, mask = host_array(arrays["seq_id"]), host_array(arrays["mask"])
    named = int(np.maximum.reduce(seq_id)) + 1 if seq_id.size else 0
    if named < step.num_sequences:  # per-sequence entries of a sequence no entry is of
        raise InputError(
            f"{where}: step {step.step}: seq_id names {named} sequences (its largest id + 1), "
            f"the step has {step.num_sequences}"
        )
    scored = int(np.count_nonzero(mask))
    if scored != step.num_scored_tokens:
        raise InputError(
            f"{where}: step {step.step}: mask scores {scored} entries, the step counts "
            f"{step.num_scored_tokens} scored"
        )
    counts = arrays.get("token_count")
    if counts is not None and counts.numel() and int(counts.min()) < 0:
        raise InputError(
            f"{where}: step {step.step}: token_count holds {int(counts.min())}; a sequence's "
            "token count is a whole number >= 0"
        )
    return arrays


def to_device(chunk: list[Arrays], device: torch.device) -> None:
    """Moves a chunk's arrays to the device with one transfer per field (in place)."""
    if device.type == "cpu":
        return
    names = {name for arrays in chunk for name in arrays}
    for name in names:
        holders = [arrays for arrays in chunk if name in arrays]
        if len({a[name].dtype for a in holders}) != 1:
            for arrays in holders:
                arrays[name] = arrays[name].to(device)
            continue
        shapes = [a[name].shape for a in holders]
        flat = torch.cat([a[name].reshape(-1) for a in holders]).to(device, non_blocking=True)
        pieces = torch.split(flat, [math.prod(s) for s in shapes])
        for arrays, piece, shape in zip(holders, pieces, shapes, strict=True):
            arrays[name] = piece.reshape(shape)


def prepared(step: Step, arrays: Arrays, unit: Unit, where: str, ranks: int) -> PreparedBatch:
    """The step's prepared batch, joined from `ranks` ranks; a bad step's InputError names the
    run and the step."""
    batch = PolicyBatch(
        logp=arrays["logp"].reshape(-1),
        logp_old=arrays["logp_old"],
        advantages=arrays["advantages"],
        mask=arrays["mask"],
        seq_id=arrays["seq_id"],
        group_id=arrays.get("group_id"),
        reward=arrays.get("reward"),
        logp_ref=arrays.get("logp_ref"),
        logp_rollout=arrays.get("logp_rollout"),
        loss_weight=arrays.get("loss_weight"),
        loss_scale=arrays.get("loss_scale"),
        micro_batch=arrays.get("micro_batch"),
        group_split=arrays.get("group_split"),
        unit=unit,
        ranks=ranks,
    )
    try:
        return prepare(batch)
    except InputError as exc:
        raise InputError(f"{where}: step {step.step}: {exc}") from None


def step_geometry(step: Step, arrays: Arrays, prep: PreparedBatch, where: str) -> StepGeometry:
    """The step's recorded gradient geometry on the device (kind "coef" without any)."""
    scale = step.scalars.get(SKETCH_SCALE_KEY)
    try:
        return StepGeometry.from_arrays(
            arrays.get(GRAM_KEY), arrays.get(SKETCH_KEY), scale, prep, step.step
        )
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def step_micro_batches(
    step: Step, arrays: Arrays, prep: PreparedBatch, where: str, ranks: int
) -> MicroBatches:
    """The step's micro-batches (one without a recorded `micro_batch`), over `ranks` ranks."""
    return micro_batches(
        prep,
        arrays.get("micro_batch"),
        arrays["seq_id"],
        seq_is_raw="group_id" in arrays or "reward" in arrays,
        where=f"{where}: step {step.step}",
        ranks=ranks,
    )


def usable(
    step: Step, arrays: Arrays, unit: Unit, where: str, ranks: int
) -> tuple[PreparedBatch, StepGeometry, MicroBatches]:
    """The step's prepared batch, geometry and micro-batches: every check of its data a replay
    makes before it evaluates a policy (InputError naming the run and step: module
    docstring)."""
    prep = prepared(step, arrays, unit, where, ranks)
    geometry = step_geometry(step, arrays, prep, where)
    return prep, geometry, step_micro_batches(step, arrays, prep, where, ranks)


def replay_rejection(run: Run, step: Step) -> tuple[tuple[int, str] | None, Arrays]:
    """Whether a replay would reject `step`, a step of `run` with a policy batch, read and
    checked on the CPU as the streaming pass does (`read_arrays`, `usable`): (step, reason)
    (`rejection`) or None, and the arrays read (empty when they could not be)."""
    where = run.location
    try:
        arrays = read_arrays(step, where)
    except InputError as exc:
        return rejection(step.step, exc, where), {}
    try:
        usable(step, arrays, run_unit(run), where, run_ranks(run))
    except InputError as exc:
        return rejection(step.step, exc, where), arrays
    return None, arrays


def run_ranks(run: Run) -> int:
    """The ranks the run was recorded on (the reader has validated the manifest's
    world_size)."""
    return int(run.manifest.get("world_size", 1))


def run_unit(run: Run) -> Unit:
    """What the run's entries score (the reader has validated the manifest's unit)."""
    return "sequence" if run.unit == "sequence" else "token"


def array_bytes(arrays: Arrays) -> int:
    """Bytes held by a step's arrays."""
    return sum(a.numel() * a.element_size() for a in arrays.values())


def step_row_bytes(policies: int) -> int:
    """Bytes of a step's row of device metrics over `policies` policies (float64)."""
    return policies * len(columns.device_metrics()) * np.dtype(np.float64).itemsize


def _read_chunks(
    run: Run,
    policies: Sequence[Policy],
    chunk_size: int | None,
    memory_budget: int,
    scalar_steps: list[int],
    rejected: list[tuple[int, str]],
    shard: Iterable[Step] | None = None,
) -> Iterator[tuple[list[Step], list[Arrays], list[Measures], int]]:
    """The run's readable steps (or `shard`'s) that hold a policy batch, their arrays (CPU),
    their measures and the bytes of the arrays and of the rows they make (one row of device
    metrics a policy), a chunk at a time: a chunk closes at the step that brings those bytes to
    `memory_budget`, or its steps to `chunk_size`. Runs on the read-ahead thread. Takes each
    step's collapse-warning measurement and noise-floor moments on the way (on the host, before
    any transfer; pooled by the caller once the step is prepared); appends the number of each
    scalar step (no batch) to `scalar_steps`, and each step whose arrays it cannot read to
    `rejected` (`rejection`); InputError for a step that lacks a field a policy needs
    (`check_step`)."""
    where, unit = run.location, run_unit(run)
    row_bytes = step_row_bytes(len(policies))
    steps: list[Step] = []
    arrays: list[Arrays] = []
    measures: list[Measures] = []
    held = 0
    for step in run.steps() if shard is None else shard:
        if step.is_scalar:
            scalar_steps.append(step.step)
            continue
        check_step(step, policies, unit, where)  # a problem of the request: raised
        try:
            step_arrays = read_arrays(step, where)
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


def host_measures(step: Step, arrays: Arrays, unit: Unit) -> Measures:
    """The step's collapse-warning measurement (steps with inner_step 0 or none recorded) and
    noise-floor moments (inner_step 0), from its arrays on the host."""
    likelihood, floor = OwnLikelihood(), NoiseFloor()
    inner = step.scalars.get("inner_step")
    if OwnLikelihood.wanted(inner):
        logp_old, mask = host_array(arrays["logp_old"]), host_array(arrays["mask"])
        counts = arrays.get("token_count")
        token_count = unit_token_counts(
            unit, host_array(arrays["seq_id"]), None if counts is None else host_array(counts)
        )
        likelihood.add(step.step, inner, logp_old, mask, token_count)
        if inner == NOISE_FLOOR_INNER_STEP:
            floor.add(*logratio_moments(host_array(arrays["logp"]), logp_old, mask))
    return likelihood, floor


def expected_rows(run: Run, steps: Iterable[Step] | None, step_count: int | None) -> int:
    """The rows the streaming pass makes room for at its start: one a step the run lists
    when `steps` is None, else `step_count` when given (a shard's steps come one at a time),
    else as many as `steps` holds (0 when it cannot tell). Scalar and rejected steps make
    none."""
    if steps is None:
        return len(run.listed_step_numbers)
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
    rejected: list[tuple[int, str]] = []  # appended by both threads: sorted at the end
    # Half the budget a chunk: the chunk computed and the one read ahead share it.
    chunk_budget = max(1, memory_budget // 2)
    chunks = read_ahead(
        _read_chunks(run, policies, chunk_size, chunk_budget, scalar_steps, rejected, steps)
    )
    computed = 0
    refused = 0  # steps rejected here (the others, by `_read_chunks`, are in no chunk)
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
                loss.append(step.scalars.get("loss", math.nan))
                covered.append(step.scalars.get("grad_norm_covered", math.nan))
            if rows:
                metrics.append(torch.stack(rows))
            done = len(chunk)
            computed += held
            # The chunk's steps hold their files' buffers: dropped before the next chunk is read.
            del chunk, arrays, measures, rows, outcomes, step, result
            if computed >= memory_budget:  # a budget's worth of steps since the last look
                release_freed_memory(keep=RELEASE_AFTER * memory_budget * threads)
                computed = 0
            if progress is not None:
                progress(done)
    if progress is not None and len(rejected) > refused:
        progress(len(rejected) - refused)
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
    with (named by run and step). A replay evaluates every policy at once; a lean one (`tune`,
    whose settings may number thousands) a group at a time (`group_size`), each group's
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
        arrays = read_arrays(step, where)
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
